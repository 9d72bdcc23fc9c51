"""Procedural clips of coloured shapes, the training data of the embedded model, and a detector.

Every clip shows one or two objects — a circle, a square or a triangle, each red, green, blue,
yellow or white — on a plain or gradient background of muted, dark colours, each object moving
left, right, up or down at a constant speed or standing still. Its prompt says so::

    a red circle moving right
    a white triangle standing still
    a blue square moving up and a yellow circle moving left

Clips are drawn with numpy (anti-aliased by an analytic coverage of each pixel), deterministic
from ``(seed, index)`` and never written to disk: :func:`make_clip` returns one, :func:`make_clips`
a list. Frames are ``[F, H, W, 3]`` float32 in [0, 1] (the layout of ``WanPipeline(...).frames[0]``).

The detector works on any such frames — the generator's or a model's: :func:`color_mask` marks
the pixels near a named colour, :func:`track` follows the centroid of those pixels through the
frames, :func:`motion_of` turns a track into a direction, and :func:`check_prompt` says whether
frames show what a prompt of this grammar asks for (each object's colour present, and its
centroid moving the asked way).

>>> clip = make_clip(3, num_frames=9, height=64, width=64)
>>> clip.frames.shape, clip.frames.dtype
((9, 64, 64, 3), dtype('float32'))
>>> parse_prompt("a red circle moving right")
[ObjectSpec(color='red', shape='circle', motion='right')]
>>> check_prompt(clip.frames, clip.prompt)["ok"]
True
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

__all__ = [
    "COLORS",
    "BACKGROUNDS",
    "LAYOUTS",
    "MOTIONS",
    "SHAPES",
    "Clip",
    "ObjectSpec",
    "check_prompt",
    "color_mask",
    "make_clip",
    "make_clips",
    "motion_of",
    "parse_prompt",
    "prompt_of",
    "shape_of",
    "track",
]

#: Object colours (RGB in [0, 1]): saturated or bright, far from every background colour.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.80, 0.22),
    "blue": (0.16, 0.32, 0.96),
    "yellow": (0.96, 0.88, 0.12),
    "white": (0.97, 0.97, 0.97),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Directions of motion; ``still`` objects do not move. Image rows grow downwards: ``up`` is -y.
MOTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object of a prompt: its colour, shape and motion (a key of :data:`MOTIONS`)."""

    color: str
    shape: str
    motion: str

    def phrase(self) -> str:
        verb = "standing still" if self.motion == "still" else f"moving {self.motion}"
        return f"a {self.color} {self.shape} {verb}"


@dataclasses.dataclass(frozen=True)
class Clip:
    """A generated clip.

    Attributes:
        frames: ``[F, H, W, 3]`` float32 in [0, 1].
        prompt: what it shows, in the grammar of :func:`parse_prompt`.
        objects: the objects, in the prompt's order.
        centers: ``[n_objects, F, 2]`` float32: each object's centre (x, y) in pixels per frame.
        sizes: each object's half-size (circle radius) in pixels.
    """

    frames: np.ndarray
    prompt: str
    objects: tuple[ObjectSpec, ...]
    centers: np.ndarray
    sizes: tuple[float, ...]


def prompt_of(objects: Sequence[ObjectSpec]) -> str:
    """The prompt of a list of objects: their phrases joined by ``and``."""
    return " and ".join(obj.phrase() for obj in objects)


_PHRASE = re.compile(
    r"an? (?P<color>{c}) (?P<shape>{s})s? (?:moving (?P<dir>left|right|up|down)|(?P<still>standing still|still))".format(
        c="|".join(COLORS), s="|".join(SHAPES)
    )
)


def parse_prompt(prompt: str) -> list[ObjectSpec]:
    """The objects a prompt of this grammar names (``a <color> <shape> moving <dir>``/``standing still``,
    joined by ``and``); an empty list when it names none (any other prompt)."""
    found = []
    for m in _PHRASE.finditer(prompt.lower()):
        found.append(ObjectSpec(m["color"], m["shape"], "still" if m["still"] else m["dir"]))
    return found


# --- drawing --------------------------------------------------------------------------------


