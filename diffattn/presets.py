"""Presets: one YAML file per (model family x attention method), validated into frozen dataclasses.

A preset says which checkpoint to load, which sparse pattern to install, when attention stays
dense, and the generation settings the pattern was sized for::

    family: wan                      # one of FAMILIES: wan, hunyuan_video, ltx2, qwen_image, ...
    method: radial                   # dense | window | radial (must equal pattern.kind)
    model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers   # default checkpoint (hub id or local folder)
    pattern:                         # the pattern's constructor arguments (+ kind)
      kind: radial
      decay: 0.2
      sink: true
    schedule: {dense_steps: 12, dense_layers: 1, dense_last_steps: 0}
    generation: {height: 480, width: 832, num_frames: 81, num_inference_steps: 50, guidance_scale: 5.0}
    source: "where each setting comes from"

Files are read with ``yaml.safe_load``. Unknown keys anywhere, wrong types and bad values raise
:class:`PresetError` (a ``ValueError``) naming the file and the key, e.g.
``configs/wan-radial.yaml: schedule.dense_steps must be an int >= 0, got -1``. The pattern must
fit the token grid of the preset's own generation settings.

>>> from diffattn.presets import load_preset
>>> preset = load_preset("wan-radial")
>>> preset.build_pattern()
Radial(decay=0.2, sink=True, block=128)
>>> preset.token_grid()
(21, 30, 52)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .patterns.base import Pattern
from .patterns.dense import Dense
from .patterns.radial import Radial
from .patterns.spec import parse_pattern
from .patterns.window import SlidingWindow

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .integration.core import Schedule


def _schedule_class():
    # diffattn.integration imports diffusers; presets load without it until a schedule is built.
    from .integration.core import Schedule

    return Schedule

__all__ = [
    "FAMILIES",
    "FAMILY_GEOMETRY",
    "GENERATION_KEYS",
    "METHODS",
    "FamilyGeometry",
    "PatternConfig",
    "Preset",
    "PresetError",
    "configs_dir",
    "frames_key",
    "list_presets",
    "load_preset",
    "token_grid",
]


class PresetError(ValueError):
    """A preset file or value that cannot be used: the message names the file and the key."""


# --- model families ----------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyGeometry:
    """How a family turns pixels into transformer tokens.

    Attributes:
        vae_spatial: VAE downsampling of height and width.
        vae_temporal: VAE downsampling of time (None for image models): ``num_frames`` must be
            ``vae_temporal * k + 1`` and gives ``k + 1`` latent frames.
        patch: transformer patch ``(t, h, w)`` (Flux's 2x2 packing counts as a 2x2 patch).
    """

    vae_spatial: int
    vae_temporal: int | None
    patch: tuple[int, int, int]

    @property
    def is_video(self) -> bool:
        return self.vae_temporal is not None

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (VAE x patch)."""
        return self.vae_spatial * self.patch[1]


#: Per family: VAE compression and transformer patch size (the released checkpoints' configs).
FAMILY_GEOMETRY: Mapping[str, FamilyGeometry] = {
    "wan": FamilyGeometry(8, 4, (1, 2, 2)),            # AutoencoderKLWan, WanTransformer3DModel patch (1, 2, 2)
    "hunyuan_video": FamilyGeometry(8, 4, (1, 2, 2)),  # patch_size 2, patch_size_t 1
    "cogvideox": FamilyGeometry(8, 4, (1, 2, 2)),      # CogVideoX 1.0: patch_size 2, no temporal patch
    "flux": FamilyGeometry(8, None, (1, 2, 2)),        # 8x VAE, latents packed 2x2
    "sd3": FamilyGeometry(8, None, (1, 2, 2)),         # 8x VAE, patch_size 2
    "ltx": FamilyGeometry(32, 8, (1, 1, 1)),           # LTX-Video VAE 32x / 8x, patch 1
    "wan_vace": FamilyGeometry(8, 4, (1, 2, 2)),       # Wan's VAE and patch (WanVACETransformer3DModel)
    "wan_animate": FamilyGeometry(8, 4, (1, 2, 2)),    # Wan's; the grid is the frames behind the reference frame
    "skyreels_v2": FamilyGeometry(8, 4, (1, 2, 2)),    # Wan's VAE and patch (SkyReelsV2Transformer3DModel)
    "hunyuan_video15": FamilyGeometry(16, 4, (1, 1, 1)),  # AutoencoderKLHunyuanVideo15 16x / 4x, patch 1
    "ltx2": FamilyGeometry(32, 8, (1, 1, 1)),          # LTX-2 video VAE 32x / 8x, patch 1
    "kandinsky5": FamilyGeometry(8, 4, (1, 2, 2)),     # HunyuanVideo's VAE, patch (1, 2, 2)
    "motif_video": FamilyGeometry(8, 4, (1, 2, 2)),    # Wan 2.1's VAE, patch_size 2, patch_size_t 1
    "qwen_image": FamilyGeometry(8, None, (1, 2, 2)),  # 8x VAE, latents packed 2x2
    "flux2": FamilyGeometry(8, None, (1, 2, 2)),       # 8x VAE, latents packed 2x2
    "mochi": FamilyGeometry(8, 6, (1, 2, 2)),          # AutoencoderKLMochi 8x / 6x, patch_size 2
    "cosmos": FamilyGeometry(8, 4, (1, 2, 2)),         # Cosmos-Predict2 / 2.5: Wan 2.1's VAE 8x / 4x, patch (1, 2, 2)
                                                       # (Cosmos 1.0's CV8x8x8 tokenizer is 8x / 8x)
    "z_image": FamilyGeometry(8, None, (1, 2, 2)),     # 8x VAE, patch_size 2
}

#: The model families presets and ``load_pipeline`` know: the integration adapters' names, with
#: Wan's variants (``wan_vace``, ``wan_animate``, ``skyreels_v2``: Wan's adapter, other pipelines
#: and sizes) told apart. MiniMax-H3 has an adapter but no preset (its modular pipeline is not a
#: ``DiffusionPipeline`` that ``load_pipeline`` builds).
FAMILIES: tuple[str, ...] = tuple(FAMILY_GEOMETRY)

#: The attention methods a preset can name; ``pattern.kind`` must be the same.
METHODS: tuple[str, ...] = ("dense", "window", "radial")

# Where a family's pipeline names a generation setting differently.
_FRAMES_KEY = {"wan_animate": "segment_frame_length"}   # WanAnimatePipeline generates segments of this length
_GUIDANCE_KEY = {
    "qwen_image": "true_cfg_scale",  # classifier-free guidance (guidance_scale is for guidance-distilled models)
    "hunyuan_video15": None,         # guidance comes with the checkpoint's guider component
    "motif_video": None,
}
_NUMBER_KEYS = ("guidance_scale", "true_cfg_scale")


def frames_key(family: str) -> str | None:
    """The ``pipe(...)`` argument that gives the number of frames (``num_frames``, or Wan Animate's
    ``segment_frame_length``); None for image families."""
    geometry = FAMILY_GEOMETRY.get(family)
    if geometry is None or not geometry.is_video:
        return None
    return _FRAMES_KEY.get(family, "num_frames")


def _generation_keys(family: str) -> tuple[str, ...]:
    guidance = _GUIDANCE_KEY.get(family, "guidance_scale")
    frames = frames_key(family)
    return ("height", "width", *([frames] if frames else []), "num_inference_steps", *([guidance] if guidance else []))


#: Per family: the generation keys a preset has (all of them) -- keyword arguments of that
#: family's diffusers pipeline ``__call__``. Image families have no ``num_frames``; Wan Animate
#: has ``segment_frame_length`` instead; Qwen-Image's guidance is ``true_cfg_scale``; HunyuanVideo
#: 1.5 and Motif-Video take their guidance from the checkpoint's guider (no guidance key).
GENERATION_KEYS: Mapping[str, tuple[str, ...]] = {family: _generation_keys(family) for family in FAMILY_GEOMETRY}


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def token_grid(family: str, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
    """The transformer's visual token grid for a generation: ``(F, H, W)`` for video families,
    ``(H, W)`` for image families. ``num_frames`` is the value of the family's frames setting
    (``frames_key``: Wan Animate's ``segment_frame_length``, whose grid is the video frames behind
    the reference frame).

    Raises ValueError when the sizes are not what the family's pipeline accepts (height and
    width multiples of VAE x patch, ``num_frames = vae_temporal * k + 1``).

    >>> token_grid("wan", 480, 832, 81)
    (21, 30, 52)
    >>> token_grid("ltx", 512, 704, 161)
    (21, 16, 22)
    >>> token_grid("flux", 1024, 1024)
    (64, 64)
    """
    if family not in FAMILY_GEOMETRY:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    geo = FAMILY_GEOMETRY[family]
    multiple = geo.pixel_multiple
    for name, value in (("height", height), ("width", width)):
        if not _int(value) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} for {family}, got {value!r}")
    spatial = (height // multiple, width // (geo.vae_spatial * geo.patch[2]))
    if not geo.is_video:
        if num_frames is not None:
            raise ValueError(f"{family} generates images: num_frames must be None, got {num_frames!r}")
        return spatial
    t = geo.vae_temporal
    if not _int(num_frames) or num_frames < 1 or (num_frames - 1) % t:
        raise ValueError(f"{frames_key(family)} must be {t}k + 1 (1, {t + 1}, {2 * t + 1}, ...) for {family}, "
                         f"got {num_frames!r}")
    latent_frames = (num_frames - 1) // t + 1
    return (latent_frames // geo.patch[0], *spatial)


# --- where the shipped presets live ------------------------------------------------------


def configs_dir() -> Path:
    """The folder of the shipped preset YAMLs.

    Installed: the package data ``diffattn.configs`` (pyproject maps ``diffattn.configs`` to
    ``configs/`` and ships ``*.yaml``). In a source checkout that does not map it yet: the
    ``configs/`` folder beside the ``diffattn`` package.
    """
    try:
        spec = importlib.util.find_spec("diffattn.configs")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location)
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir() and (checkout.parent / "pyproject.toml").is_file():
        return checkout
    raise FileNotFoundError(
        "diffattn's preset folder was not found: neither the package data diffattn.configs nor a source "
        f"checkout's configs/ ({checkout}); reinstall diffattn"
    )


def list_presets() -> list[str]:
    """Names of the shipped presets (``"wan-radial"``, ...), sorted.

    >>> "wan-radial" in list_presets()
    True
    """
    return sorted(path.stem for path in configs_dir().glob("*.yaml"))


# --- dataclasses --------------------------------------------------------------------------

# Per pattern kind: argument -> (required, check, description of what is allowed).
_PATTERN_ARGS: dict[str, dict[str, tuple[bool, Any, str]]] = {
    "dense": {},
    "window": {
        "window": (True, lambda v: v is None or (_int(v) and v >= 1) or (
            isinstance(v, (list, tuple)) and 1 <= len(v) <= 3 and all(x is None or (_int(x) and x >= 1) for x in v)),
            "a positive int, null (whole axis) or a list of 1-3 of them, one per grid axis"),
        "stride": (False, lambda v: (_int(v) and v >= 1) or (
            isinstance(v, (list, tuple)) and 1 <= len(v) <= 3 and all(_int(x) and x >= 1 for x in v)),
            "a positive int or a list of 1-3 positive ints"),
        "dilation": (False, lambda v: (_int(v) and v >= 1) or (
            isinstance(v, (list, tuple)) and 1 <= len(v) <= 3 and all(_int(x) and x >= 1 for x in v)),
            "a positive int or a list of 1-3 positive ints"),
        "tile": (False, lambda v: v is None or v is True or (_int(v) and v >= 1) or (
            isinstance(v, (list, tuple)) and 1 <= len(v) <= 3 and all(_int(x) and x >= 1 for x in v)),
            "null, true (the tile is the stride), a positive int or a list of 1-3 positive ints"),
    },
    "radial": {
        "decay": (True, lambda v: _number(v) and v > 0, "a number > 0"),
        "sink": (False, lambda v: isinstance(v, bool), "true or false"),
        "block": (False, lambda v: _int(v) and v >= 16 and not v & (v - 1), "a power of two >= 16"),
    },
}
_PATTERN_CLASSES = {"dense": Dense, "window": SlidingWindow, "radial": Radial}


@dataclass(frozen=True)
class PatternConfig:
    """A pattern as written in a preset: its ``kind`` and constructor arguments.

    Args:
        kind: ``"dense"``, ``"window"`` (``SlidingWindow``) or ``"radial"`` (``Radial``).
        options: the constructor arguments (lists become tuples; ``None`` in a window is a
            whole axis).

    >>> PatternConfig("window", {"window": [9, 15, None]}).build()
    SlidingWindow(window=(9, 15, None), stride=1, dilation=1)
    """

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in _PATTERN_ARGS:
            raise PresetError(f"pattern.kind must be one of {', '.join(_PATTERN_ARGS)}, got {self.kind!r}")
        if not isinstance(self.options, Mapping):
            raise PresetError(f"pattern options must be a mapping, got {type(self.options).__name__}")
        allowed = _PATTERN_ARGS[self.kind]
        for key, value in self.options.items():
            if key not in allowed:
                names = ", ".join(allowed) if allowed else "none"
                raise PresetError(f"pattern.{key} is not an argument of the {self.kind} pattern; allowed: {names}")
            _, check, what = allowed[key]
            if not check(value):
                raise PresetError(f"pattern.{key} must be {what}, got {value!r}")
        for key, (required, _, what) in allowed.items():
            if required and key not in self.options:
                raise PresetError(f"pattern.{key} is required for the {self.kind} pattern ({what})")
        options = {key: tuple(value) if isinstance(value, list) else value for key, value in self.options.items()}
        object.__setattr__(self, "options", options)
        try:
            self.build()
        except (ValueError, TypeError) as exc:
            raise PresetError(f"pattern: {exc}") from None

    def build(self) -> Pattern:
        """The pattern object (``Dense()``, ``SlidingWindow(...)``, ``Radial(...)``)."""
        return _PATTERN_CLASSES[self.kind](**self.options)

    def to_dict(self) -> dict[str, Any]:
        """As written in YAML: ``{"kind": ..., **options}`` with tuples as lists."""
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}

    @classmethod
    def from_pattern(cls, pattern: Pattern | str) -> "PatternConfig":
        """From a pattern object or its string form (``"window:*x8x8"``, ``"radial:0.2"``, ``"dense"``).

        >>> PatternConfig.from_pattern("radial:0.95,sink=false")
        PatternConfig(kind='radial', options={'decay': 0.95, 'sink': False, 'block': 128})
        """
        if isinstance(pattern, str):
            pattern = parse_pattern(pattern)
        if isinstance(pattern, Dense):
            return cls("dense", {})
        if isinstance(pattern, SlidingWindow):
            options = {"window": pattern.window, "stride": pattern.stride, "dilation": pattern.dilation}
            if pattern.tile is not None:
                options["tile"] = pattern.tile
            return cls("window", options)
        if isinstance(pattern, Radial):
            return cls("radial", {"decay": pattern.decay, "sink": pattern.sink, "block": pattern.block})
        raise TypeError(f"pattern must be Dense, SlidingWindow, Radial or a pattern string, got {type(pattern).__name__}")


_SCHEDULE_KEYS = ("dense_steps", "dense_layers", "dense_last_steps")
_TOP_KEYS = ("family", "method", "model", "pattern", "schedule", "generation", "source")
_REQUIRED_TOP_KEYS = ("family", "method", "model", "pattern", "generation")


@dataclass(frozen=True)
class Preset:
    """A validated preset (see the module docstring for the YAML schema).

    Attributes:
        family: model family (one of ``FAMILIES``).
        method: ``"dense"``, ``"window"`` or ``"radial"``; equals ``pattern.kind``.
        model: default checkpoint, a hub id (or a local folder).
        pattern: the pattern's kind and constructor arguments.
        schedule: dense warm-up steps / layers and dense final steps.
        generation: pipeline call settings: exactly ``GENERATION_KEYS[family]``.
        source: where each setting comes from.
        path: the YAML file it was read from (None when built in code).
    """

    family: str
    method: str
    model: str
    pattern: PatternConfig
    schedule: "Schedule" = field(default_factory=lambda: _schedule_class()())
    generation: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    path: Path | None = None

    def __post_init__(self):
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        where = self._where
        if self.family not in FAMILIES:
            raise PresetError(f"{where}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.method not in METHODS:
            raise PresetError(f"{where}: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise PresetError(f"{where}: model must be a non-empty string (a hub id or a folder), got {self.model!r}")
        if not isinstance(self.pattern, PatternConfig):
            raise PresetError(f"{where}: pattern must be a PatternConfig, got {type(self.pattern).__name__}")
        if self.pattern.kind != self.method:
            raise PresetError(f"{where}: pattern.kind ({self.pattern.kind!r}) must equal method ({self.method!r})")
        if not isinstance(self.schedule, _schedule_class()):
            raise PresetError(f"{where}: schedule must be a diffattn Schedule, got {type(self.schedule).__name__}")
        if not isinstance(self.source, str):
            raise PresetError(f"{where}: source must be a string, got {self.source!r}")
        object.__setattr__(self, "generation", self._checked_generation(self.generation, complete=True))
        steps = self.generation["num_inference_steps"]
        dense = self.schedule.dense_steps + self.schedule.dense_last_steps
        if dense > steps:
            raise PresetError(
                f"{where}: schedule.dense_steps + schedule.dense_last_steps ({dense}) exceed "
                f"generation.num_inference_steps ({steps})"
            )
        self._check_fits(self.generation)

    # --- helpers ---------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return _display(self.path) if self.path is not None else f"preset {self.family}-{self.method}"

    @property
    def name(self) -> str:
        """The file's stem (``"wan-radial"``), or ``family-method`` for a preset built in code."""
        return self.path.stem if self.path is not None else f"{self.family}-{self.method}"

    def _checked_generation(self, generation, complete: bool) -> dict[str, Any]:
        where = self._where
        if not isinstance(generation, Mapping):
            raise PresetError(f"{where}: generation must be a mapping, got {type(generation).__name__}")
        allowed = GENERATION_KEYS.get(self.family, ())
        out = {}
        for key, value in generation.items():
            if key not in allowed:
                extra = ""
                if key == "num_frames":
                    frames = frames_key(self.family)
                    extra = " (an image family: no num_frames)" if frames is None else f" (its frames setting is {frames})"
                raise PresetError(
                    f"{where}: generation.{key} is not a setting of {self.family}{extra}; allowed: {', '.join(allowed)}"
                )
            if key in _NUMBER_KEYS:
                if not _number(value) or value < 0:
                    raise PresetError(f"{where}: generation.{key} must be a number >= 0, got {value!r}")
                value = float(value)
            elif not _int(value) or value < 1:
                raise PresetError(f"{where}: generation.{key} must be an int >= 1, got {value!r}")
            out[key] = value
        if complete:
            missing = [key for key in allowed if key not in out]
            if missing:
                raise PresetError(f"{where}: generation.{missing[0]} is required; {self.family} presets set {', '.join(allowed)}")
        return {key: out[key] for key in allowed if key in out}

    def _grid(self, generation: Mapping[str, Any]) -> tuple[int, ...]:
        try:
            frames = frames_key(self.family)
            return token_grid(self.family, generation["height"], generation["width"],
                              generation.get(frames) if frames else None)
        except ValueError as exc:
            raise PresetError(f"{self._where}: generation: {exc}") from None

    def _check_fits(self, generation: Mapping[str, Any]) -> tuple[int, ...]:
        grid = self._grid(generation)
        try:
            self.build_pattern().validate(grid)
        except ValueError as exc:
            size = "x".join(str(generation[k]) for k in ("height", "width", frames_key(self.family)) if k in generation)
            raise PresetError(
                f"{self._where}: pattern does not fit the token grid {'x'.join(map(str, grid))} of {size}: {exc}"
            ) from None
        return grid

    # --- public ----------------------------------------------------------------------

    def build_pattern(self) -> Pattern:
        """The pattern object, e.g. ``Radial(decay=0.2)``."""
        return self.pattern.build()

    def token_grid(self, **overrides) -> tuple[int, ...]:
        """The token grid of the preset's generation settings (with ``overrides`` applied)."""
        return self._grid({**self.generation, **self._checked_generation(overrides, complete=False)})

    def call_kwargs(self, **overrides) -> dict[str, Any]:
        """Generation settings for ``pipe(prompt, **kwargs)`` with ``overrides`` (height, width,
        num_frames, num_inference_steps, guidance_scale) applied. Raises PresetError when an
        override is not a setting of the family or the pattern does not fit the resulting grid."""
        generation = {**self.generation, **self._checked_generation(overrides, complete=False)}
        self._check_fits(generation)
        return generation

    def schedule_kwargs(self) -> dict[str, int]:
        """``{"dense_steps": ..., "dense_layers": ..., "dense_last_steps": ...}`` for ``diffattn.apply``."""
        return {key: getattr(self.schedule, key) for key in _SCHEDULE_KEYS}

    def apply(self, target, *, impl: str = "auto"):
        """``diffattn.apply(target, self.build_pattern(), **schedule)``: returns the SparseHandle."""
        from .integration.apply import apply

        return apply(target, self.build_pattern(), impl=impl, **self.schedule_kwargs())

    def override(self, *, model: str | None = None, pattern: PatternConfig | Pattern | str | Mapping | None = None,
                 schedule: "Schedule | Mapping | None" = None, generation: Mapping | None = None) -> "Preset":
        """A new, validated preset with some settings changed.

        ``pattern`` replaces the pattern (``method`` follows its kind): a PatternConfig, a
        pattern object, a string such as ``"window:1x3x3"``, or a YAML-style mapping with
        ``kind``. ``schedule`` (a Schedule, or a mapping of some of its fields) and
        ``generation`` (a mapping of some settings) update the current values.

        >>> load_preset("wan-radial").override(pattern="window:3x9x9", schedule={"dense_steps": 0}).method
        'window'
        """
        changes: dict[str, Any] = {}
        if model is not None:
            changes["model"] = model
        if pattern is not None:
            if isinstance(pattern, Mapping):
                pattern = _pattern_config(dict(pattern), self._where)
            elif not isinstance(pattern, PatternConfig):
                try:
                    pattern = PatternConfig.from_pattern(pattern)
                except PresetError as exc:
                    raise PresetError(f"{self._where}: {exc}") from None
            changes["pattern"], changes["method"] = pattern, pattern.kind
        if schedule is not None:
            if isinstance(schedule, Mapping):
                schedule = _schedule({**self.schedule_kwargs(), **schedule}, self._where)
            changes["schedule"] = schedule
        if generation is not None:
            changes["generation"] = {**self.generation, **self._checked_generation(generation, complete=False)}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The preset as YAML-ready data (the file schema)."""
        return {
            "family": self.family,
            "method": self.method,
            "model": self.model,
            "pattern": self.pattern.to_dict(),
            "schedule": self.schedule_kwargs(),
            "generation": dict(self.generation),
            "source": self.source,
        }


# --- loading ------------------------------------------------------------------------------


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (``configs/wan-radial.yaml``)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _schedule(data, where: str) -> "Schedule":
    if not isinstance(data, Mapping):
        raise PresetError(f"{where}: schedule must be a mapping of {', '.join(_SCHEDULE_KEYS)}, got {data!r}")
    for key, value in data.items():
        if key not in _SCHEDULE_KEYS:
            raise PresetError(f"{where}: schedule.{key} is not a schedule setting; allowed: {', '.join(_SCHEDULE_KEYS)}")
        if not _int(value) or value < 0:
            raise PresetError(f"{where}: schedule.{key} must be an int >= 0, got {value!r}")
    return _schedule_class()(**data)


def _pattern_config(data, where: str) -> PatternConfig:
    if not isinstance(data, Mapping):
        raise PresetError(f"{where}: pattern must be a mapping with a kind (dense, window, radial), got {data!r}")
    data = dict(data)
    if "kind" not in data:
        raise PresetError(f"{where}: pattern.kind is required (one of {', '.join(_PATTERN_ARGS)})")
    kind = data.pop("kind")
    try:
        return PatternConfig(kind, data)
    except PresetError as exc:
        raise PresetError(f"{where}: {exc}") from None


def _resolve(name_or_path: str | os.PathLike) -> Path:
    if isinstance(name_or_path, os.PathLike):
        path = Path(name_or_path)
    elif isinstance(name_or_path, str) and name_or_path.strip():
        text = name_or_path.strip()
        looks_like_path = os.sep in text or "/" in text or text.endswith((".yaml", ".yml")) or os.path.exists(text)
        if not looks_like_path:
            path = configs_dir() / f"{text}.yaml"
            if not path.is_file():
                raise PresetError(f"unknown preset {text!r}; available: {', '.join(list_presets())} (or a path to a YAML file)")
            return path
        path = Path(text).expanduser()
    else:
        raise PresetError(f"preset must be a preset name like 'wan-radial' or a path to a YAML file, got {name_or_path!r}")
    if not path.is_file():
        raise PresetError(f"preset file {str(path)!r} does not exist; shipped presets: {', '.join(list_presets())}")
    return path


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """Read and validate a preset.

    Args:
        name_or_path: a shipped preset's name (``"wan-radial"``; see ``list_presets()``) or the
            path of a YAML file.

    Raises:
        PresetError (a ValueError): unknown name, missing file, invalid YAML, unknown keys,
            wrong types or bad values -- the message names the file and the key.
    """
    import yaml

    path = _resolve(name_or_path)
    where = _display(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PresetError(f"{where}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{where}: cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{where}: a preset must be a mapping with the keys {', '.join(_TOP_KEYS)}, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise PresetError(f"{where}: {key} is not a preset key; allowed: {', '.join(_TOP_KEYS)}")
    for key in _REQUIRED_TOP_KEYS:
        if key not in data:
            raise PresetError(f"{where}: {key} is required")
    for key in ("family", "method", "model"):
        if not isinstance(data[key], str):
            raise PresetError(f"{where}: {key} must be a string, got {data[key]!r}")
    source = data.get("source", "")
    if not isinstance(source, str):
        raise PresetError(f"{where}: source must be a string, got {source!r}")
    return Preset(
        family=data["family"],
        method=data["method"],
        model=data["model"],
        pattern=_pattern_config(data["pattern"], where),
        schedule=_schedule({} if data.get("schedule") is None else data["schedule"], where),
        generation=data["generation"],
        source=source.strip(),
        path=path.resolve(),
    )
