"""Where tierquant keeps what it measured: one folder per kind under $TIERQUANT_CACHE (else
~/.cache/tierquant). Entries are keyed by a hash of everything they depend on, written with an
atomic rename (a crash or a concurrent writer never leaves half a file) and read with a guard (an
unreadable entry is a miss, measured again, never an error)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def folder(kind: str) -> Path:
    root = os.environ.get("TIERQUANT_CACHE") or Path.home() / ".cache" / "tierquant"
    return Path(root) / kind


def key(what) -> str:
    """A short stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path):
    """The entry's JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