#: Backgrounds: ``varied``: plain or a linear gradient of muted, dark colours drawn per clip;
#: ``dark``: always the same plain dark grey (:data:`DARK`), a narrower world for a tiny model.
BACKGROUNDS: tuple[str, ...] = ("varied", "dark")
#: The ``dark`` background's colour.
DARK: tuple[float, float, float] = (0.12, 0.12, 0.14)


def _background(rng: np.random.Generator, height: int, width: int, kind: str = "varied") -> np.ndarray:
    """A background ``[H, W, 3]`` float32 of a kind in :data:`BACKGROUNDS`."""
    if kind == "dark":
        return np.broadcast_to(np.asarray(DARK, dtype=np.float32), (height, width, 3)).copy()

    def muted():
        level = rng.uniform(0.06, 0.38)
        tint = rng.uniform(-0.06, 0.06, size=3)
        return np.clip(level + tint, 0.0, 1.0)

    first = muted()
    if rng.random() < 0.4:
        return np.broadcast_to(first.astype(np.float32), (height, width, 3)).copy()
    second = muted()
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = (xs / max(width - 1, 1) - 0.5) * np.cos(angle) + (ys / max(height - 1, 1) - 0.5) * np.sin(angle)
    t = np.clip(proj / np.sqrt(0.5) + 0.5, 0.0, 1.0)[..., None]
    return ((1 - t) * first + t * second).astype(np.float32)


def _coverage(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Fraction of each pixel inside the shape (a 1-pixel anti-aliasing ramp on its signed distance)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        half = r * 0.88  # about the circle's area
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - half
    elif shape == "triangle":  # equilateral, pointing up, centred on its centroid
        side = r * 2.3
        inradius = side / (2 * np.sqrt(3))
        s3 = np.sqrt(3) / 2
        sdf = np.maximum.reduce([dy - inradius, -s3 * dx - 0.5 * dy - inradius, s3 * dx - 0.5 * dy - inradius])
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _path(rng: np.random.Generator, motion: str, num_frames: int, height: int, width: int, r: float) -> np.ndarray:
    """Centres ``[F, 2]`` of an object that stays inside the frame and moves at constant speed."""
    ux, uy = MOTIONS[motion]
    margin = r * 1.15
    travel = rng.uniform(0.35, 0.5) * (width if ux else height) if motion != "still" else 0.0
    starts = []
    for size, u in ((width, ux), (height, uy)):
        lo, hi = margin, size - margin
        if u > 0:
            hi -= travel
        elif u < 0:
            lo += travel
        starts.append(rng.uniform(lo, max(lo, hi)))
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)[:, None]
    return (np.asarray(starts, dtype=np.float32) + t * travel * np.asarray([ux, uy], dtype=np.float32)).astype(
        np.float32
    )


#: Where objects go: ``free``: any size in 8.5-13% of the frame, anywhere their path fits, travelling
#: 35-50% of the frame; ``centred``: a fixed size (11% of the frame, 85% of that in pairs) on a path
#: centred in the frame (two objects: in the upper-left and the lower-right quarter) within ±3%,
#: travelling 36% of the frame — a narrow world, where a prompt nearly decides its clip but for the
#: background, which a tiny model learns in the time there is.
LAYOUTS: tuple[str, ...] = ("free", "centred")


def _centred_path(rng: np.random.Generator, motion: str, num_frames: int, height: int, width: int, r: float,
                  which: int, count: int) -> np.ndarray:
    """Centres ``[F, 2]`` for the ``centred`` layout: the path's midpoint within ±3% of the frame's
    centre (one object) or of its quarter's (two), travelling 36% of the frame, kept inside it."""
    ux, uy = MOTIONS[motion]
    travel = 0.36 * (width if ux else height) if motion != "still" else 0.0
    anchor = 0.5 if count == 1 else (0.32, 0.68)[which]
    jitter = 0.03
    mid = np.array([(anchor + rng.uniform(-jitter, jitter)) * width, (anchor + rng.uniform(-jitter, jitter)) * height],
                   dtype=np.float32)
    step = travel * np.asarray([ux, uy], dtype=np.float32)
    t = np.linspace(-0.5, 0.5, num_frames, dtype=np.float32)[:, None]
    path = mid + t * step
    margin = r * 1.15
    low = np.array([margin, margin], dtype=np.float32) - path.min(0)
    high = np.array([width - margin, height - margin], dtype=np.float32) - path.max(0)
    return (path + np.clip(0.0, low, np.maximum(low, high))).astype(np.float32)


