"""A deterministic judge: does an image show what its caption says?

It parses the caption (the grammar of scenes.caption), then for each named object:
  colour   - pixels within COLOUR_TOL of the named palette colour; the object is that mask's largest
             4-connected component, which must cover at least MIN_AREA of the image;
  shape    - the component is compared (IoU) with an ideal circle, square and triangle filling its
             bounding box; the best match must be the named shape;
  position - one object: its centroid's 3x3 cell; two objects: the relation holds along its axis with a
             margin, and that axis dominates the offset.
It also fails images with another palette colour covering MIN_AREA or more (an extra object).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .scenes import BACKGROUND, CELLS, COLOURS, SHAPES

COLOUR_TOL = 60 / 255  # half the smallest distance between two palette colours
MIN_AREA = 0.010  # of the image: ~41 px at 64x64; the smallest drawn shape covers ~110 px
REL_MARGIN = 0.10  # of the side: centres of related objects differ by at least this much (drawn: >= 0.28)

_PALETTE = np.array([COLOURS[c] for c in COLOURS] + [BACKGROUND], dtype=np.float32) / 255
_CELL_BY_NAME = {v: k for k, v in CELLS.items()}
_COL = "|".join(COLOURS)
_SHP = "|".join(SHAPES)
_ONE = re.compile(rf"^a ({_COL}) ({_SHP}) at the ({'|'.join(CELLS.values())})$")
_TWO = re.compile(rf"^a ({_COL}) ({_SHP}) (left of|right of|above|below) a ({_COL}) ({_SHP})$")


@dataclass
class Verdict:
    ok: bool
    prompt: str
    reasons: list[str] = field(default_factory=list)  # why it failed (empty when ok)
    found: dict = field(default_factory=dict)  # colour -> {"shape", "cx", "cy", "area", "iou"}


def parse(prompt: str):
    """-> ("one", colour, shape, (row, col)) or ("two", (colour, shape), relation, (colour, shape))."""
    p = " ".join(prompt.lower().strip().rstrip(".").split())
    if m := _ONE.match(p):
        return "one", m[1], m[2], _CELL_BY_NAME[m[3]]
    if m := _TWO.match(p):
        return "two", (m[1], m[2]), m[3], (m[4], m[5])
    raise ValueError(f"not a caption of the embedded scenes: {prompt!r}")


def to_array(image) -> np.ndarray:
    """PIL image, uint8 or float array (H,W,3) or torch tensor (3,H,W)/(H,W,3) -> float32 (H,W,3) in [0,1]."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.transpose(1, 2, 0)
    a = np.asarray(image)
    a = a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)
    return np.clip(a, 0, 1)


def classify(img: np.ndarray) -> np.ndarray:
    """(H,W) palette index per pixel (len(COLOURS) = background), -1 where nothing is close enough."""
    d = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)
    k = d.argmin(-1)
    k[d.min(-1) > COLOUR_TOL] = -1
    return k


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (min-label propagation, vectorised)."""
    if not mask.any():
        return mask
    H, W = mask.shape
    big = H * W + 1
    lab = np.where(mask, np.arange(H * W).reshape(H, W), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        n = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        n = np.where(mask, n, big)
        if np.array_equal(n, lab):
            break
        lab = n
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[counts.argmax()]


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes filling an h x w box (same geometry as scenes.render)."""
    y = (np.arange(h) + 0.5)[:, None] / h * 2 - 1  # [-1, 1]
    x = (np.arange(w) + 0.5)[None, :] / w * 2 - 1
    circle = x * x + y * y <= 1
    square = np.ones((h, w), bool)
    tri = (y <= 1) & (-2 * x - y - 1 <= 0) & (2 * x - y - 1 <= 0)
    return {"circle": circle, "square": square, "triangle": tri}


def describe(comp: np.ndarray) -> dict:
    H, W = comp.shape
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = comp[y0:y1, x0:x1]
    ious = {}
    for name, t in _templates(y1 - y0, x1 - x0).items():
        ious[name] = float((crop & t).sum() / max((crop | t).sum(), 1))
    shape = max(ious, key=ious.get)
    return {"shape": shape, "iou": ious[shape], "cx": (xs.mean() + 0.5) / W, "cy": (ys.mean() + 0.5) / H,
            "area": comp.mean()}


def judge_details(image, prompt: str) -> Verdict:
    img = to_array(image)
    H, W = img.shape[:2]
    parsed = parse(prompt)
    v = Verdict(True, prompt)
    named = [(parsed[1], parsed[2])] if parsed[0] == "one" else [parsed[1], parsed[3]]
    k = classify(img)
    names = list(COLOURS)
    for c, s in named:
        comp = largest_component(k == names.index(c))
        if comp.mean() < MIN_AREA:
            v.reasons.append(f"no {c} object")
            continue
        d = describe(comp)
        v.found[c] = d
        if d["shape"] != s:
            v.reasons.append(f"the {c} object is a {d['shape']}, not a {s}")
    for i, c in enumerate(names):
        if c not in dict(named) and (k == i).mean() >= MIN_AREA:
            v.reasons.append(f"an extra {c} object")
    if parsed[0] == "one" and parsed[1] in v.found:
        d = v.found[parsed[1]]
        cell = (min(int(d["cy"] * 3), 2), min(int(d["cx"] * 3), 2))
        if cell != parsed[3]:
            v.reasons.append(f"the {parsed[1]} {parsed[2]} is at the {CELLS[cell]}, not the {CELLS[parsed[3]]}")
    elif parsed[0] == "two" and parsed[1][0] in v.found and parsed[3][0] in v.found:
        a, b = v.found[parsed[1][0]], v.found[parsed[3][0]]
        dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # from A to B
        along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[parsed[2]]
        if not (along >= REL_MARGIN and abs(along) > abs(across)):
            v.reasons.append(f"the {parsed[1][0]} object is not {parsed[2]} the {parsed[3][0]} one")
    v.ok = not v.reasons
    return v


def judge(image, prompt: str) -> bool:
    """True when `image` shows exactly what `prompt` (a scenes caption) says."""
    return judge_details(image, prompt).ok
