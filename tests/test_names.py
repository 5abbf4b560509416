"""Every name the package and the benchmarks use is defined. Benchmark code runs only on a lent GPU
machine, where an undefined name costs a whole call: on 2026-12-06 a missing `import torch` in
frontier.py's row bookkeeping lost every row of one. pyflakes reads the code without running it."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_undefined_names_in_the_package_or_the_benchmarks():
    pyflakes_api = pytest.importorskip("pyflakes.api")
    from pyflakes import messages

    found = []

    class Reporter:
        def flake(self, msg):
            if isinstance(msg, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                found.append(str(msg))

        def syntaxError(self, filename, msg, lineno, offset, text):
            found.append(f"{filename}:{lineno}: {msg}")

        def unexpectedError(self, filename, msg):
            found.append(f"{filename}: {msg}")

    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(files) > 40
    for path in files:
        pyflakes_api.check(path.read_text(), str(path.relative_to(ROOT)), Reporter())
    assert found == []


def test_the_check_sees_an_undefined_name():
    pyflakes_api = pytest.importorskip("pyflakes.api")
    from pyflakes import messages

    seen = []

    class Reporter:
        def flake(self, msg):
            seen.append(type(msg))

    pyflakes_api.check("def f():\n    return torch.cuda\n", "x.py", Reporter())
    assert messages.UndefinedName in seen