def make_clip(seed: int, index: int = 0, *, num_frames: int = 17, height: int = 256, width: int = 256,
              two_objects: float = 0.3, still: float = 0.15, layout: str = "free", background: str = "varied") -> Clip:
    """Clip number ``index`` of the stream seeded with ``seed``: the same arguments, the same clip.

    Args:
        seed, index: choose the clip (``numpy.random.default_rng([seed, index])``).
        num_frames, height, width: its size.
        two_objects: probability of two objects (of different colours) rather than one.
        still: probability of each object standing still rather than moving.
        layout: one of :data:`LAYOUTS` (``free`` by default).
        background: one of :data:`BACKGROUNDS` (``varied`` by default).
    """
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if min(height, width) < 16:
        raise ValueError(f"height and width must be at least 16 pixels, got {height}x{width}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    rng = np.random.default_rng([int(seed), int(index)])
    count = 2 if rng.random() < two_objects else 1
    colors = rng.choice(list(COLORS), size=count, replace=False)
    objects, centers, sizes = [], [], []
    for color in colors:
        shape = SHAPES[rng.integers(len(SHAPES))]
        motion = "still" if rng.random() < still else ("left", "right", "up", "down")[rng.integers(4)]
        r = float(rng.uniform(0.085, 0.13) * min(height, width))
        if layout == "centred":
            r = 0.11 * min(height, width)
        if count == 2:
            r *= 0.85
        objects.append(ObjectSpec(str(color), shape, motion))
        if layout == "centred":
            centers.append(_centred_path(rng, motion, num_frames, height, width, r, len(centers), count))
        else:
            centers.append(_path(rng, motion, num_frames, height, width, r))
        sizes.append(r)
    frames = np.empty((num_frames, height, width, 3), dtype=np.float32)
    background = _background(rng, height, width, background)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    for f in range(num_frames):
        frame = background.copy()
        for obj, path, r in zip(objects, centers, sizes):
            alpha = _coverage(obj.shape, xs, ys, float(path[f, 0]), float(path[f, 1]), r)[..., None]
            frame = frame * (1 - alpha) + alpha * np.asarray(COLORS[obj.color], dtype=np.float32)
        frames[f] = frame
    return Clip(frames, prompt_of(objects), tuple(objects), np.stack(centers), tuple(sizes))


def make_clips(count: int, seed: int = 0, start: int = 0, **kwargs) -> list[Clip]:
    """Clips ``start .. start + count - 1`` of the stream seeded with ``seed`` (see :func:`make_clip`)."""
    return [make_clip(seed, i, **kwargs) for i in range(start, start + count)]


# --- detection ------------------------------------------------------------------------------


def color_mask(frames, color: str, tolerance: float = 0.3) -> np.ndarray:
    """``[F, H, W]`` bool: pixels within ``tolerance`` (RGB distance) of ``COLORS[color]`` and nearer
    to it than to any other named colour. ``frames``: ``[F, H, W, 3]`` (or ``[H, W, 3]``), floats in
    [0, 1] or uint8."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {list(COLORS)}, got {color!r}")
    array = np.asarray(frames)
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if array.ndim == 3:
        array = array[None]
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)  # [C, 3]
    dist = np.linalg.norm(array[..., None, :] - palette, axis=-1)  # [F, H, W, C]
    k = list(COLORS).index(color)
    return (dist[..., k] < tolerance) & (dist.argmin(-1) == k)


def track(frames, color: str, min_fraction: float = 0.002, tolerance: float = 0.3) -> np.ndarray:
    """``[F, 2]`` centroid (x, y) in pixels of the pixels of ``color`` per frame; NaN where fewer than
    ``min_fraction`` of the frame's pixels have that colour."""
    return _centroids(color_mask(frames, color, tolerance), min_fraction)


def _centroids(mask: np.ndarray, min_fraction: float = 0.002) -> np.ndarray:
    """:func:`track` of a colour mask ``[F, H, W]``."""
    num_frames, height, width = mask.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    out = np.full((num_frames, 2), np.nan)
    for f in range(num_frames):
        n = mask[f].sum()
        if n >= max(1, min_fraction * height * width):
            out[f] = (xs[mask[f]].mean(), ys[mask[f]].mean())
    return out


def motion_of(centers: np.ndarray, size: tuple[int, int], still_fraction: float = 0.06) -> str | None:
    """The direction (``left``/``right``/``up``/``down``/``still``) of a track ``[F, 2]`` from its first
    to its last detected centroid; ``still`` when it moves less than ``still_fraction`` of the frame
    (``size`` = (height, width)); None when fewer than half the frames have a centroid."""
    valid = ~np.isnan(centers).any(-1)
    if valid.sum() < max(2, len(centers) // 2):
        return None
    points = centers[valid]
    third = max(1, len(points) // 3)
    dx, dy = points[-third:].mean(0) - points[:third].mean(0)
    height, width = size
    if abs(dx) < still_fraction * width and abs(dy) < still_fraction * height:
        return "still"
    if abs(dx) / width >= abs(dy) / height:
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


#: Fill of its bounding box by each shape: a square fills it, a circle pi/4 of it, a triangle half.
_FILL = {"square": 1.0, "circle": float(np.pi / 4), "triangle": 0.5}


def shape_of(frames, color: str, min_fraction: float = 0.002, tolerance: float = 0.3) -> str | None:
    """The shape (a key of :data:`SHAPES`) of the largest blob of ``color``: the one whose bounding-box
    fill (:data:`_FILL`) is nearest the blob's median fill over the frames where it covers at least
    ``min_fraction`` of the pixels; None when it is in fewer than half the frames. A rough measure:
    a blurred square reads as a circle, a rounded triangle as a circle."""
    return _shape_of_mask(color_mask(frames, color, tolerance), min_fraction)


def _shape_of_mask(mask: np.ndarray, min_fraction: float = 0.002) -> str | None:
    """:func:`shape_of` of a colour mask ``[F, H, W]``."""
    from scipy import ndimage

    num_frames, height, width = mask.shape
    fills = []
    for f in range(num_frames):
        labels, count = ndimage.label(mask[f])
        if not count:
            continue
        sizes = ndimage.sum_labels(mask[f], labels, index=range(1, count + 1))
        biggest = int(np.argmax(sizes)) + 1
        if sizes[biggest - 1] < max(1, min_fraction * height * width):
            continue
        ys, xs = np.nonzero(labels == biggest)
        fills.append(sizes[biggest - 1] / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    if len(fills) < max(1, num_frames // 2):
        return None
    fill = float(np.median(fills))
    return min(_FILL, key=lambda shape: abs(_FILL[shape] - fill))


def check_prompt(frames, prompt: str) -> dict:
    """Whether ``frames`` (``[F, H, W, 3]``) show what ``prompt`` asks for.

    For every object of the prompt: ``color_present`` (its colour covers at least 0.2% of the
    pixels in at least half the frames), ``motion`` (what its colour's centroid does, see
    :func:`motion_of`) and ``motion_ok``, and ``shape`` / ``shape_ok`` (:func:`shape_of`, reported,
    not part of ``ok``). ``ok`` is True when every object's colour is present and moves as asked. A
    prompt outside the grammar gives ``{"objects": [], "ok": None}``.
    """
    specs = parse_prompt(prompt)
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    size = array.shape[1:3]
    results = []
    for spec in specs:
        mask = color_mask(array, spec.color)  # once per object: its track and its shape
        centers = _centroids(mask)
        present = bool((~np.isnan(centers).any(-1)).sum() >= max(1, len(centers) // 2))
        motion = motion_of(centers, size) if present else None
        shape = _shape_of_mask(mask) if present else None
        results.append({"color": spec.color, "shape": spec.shape, "asked": spec.motion, "color_present": present,
                        "motion": motion, "motion_ok": motion == spec.motion, "seen_shape": shape,
                        "shape_ok": shape == spec.shape})
    ok = all(r["color_present"] and r["motion_ok"] for r in results) if results else None
    return {"objects": results, "ok": ok}
