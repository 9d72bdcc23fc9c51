"""Reading a transformer call's arguments, which diffusers pipelines pass by keyword or by position."""

from __future__ import annotations


def call_argument(positions: dict[str, int], name: str, args: tuple, kwargs: dict, defaults: dict | None = None):
    """The call's argument ``name``: by keyword, else ``args[positions[name]]``, else
    ``defaults.get(name)`` (None without ``defaults``).

    >>> call_argument({"timestep": 1}, "timestep", ("x", 5), {})
    5
    >>> call_argument({"timestep": 1}, "timestep", ("x",), {"timestep": 7})
    7
    """
    if name in kwargs:
        return kwargs[name]
    position = positions[name]
    if len(args) > position:
        return args[position]
    return None if defaults is None else defaults.get(name)
