"""Patterns written as short strings, for the command line and configs.

Grammar: ``NAME[:ARG][,KEY=VALUE...]``.

- ``dense``
- ``window:3x9x9`` / ``window:*x9x9,stride=1x2x2,dilation=1`` (``*`` = whole axis)
- ``window:18x24x24,stride=6x8x8,tile=6x8x8`` / ``...,tile=true`` (tile = stride): the tile-aligned
  (STA) execution of the same window
- ``radial:0.2`` / ``radial:decay=0.95,sink=false``
- ``topk:0.25`` / ``topk:cdf=0.9,block=64,similarity=0.3`` (BlockTopK)
- ``piecewise:0.25`` / ``piecewise:0.25,order=0`` / ``piecewise:0.25,first_order=shared`` (Piecewise)
"""

from __future__ import annotations

from .base import Pattern
from .dense import Dense
from .piecewise import Piecewise
from .topk import BlockTopK
from .radial import Radial
from .window import SlidingWindow

PATTERN_NAMES = ("dense", "window", "radial", "topk", "piecewise")
EXAMPLES = {"dense": "dense", "window": "window:3x9x9", "radial": "radial:0.2", "topk": "topk:0.25",
            "piecewise": "piecewise:0.25"}


def _sizes(text: str, key: str):
    out = []
    for part in text.lower().split("x"):
        if part in ("*", "none", "all"):
            out.append(None)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"pattern option {key}={text!r}: expected sizes like 3x9x9 ('*' for a whole axis)") from None
    return out[0] if len(out) == 1 else tuple(out)


def _bool(text: str, key: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"pattern option {key}={text!r}: expected true or false")


def _float(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"pattern option {key}={text!r}: expected a number") from None


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"pattern option {key}={text!r}: expected a whole number") from None


def _items(spec: str, name: str, rest: str) -> tuple[list[str], dict[str, str]]:
    """The value before the options and the ``key=value`` options of a spec's argument part."""
    items = [x.strip() for x in rest.split(",")] if rest.strip() else []
    if any(not x for x in items):
        raise ValueError(f"pattern {spec!r}: empty entry between commas; write e.g. '{name}:...,key=value'")
    positional = [x for x in items if "=" not in x]
    if len(positional) > 1:
        raise ValueError(f"pattern {spec!r}: at most one value before the options, got {positional}")
    if positional and items[0] != positional[0]:
        raise ValueError(f"pattern {spec!r}: the value {positional[0]!r} must come before the key=value options")
    options: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            continue
        key, value = (x.strip() for x in item.split("=", 1))
        if not key or not value:
            raise ValueError(f"pattern {spec!r}: option {item!r} needs a key and a value, like stride=1x2x2")
        if key in options:
            raise ValueError(f"pattern {spec!r}: option {key!r} given twice")
        options[key] = value
    return positional, options


def parse_pattern(spec: str) -> Pattern:
    """Build a pattern from its string form.

    >>> parse_pattern("window:*x8x8,stride=1x2x2")
    SlidingWindow(window=(None, 8, 8), stride=(1, 2, 2), dilation=1)
    >>> parse_pattern("radial:0.2")
    Radial(decay=0.2, sink=True, block=128)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"pattern must be a non-empty string like 'window:3x9x9', got {spec!r}")
    head, colon, rest = spec.strip().partition(":")
    name = head.strip().lower()
    if name not in PATTERN_NAMES:
        raise ValueError(f"unknown pattern {name!r}; allowed: {', '.join(PATTERN_NAMES)}")
    if colon and not rest.strip():
        raise ValueError(f"pattern {spec!r}: nothing after ':'; e.g. {EXAMPLES[name]!r}")
    positional, options = _items(spec, name, rest)
    if name == "dense":
        if positional or options:
            raise ValueError(f"pattern 'dense' takes no options, got {rest!r}")
        return Dense()
    if name == "window":
        allowed = {"window", "stride", "dilation", "tile"}
        kwargs = {}
        if positional:
            kwargs["window"] = _sizes(positional[0], "window")
        for key, value in options.items():
            if key not in allowed:
                raise ValueError(f"pattern 'window' has no option {key!r}; allowed: {sorted(allowed)}")
            if key == "tile" and value.lower() in ("true", "false", "yes", "no", "on", "off"):
                kwargs[key] = True if _bool(value, key) else None
            else:
                kwargs[key] = _sizes(value, key)
        if "window" not in kwargs:
            raise ValueError("pattern 'window' needs a window size, e.g. 'window:3x9x9'")
        return SlidingWindow(**kwargs)
    if name == "radial":
        allowed = {"decay", "sink", "block"}
        kwargs = {}
        if positional:
            kwargs["decay"] = _float(positional[0], "decay")
        for key, value in options.items():
            if key not in allowed:
                raise ValueError(f"pattern 'radial' has no option {key!r}; allowed: {sorted(allowed)}")
            if key == "decay":
                kwargs[key] = _float(value, key)
            elif key == "sink":
                kwargs[key] = _bool(value, key)
            else:
                kwargs[key] = _int(value, key)
        if "decay" not in kwargs:
            raise ValueError("pattern 'radial' needs a decay, e.g. 'radial:0.2'")
        return Radial(**kwargs)
    if name == "topk":
        allowed = {"density", "cdf", "block", "keep_diagonal", "keep_sink", "similarity"}
        kwargs = {}
        if positional:
            kwargs["density"] = _float(positional[0], "density")
        for key, value in options.items():
            if key not in allowed:
                raise ValueError(f"pattern 'topk' has no option {key!r}; allowed: {sorted(allowed)}")
            if key in ("keep_diagonal", "keep_sink"):
                kwargs[key] = _bool(value, key)
            elif key == "block":
                kwargs[key] = _int(value, key)
            else:
                kwargs[key] = _float(value, key)
        if "density" not in kwargs and "cdf" not in kwargs:
            raise ValueError("pattern 'topk' needs a density or a cdf, e.g. 'topk:0.25' or 'topk:cdf=0.9'")
        return BlockTopK(**kwargs)
    if name == "piecewise":
        allowed = {"density", "block", "order", "first_order", "rank"}
        kwargs = {}
        if positional:
            kwargs["density"] = _float(positional[0], "density")
        for key, value in options.items():
            if key not in allowed:
                raise ValueError(f"pattern 'piecewise' has no option {key!r}; allowed: {sorted(allowed)}")
            kwargs[key] = value if key == "first_order" else (_float(value, key) if key == "density" else _int(value, key))
        if "density" not in kwargs:
            raise ValueError("pattern 'piecewise' needs a density, e.g. 'piecewise:0.25'")
        return Piecewise(**kwargs)
    raise ValueError(f"unknown pattern {name!r}; allowed: {', '.join(PATTERN_NAMES)}")
