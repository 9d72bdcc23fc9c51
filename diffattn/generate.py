"""``diffattn generate``: prompts in, videos or images out, with sparse self-attention.

The pieces here are shared by ``diffattn generate``, ``diffattn compare`` and ``diffattn demo``:

- :func:`resolve_method` turns a pattern spec (``window:3x5x5``, ``radial:0.2``, ``dense``) or a
  preset name into a :class:`Method` (pattern + schedule);
- :func:`load_target` loads the pipeline: the embedded tiny Wan pipeline by default (trained on
  clips of coloured shapes; ``random_weights=True`` for the random-weight one, whose frames are
  noise), a local folder or hub id with ``--model``, or a preset's model through
  ``diffattn.pipelines.load_pipeline``;
- :func:`generation_settings` merges defaults, preset and command line into ``pipe(...)``
  keyword arguments and checks them;
- :func:`install` puts a method into the pipeline (diffusers' own processors for plain dense);
- :func:`run_once` runs one generation and measures it: total time, time per denoising step
  (``callback_on_step_end``), text encoding before the first transformer call, decoding after
  the last step, and the time spent in the self-attention modules (forward hooks on them);
  it records the token grid and stops at the first transformer call if the pattern does not
  fit that grid;
- :func:`write_outputs` writes MP4 / GIF / PNG and the JSON record beside them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_NOTE",
    "Method",
    "RunResult",
    "Target",
    "UserError",
    "effective_density",
    "generate",
    "generation_settings",
    "install",
    "load_target",
    "plan_outputs",
    "predict_grid",
    "read_prompts",
    "resolve_method",
    "run_once",
    "versions",
    "write_outputs",
]

#: ``--model`` value (and the default) naming the embedded tiny Wan pipeline.
EMBEDDED_MODEL = "embedded"
EMBEDDED_DESCRIPTION = ("embedded tiny Wan 2.1-style pipeline (DiT and VAE trained on clips of coloured shapes, "
                        "real MiniLM text encoder)")
EMBEDDED_RANDOM_DESCRIPTION = "embedded tiny Wan 2.1-style pipeline (random-weight DiT and VAE, real MiniLM text encoder)"
EMBEDDED_NOTE = ("embedded demonstration pipeline: a tiny DiT and VAE trained on clips of coloured shapes, for "
                 "prompts like 'a red circle moving right' (red/green/blue/yellow/white, circle/square/triangle, "
                 "moving left/right/up/down or standing still) at 256x256, 17 frames")
EMBEDDED_RANDOM_NOTE = "embedded demonstration pipeline with random DiT and VAE weights (--random-weights): the frames are noise"
#: The embedded pipeline's random weights (``random_weights``) are built from this seed; ``--seed`` seeds the noise.
EMBEDDED_WEIGHTS_SEED = 0
DEFAULT_PROMPT = "a red circle moving right"
OUTPUT_SUFFIXES = (".mp4", ".gif", ".png")
TIMINGS_NOTE = ("generate = the pipeline call (text encoding, denoising, decoding); steps[0] runs from the first "
                "transformer call to the end of step 0; self_attention = time inside the self-attention modules "
                "(projections, norms, RoPE, attention, output projection)")
#: Generation settings a preset or the command line may set (``pipe(...)`` keyword names).
SETTING_KEYS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_2",
                "true_cfg_scale", "segment_frame_length")  # the last two: presets of Qwen-Image / Wan Animate


class UserError(ValueError):
    """A bad request (argument, preset, model, output path): the CLI says it in one line."""


def versions() -> dict:
    """Versions of diffattn and the libraries a generation depends on."""
    import diffusers
    import torch

    from . import __version__

    info = {"diffattn": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}
    for name in ("transformers", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = "not installed"
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------------
# Methods and presets


@dataclasses.dataclass(frozen=True)
class Method:
    """A pattern and its dense schedule, with the name the user gave it.

    Attributes:
        label: what the user wrote (a pattern spec or a preset name).
        spec: the pattern as a spec string when it came from one, else ``repr(pattern)``.
        pattern: the diffattn pattern.
        schedule: a ``diffattn.Schedule`` (dense_steps, dense_layers, dense_last_steps).
        preset: the preset's name when the method came from one.
        preset_source: the preset's YAML file.
    """

    label: str
    spec: str
    pattern: Any
    schedule: Any
    preset: str | None = None
    preset_source: str | None = None
    model: str | None = None
    loaded_preset: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def plain_dense(self) -> bool:
        """Dense pattern: the run uses diffusers' own attention processors."""
        return bool(self.pattern.is_dense)

    def all_dense_reason(self, num_steps: int | None, num_layers: int | None = None) -> str | None:
        """Why this sparse method's schedule makes every attention call dense for ``num_steps``
        steps over ``num_layers`` blocks, or None when some call is sparse (or it is unknown)."""
        if self.plain_dense:
            return None
        s = self.schedule
        if num_steps and s.dense_steps + s.dense_last_steps >= num_steps:
            covered = f"dense_steps={s.dense_steps}" + (f" + dense_last_steps={s.dense_last_steps}"
                                                        if s.dense_last_steps else "")
            return f"{covered} >= the {num_steps} denoising steps of this run"
        if num_layers and s.dense_layers >= num_layers:
            return f"dense_layers={s.dense_layers} covers all {num_layers} transformer blocks"
        return None

    def record(self) -> dict:
        s = self.schedule
        return {"label": self.label, "pattern": self.spec, "pattern_repr": repr(self.pattern),
                "schedule": {"dense_steps": s.dense_steps, "dense_layers": s.dense_layers,
                             "dense_last_steps": s.dense_last_steps},
                "preset": self.preset, "preset_file": self.preset_source}


def _presets_module():
    try:
        from . import presets
    except ImportError as exc:
        raise UserError(f"presets are not available in this installation of diffattn ({exc})") from None
    return presets


def load_preset(name: str):
    """``diffattn.presets.load_preset(name)`` with its errors as :class:`UserError`."""
    presets = _presets_module()
    try:
        return presets.load_preset(name)
    except (ValueError, KeyError, FileNotFoundError, TypeError, OSError) as exc:
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        raise UserError(message if name in message else f"preset {name!r}: {message}") from None


def _schedule(base=None, **overrides):
    from .integration.core import Schedule

    values = {"dense_steps": 0, "dense_layers": 0, "dense_last_steps": 0}
    if base is not None:
        values.update({k: getattr(base, k) for k in values})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Schedule(**values)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def resolve_method(text: str | None = None, *, preset=None, preset_name: str | None = None,
                   allow_presets: bool = True, dense_steps: int | None = None, dense_layers: int | None = None,
                   dense_last_steps: int | None = None) -> Method:
    """A :class:`Method` from a pattern spec and/or a loaded preset.

    - ``text`` a pattern spec: that pattern; the schedule is the preset's if a preset is given
      (``--preset NAME --method SPEC``), else all sparse; the ``dense_*`` arguments override.
    - ``text`` None: the preset's pattern and schedule (dense when there is no preset).
    - ``text`` not a pattern spec and ``allow_presets``: tried as a preset name or path.

    Raises :class:`UserError` naming the spec when it is neither.
    """
    from .patterns import parse_pattern

    overrides = {"dense_steps": dense_steps, "dense_layers": dense_layers, "dense_last_steps": dense_last_steps}
    if text is None:
        if preset is None:
            from .patterns import Dense

            return Method("dense", "dense", Dense(), _schedule(**overrides))
        try:
            pattern = preset.build_pattern()
        except (ValueError, TypeError) as exc:
            raise UserError(f"preset {preset_name!r}: {exc}") from None
        spec = pattern_spec(pattern)
        label = preset_name or getattr(preset, "name", None) or spec
        return Method(label, spec, pattern, _schedule(getattr(preset, "schedule", None), **overrides),
                      preset=label, preset_source=_preset_file(preset),
                      model=getattr(preset, "model", None), loaded_preset=preset)
    try:
        pattern = parse_pattern(text)
    except ValueError as exc:
        if not _looks_like_preset(text):  # a known pattern name with bad options
            raise UserError(f"method {text!r}: {exc}") from None
        if not allow_presets:
            raise UserError(f"unknown method {text!r}: {exc}") from None
        try:
            presets = _presets_module()
        except UserError:
            raise UserError(f"unknown method {text!r}: {exc} (and presets are not available)") from None
        try:
            loaded = presets.load_preset(text)
        except (ValueError, KeyError, FileNotFoundError, TypeError, OSError) as preset_exc:
            reason = preset_exc.args[0] if isinstance(preset_exc, KeyError) and preset_exc.args else preset_exc
            raise UserError(f"unknown method {text!r}: not a pattern spec ({exc}) nor a preset ({reason})") from None
        return resolve_method(None, preset=loaded, preset_name=text, dense_steps=dense_steps,
                              dense_layers=dense_layers, dense_last_steps=dense_last_steps)
    if preset is None:
        return Method(text, text, pattern, _schedule(**overrides))
    return Method(text, text, pattern, _schedule(getattr(preset, "schedule", None), **overrides),
                  preset=preset_name, preset_source=_preset_file(preset))


def _preset_file(preset) -> str | None:
    path = getattr(preset, "path", None)
    return str(path) if path else None


def _looks_like_preset(text: str) -> bool:
    # A spec with a known pattern name and bad options is a bad spec, not a preset name.
    from .patterns.spec import PATTERN_NAMES

    return text.strip().partition(":")[0].strip().lower() not in PATTERN_NAMES or ":" not in text


def pattern_spec(pattern) -> str:
    """The short string form of a pattern (``parse_pattern`` reads it back), else its repr.

    >>> from diffattn import Radial, SlidingWindow
    >>> pattern_spec(SlidingWindow((9, 15, None))), pattern_spec(Radial(0.2, sink=False))
    ('window:9x15x*', 'radial:0.2,sink=false')
    """
    from .patterns import Dense, Radial, SlidingWindow, parse_pattern

    def sizes(value):
        items = value if isinstance(value, tuple) else (value,)
        return "x".join("*" if v is None else str(v) for v in items)

    if isinstance(pattern, Dense):
        spec = "dense"
    elif isinstance(pattern, SlidingWindow):
        spec = f"window:{sizes(pattern.window)}"
        if pattern.stride != 1:
            spec += f",stride={sizes(pattern.stride)}"
        if pattern.dilation != 1:
            spec += f",dilation={sizes(pattern.dilation)}"
    elif isinstance(pattern, Radial):
        spec = f"radial:{pattern.decay:g}"
        if not pattern.sink:
            spec += ",sink=false"
        if pattern.block != 128:
            spec += f",block={pattern.block}"
    else:
        return repr(pattern)
    try:
        return spec if parse_pattern(spec) == pattern else repr(pattern)
    except ValueError:
        return repr(pattern)


# --------------------------------------------------------------------------------------------
# Loading the pipeline


@dataclasses.dataclass
class Target:
    """A loaded pipeline and what to say about it."""

    pipe: Any
    model: str
    embedded: bool
    description: str
    device: str
    dtype: str
    load_s: float
    defaults: dict
    random_weights: bool = False

    @property
    def note(self) -> str | None:
        if not self.embedded:
            return None
        return EMBEDDED_RANDOM_NOTE if self.random_weights else EMBEDDED_NOTE

    def record(self) -> dict:
        out = {"model": self.model, "description": self.description, "embedded": self.embedded,
               "device": self.device, "dtype": self.dtype}
        if self.embedded:
            out["random_weights"] = self.random_weights
            if self.random_weights:
                out["weights_seed"] = EMBEDDED_WEIGHTS_SEED
        return out


def is_embedded(model: str | None) -> bool:
    return model is None or str(model).strip().lower() in ("", EMBEDDED_MODEL, "embedded-wan", "embedded_wan")


def _torch_dtype(name: str, embedded: bool, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if (device.startswith("cuda") and not embedded) else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"--dtype must be one of auto, float32, bfloat16, float16, got {name!r}")
    return table[name]


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available on this machine")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def load_target(model: str | None = None, preset=None, *, device: str | None = None, dtype: str = "auto",
                log: Callable = print, random_weights: bool = False) -> Target:
    """Load the pipeline to generate with.

    - ``model`` None / ``"embedded"`` (and no preset model): the embedded tiny Wan pipeline with
      its trained weights, or (``random_weights``) random weights seeded with 0, whose frames are
      noise.
    - a preset: ``diffattn.pipelines.load_pipeline(model, preset, torch_dtype=..., device=...)``
      (the preset's model unless ``model`` overrides it).
    - otherwise ``diffusers.DiffusionPipeline.from_pretrained(model)`` (a local folder or a hub id).
    """
    device = _device(device)
    if preset is not None and model is None:
        model = getattr(preset, "model", None)
    embedded = is_embedded(model)
    if random_weights and not embedded:
        raise UserError(f"--random-weights is for the embedded pipeline, not for --model {model!r}")
    torch_dtype = _torch_dtype(dtype, embedded, device)
    dtype_name = str(torch_dtype).replace("torch.", "")
    t0 = time.perf_counter()
    if embedded:
        from .pipelines import EMBEDDED_DEFAULTS, build_embedded_wan_pipeline

        description = EMBEDDED_RANDOM_DESCRIPTION if random_weights else EMBEDDED_DESCRIPTION
        log(f"model: {description}" + (" -- the frames are noise" if random_weights else ""))
        with quiet_transformers():
            pipe = build_embedded_wan_pipeline(seed=EMBEDDED_WEIGHTS_SEED, device=device, dtype=torch_dtype,
                                               random_weights=random_weights)
        defaults = dataclasses.asdict(EMBEDDED_DEFAULTS)
        return Target(pipe, EMBEDDED_MODEL, True, description, device, dtype_name,
                      time.perf_counter() - t0, defaults, random_weights)
    model = str(model)
    log(f"model: {model}" + (f" (preset {getattr(preset, 'name', '?')})" if preset is not None else ""))
    from .pipelines import load_pipeline

    try:
        # Checks model_index.json (a diffusers pipeline with a transformer diffattn supports, of
        # the preset's family) before loading any weights. Nothing is installed here: the caller
        # installs the method it resolved from the preset and the command line.
        pipe, _handle = load_pipeline(model, family=getattr(preset, "family", None), torch_dtype=torch_dtype,
                                      device=device)
    except UserError:
        raise
    except (OSError, ValueError, TypeError, ImportError, RuntimeError, NotImplementedError) as exc:
        raise UserError(f"cannot load model {model!r}: {_one_line(exc)}") from None
    return Target(pipe, model, False, f"{type(pipe).__name__} from {model}", device, dtype_name,
                  time.perf_counter() - t0, {})


class quiet_transformers:
    """No "Loading weights" progress bar from transformers while the embedded pipeline builds
    (it loads MiniLM from a local folder in milliseconds)."""

    def __enter__(self):
        try:
            from transformers.utils import logging as tlog

            self._tlog = tlog
            self._was = tlog.is_progress_bar_enabled()
            tlog.disable_progress_bar()
        except Exception:  # pragma: no cover - other transformers versions
            self._tlog = None
        return self

    def __exit__(self, *exc):
        if self._tlog is not None and self._was:
            self._tlog.enable_progress_bar()
        return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:397] + "..."


# --------------------------------------------------------------------------------------------
# Settings


def _call_parameters(pipe) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic pipelines
        return set()


def generation_settings(target: Target, preset=None, **cli) -> dict:
    """``pipe(...)`` keyword arguments: the target's defaults, then the preset's ``generation``
    (not for the embedded pipeline: a preset's sizes are for its real model), then the command line (``height``, ``width``, ``num_frames``, ``num_inference_steps``,
    ``guidance_scale``, ``guidance_scale_2``; None = not given). Checked; raises :class:`UserError`."""
    settings = dict(target.defaults)
    if preset is not None and not target.embedded:  # the preset's sizes are for its real model
        generation = dict(getattr(preset, "generation", None) or {})
        settings.update({k: v for k, v in generation.items() if k in SETTING_KEYS and v is not None})
    settings.update({k: v for k, v in cli.items() if v is not None})
    for key in ("height", "width", "num_frames", "num_inference_steps", "segment_frame_length"):
        if key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 1):
            raise UserError(f"{key} must be a positive int, got {settings[key]!r}")
    for key in ("guidance_scale", "guidance_scale_2", "true_cfg_scale"):
        if key in settings:
            g = settings[key]
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise UserError(f"{key} must be a number >= 0, got {g!r}")
            settings[key] = float(g)
    if "guidance_scale_2" in settings and getattr(getattr(target.pipe, "config", None), "boundary_ratio", None) is None:
        raise UserError(f"guidance_scale_2 (--guidance-2) is for two-expert pipelines (Wan 2.2 with boundary_ratio); "
                        f"{type(target.pipe).__name__} has one transformer")
    if target.embedded:
        from .pipelines import EmbeddedDefaults

        try:
            EmbeddedDefaults(**settings)
        except (ValueError, TypeError) as exc:
            raise UserError(f"the embedded pipeline: {exc}") from None
    else:
        params = _call_parameters(target.pipe)
        if params and "num_frames" not in params:
            if settings.get("num_frames", 1) != 1:
                raise UserError(f"{type(target.pipe).__name__} makes images: --frames must be 1 or left out, "
                                f"got {settings['num_frames']}")
            settings.pop("num_frames", None)
        if params:
            unknown = [k for k in settings if k not in params]
            for key in unknown:
                settings.pop(key)
    return settings


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """The prompts: ``--prompt``, or ``--prompts FILE`` (one per line; blank lines and lines
    starting with ``#`` are skipped), or the default prompt."""
    if prompt is not None and prompts_file is not None:
        raise UserError("give either --prompt or --prompts FILE, not both")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts: no file at {str(path)!r}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise UserError(f"--prompts: {str(path)!r} holds no prompts (one per line)")
        return found
    if prompt is not None:
        if not prompt.strip():
            raise UserError("--prompt is empty")
        return [prompt]
    return [DEFAULT_PROMPT]


# --------------------------------------------------------------------------------------------
# Geometry


def _transformers(pipe) -> dict:
    import torch

    from .integration.apply import TRANSFORMER_ATTRS

    return {name: getattr(pipe, name) for name in TRANSFORMER_ATTRS
            if isinstance(getattr(pipe, name, None), torch.nn.Module)}


def _adapter(transformer):
    try:
        from .integration.apply import _adapter_for

        return _adapter_for(transformer)
    except ValueError:
        return None


def predict_grid(pipe, settings: dict) -> tuple | None:
    """The self-attention token grid of a generation, when it can be told from the pipeline's
    configuration alone (Wan-style video pipelines: VAE compression and patch size); else None
    (the grid is then checked at the first transformer call)."""
    transformers = _transformers(pipe)
    if not transformers:
        return None
    transformer = next(iter(transformers.values()))
    patch = getattr(getattr(transformer, "config", None), "patch_size", None)
    ts = getattr(pipe, "vae_scale_factor_temporal", None)
    ss = getattr(pipe, "vae_scale_factor_spatial", None)
    if type(transformer).__name__ != "WanTransformer3DModel" or not patch or not ts or not ss:
        return None
    if not all(k in settings for k in ("height", "width", "num_frames")):
        return None
    pt, ph, pw = patch
    frames = (settings["num_frames"] - 1) // ts + 1
    return (frames // pt, settings["height"] // ss // ph, settings["width"] // ss // pw)


def check_fits(method: Method, grid: tuple | None) -> None:
    """Raise :class:`UserError` when ``method``'s pattern cannot run on ``grid``."""
    if grid is None or method.pattern.is_dense:
        return
    try:
        method.pattern.validate(tuple(grid))
    except ValueError as exc:
        raise UserError(f"method {method.label!r} does not fit the token grid {'x'.join(map(str, grid))} "
                        f"of this generation: {exc}") from None


def attended_fraction(method: Method, layout) -> float | None:
    """Fraction of token pairs the method's pattern attends at one sparse call; None without a
    layout or for a dynamic pattern (its blocks depend on the data)."""
    if layout is None:
        return None
    return 1.0 if method.pattern.is_dense else method.pattern.attended_fraction(layout)


def effective_density(method: Method, layout, num_steps: int, layers: list[int]) -> float | None:
    """Fraction of token pairs attended over all (step, layer) self-attention calls, with the
    schedule's dense steps and layers counted as 1."""
    density = attended_fraction(method, layout)
    if density is None or not layers or not num_steps:
        return None
    s = method.schedule
    total = 0.0
    for step in range(num_steps):
        for layer in layers:
            dense = (layer < s.dense_layers or step < s.dense_steps
                     or (s.dense_last_steps and step >= num_steps - s.dense_last_steps))
            total += 1.0 if dense else density
    return total / (num_steps * len(layers))


def _layers(pipe) -> list[int]:
    """Layer indices of the self-attention processors diffattn would replace (first transformer)."""
    transformers = _transformers(pipe)
    if not transformers:
        return []
    transformer = next(iter(transformers.values()))
    adapter = _adapter(transformer)
    if adapter is None:
        return []
    installed = _installed_cores(transformer)
    if installed:
        return sorted({core.layer for core in installed.values()})
    names = adapter.sparse_processor_names(transformer)
    if hasattr(adapter, "processor_layers"):
        return sorted(set(adapter.processor_layers(transformer)))
    return list(range(len(names)))


def _installed_cores(transformer) -> dict:
    """``{processor name: SparseAttentionCore}`` of the processors diffattn has installed in
    ``transformer`` (empty when none). Most adapters' ``sparse_processor_names`` accept only
    diffusers' own processors, so with diffattn's in place the names come from here."""
    from .integration.core import SparseAttentionCore
    from .integration.processors import attn_processors

    return {name: proc.core for name, proc in attn_processors(transformer).items()
            if isinstance(getattr(proc, "core", None), SparseAttentionCore)}


# --------------------------------------------------------------------------------------------
# Running


def install(pipe, method: Method, impl: str = "auto", cache=None):
    """Put ``method`` into ``pipe``; returns the ``SparseHandle`` (None: diffusers' processors).

    A dense pattern runs on diffusers' own processors (anything diffattn installed is removed).
    """
    from .integration import apply, remove

    if method.plain_dense:
        try:
            remove(pipe)
        except ValueError:
            pass
        return None
    try:
        return apply(pipe, method.pattern, dense_steps=method.schedule.dense_steps,
                     dense_layers=method.schedule.dense_layers, dense_last_steps=method.schedule.dense_last_steps,
                     impl=impl, cache=cache)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UserError(str(exc)) from None


def uninstall(pipe) -> None:
    from .integration import remove

    try:
        remove(pipe)
    except ValueError:
        pass


@dataclasses.dataclass
class RunResult:
    """One generation: frames ``[F, H, W, 3]`` floats in [0, 1], the token layout of its
    self-attention, and timings in seconds."""

    frames: np.ndarray | None
    layout: Any
    timings: dict


class _Instrument:
    """Hooks around one generation: the first transformer call (start of denoising, token
    layout, pattern check) and the self-attention modules (time spent in them)."""

    def __init__(self, pipe, check: Method | None):
        import torch

        self.pipe = pipe
        self.check = check
        self.handles = []
        self.layout = None
        self.first_call = None
        self.cuda = False
        self.attn_cpu_s = 0.0
        self.events = []
        self._starts = {}
        self.attn_modules = 0
        for name, transformer in _transformers(pipe).items():
            adapter = _adapter(transformer)
            self.handles.append(transformer.register_forward_pre_hook(self._pre_transformer(adapter), with_kwargs=True))
            if adapter is None:
                continue
            try:
                self.cuda = next(transformer.parameters()).is_cuda
            except StopIteration:  # pragma: no cover
                pass
            modules = dict(transformer.named_modules())
            for proc_name in list(_installed_cores(transformer)) or adapter.sparse_processor_names(transformer):
                module = modules.get(proc_name.rsplit(".processor", 1)[0])
                if module is None:
                    continue
                self.handles.append(module.register_forward_pre_hook(self._attn_start))
                self.handles.append(module.register_forward_hook(self._attn_end))
                self.attn_modules += 1
        self.timed = self.attn_modules > 0
        self._torch = torch

    def _pre_transformer(self, adapter):
        def hook(module, args, kwargs):
            if self.first_call is None:
                self.first_call = time.perf_counter()
            if self.layout is None and adapter is not None:
                try:
                    self.layout = adapter.token_layout(module, args, kwargs)
                except Exception:  # the grid is information here; diffattn's own hook is strict
                    self.layout = None
                if self.layout is not None and self.check is not None:
                    check_fits(self.check, self.layout.grid)
            return None

        return hook

    def _attn_start(self, module, args):
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            self._starts[id(module)] = event
        else:
            self._starts[id(module)] = time.perf_counter()

    def _attn_end(self, module, args, output):
        start = self._starts.pop(id(module), None)
        if start is None:
            return
        if self.cuda:
            end = self._torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))
        else:
            self.attn_cpu_s += time.perf_counter() - start

    def attention_seconds(self) -> float | None:
        if not self.timed:
            return None
        if self.cuda:
            self._torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events) / 1000.0
        return self.attn_cpu_s

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _sync(pipe):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_once(pipe, prompt: str, seed: int, settings: dict, *, device: str = "cpu", check: Method | None = None,
             progress: bool = True, output_type: str = "np", exclude_time: Callable[[], float] | None = None) -> RunResult:
    """Generate once and measure it.

    ``check``: a method whose pattern must fit the token grid; checked at the first
    transformer call (raises :class:`UserError` there). ``exclude_time``: returns seconds spent
    in extra work inside the run (attention probes) to subtract from the timings.
    ``output_type="latent"`` skips decoding (warm-up runs) and returns no frames.
    """
    import torch

    pipe.set_progress_bar_config(disable=not progress)  # kept: a log shows the last step too
    generator = torch.Generator(device=device).manual_seed(seed)
    instrument = _Instrument(pipe, check)
    params = _call_parameters(pipe)
    step_ends: list[float] = []
    kwargs = dict(settings)
    if "callback_on_step_end" in params:
        def on_step_end(pipeline, step, timestep, callback_kwargs):
            _sync(pipeline)
            step_ends.append(time.perf_counter())
            return {}

        kwargs["callback_on_step_end"] = on_step_end
    try:
        _sync(pipe)
        t0 = time.perf_counter()
        output = pipe(prompt, generator=generator, output_type=output_type, **kwargs)
        _sync(pipe)
        t1 = time.perf_counter()
        attention_s = instrument.attention_seconds()
    finally:
        instrument.close()
    extra = exclude_time() if exclude_time is not None else 0.0
    timings: dict[str, Any] = {"generate": t1 - t0 - extra}
    if instrument.first_call is not None:
        timings["before_denoising"] = instrument.first_call - t0
    if step_ends and instrument.first_call is not None:
        marks = [instrument.first_call, *step_ends]
        steps = [b - a for a, b in zip(marks, marks[1:])]
        timings["denoising"] = step_ends[-1] - instrument.first_call - extra
        timings["steps"] = steps
        timings["after_denoising"] = t1 - step_ends[-1]
    if attention_s is not None:
        timings["self_attention"] = attention_s - extra
    if extra:
        timings["excluded_probe"] = extra
    frames = None
    if output_type != "latent":
        frames = _frames_of(output)
    return RunResult(frames, instrument.layout, timings)


def _frames_of(output) -> np.ndarray:
    if hasattr(output, "frames"):
        frames = output.frames[0]
    elif hasattr(output, "images"):
        frames = np.asarray(output.images[0])[None]
    else:  # pragma: no cover - unknown pipeline output
        raise UserError(f"the pipeline returned {type(output).__name__} without frames or images")
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        frames = frames.astype(np.float32) / 255.0
    if frames.ndim == 3:
        frames = frames[None]
    return frames.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Writing


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of ``text``.

    >>> slug("A red fox, running!")
    'a-red-fox-running'
    """
    out = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return out[:limit].strip("-.") or "output"


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """Where one generation goes: files (by extension) or a folder plus a stem."""

    files: tuple
    folder: Path | None
    stem: str

    def json_path(self) -> Path:
        if self.folder is not None:
            return self.folder / f"{self.stem}.json"
        return self.files[0].with_suffix(".json")


def check_writable(folder: Path, what: str = "--out") -> None:
    """Write and delete a probe file in ``folder``, or in its nearest existing parent when it does not
    exist yet (nothing is left behind), so an output that cannot be written fails now, with a clear
    :class:`UserError`, not after the generation."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what}: cannot write in folder {str(folder)!r}: {str(existing)!r} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".diffattn-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{what}: cannot write in folder {str(folder)!r} ({exc.strerror or _one_line(exc)})") from None


def plan_outputs(out: list[str] | None, prompts: list[str], default_folder: str = "outputs/generate") -> list[OutputPlan]:
    """One :class:`OutputPlan` per prompt.

    ``out``: files ending in ``.mp4``, ``.gif``, ``.png`` (one or more), or one folder. With
    several prompts, files get ``-001``, ``-002``, ... before the extension; in a folder each
    prompt is named ``NNN-<prompt>``.
    """
    entries = [Path(p) for p in (out or [default_folder])]
    files = [p for p in entries if p.suffix.lower() in OUTPUT_SUFFIXES]
    others = [p for p in entries if p.suffix.lower() not in OUTPUT_SUFFIXES]
    for p in others:
        if p.suffix and not p.is_dir():
            raise UserError(f"--out {str(p)!r}: unsupported extension {p.suffix!r}; use {', '.join(OUTPUT_SUFFIXES)} "
                            "or a folder")
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {str(p)!r} exists and is not a folder")
    if others and (files or len(others) > 1):
        raise UserError("--out takes one folder, or one or more files (.mp4, .gif, .png), not a mix")
    if len({str(p.with_suffix("")) for p in files}) > 1:
        raise UserError("--out files must share one name with different extensions, e.g. out/fox.mp4 out/fox.gif")
    plans = []
    many = len(prompts) > 1
    for i, prompt in enumerate(prompts, start=1):
        if others:
            stem = f"{i:03d}-{slug(prompt)}" if many else slug(prompt)
            plans.append(OutputPlan((), others[0], stem))
        else:
            if many:
                paths = tuple(p.with_name(f"{p.stem}-{i:03d}{p.suffix}") for p in files)
            else:
                paths = tuple(files)
            plans.append(OutputPlan(paths, None, paths[0].stem))
    for folder in {plan.folder or path.parent for plan in plans for path in (plan.files or (None,))}:
        check_writable(folder)
    return plans


def write_outputs(frames: np.ndarray, plan: OutputPlan, record: dict, fps: float = 16) -> dict:
    """Write the frames as ``plan`` says and the JSON record beside them; returns
    ``{kind: path}`` of everything written (the record's ``outputs`` too)."""
    from .video import write_png_grid, write_video

    written: dict[str, str] = {}
    if plan.folder is not None:
        plan.folder.mkdir(parents=True, exist_ok=True)
        if frames.shape[0] == 1:
            targets = [plan.folder / f"{plan.stem}.png"]
        else:
            targets = [plan.folder / f"{plan.stem}.mp4", plan.folder / f"{plan.stem}-frames.png"]
    else:
        targets = list(plan.files)
    for path in targets:
        suffix = path.suffix.lower()
        if suffix == ".png":
            if frames.shape[0] == 1:
                write_png_grid(frames, path, padding=0)
                written["png"] = str(path)
            else:
                write_png_grid(frames, path)
                written["png" if "png" not in written else f"png:{path.name}"] = str(path)
        else:
            write_video(frames, path, fps=fps)
            written[suffix[1:]] = str(path)
    json_path = plan.json_path()
    record = dict(record, outputs=written)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_jsonable(record), indent=1, allow_nan=False) + "\n")
    written["json"] = str(json_path)
    return written


def guarded_record(parts: list[tuple[str, Callable[[], dict]]], log: Callable = print) -> dict:
    """The merged dicts of ``parts`` (``(name, fn)``); a part that raises is logged and listed under
    ``record_errors`` instead, so one failing record field never costs the generated output."""
    record: dict = {}
    errors: dict = {}
    for name, part in parts:
        try:
            record.update(part())
        except Exception as exc:  # noqa: BLE001 - any failure of a record field is reported, not raised
            errors[name] = f"{type(exc).__name__}: {_one_line(exc)}"
            log(f"warning: could not record {name}: {errors[name]}")
    if errors:
        record["record_errors"] = errors
    return record


def all_dense_record(method: Method, num_steps: int | None, layers: list[int], log: Callable | None = None) -> dict:
    """``{"all_dense": reason or None}`` for the JSON record; logs a warning when a sparse method's
    schedule makes the whole run dense (a preset's warm-up longer than a short run, say)."""
    reason = method.all_dense_reason(num_steps, len(layers) or None)
    if reason and log is not None:
        log(f"warning: method {method.label!r} runs dense everywhere: {reason}; lower the dense schedule "
            "(--dense-steps / --dense-last-steps / --dense-layers) or raise --steps")
    return {"all_dense": reason}


def _jsonable(value):
    """JSON-safe copy: non-finite floats become None, tuples lists, paths strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating,)):
        return _jsonable(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _round_timings(timings: dict) -> dict:
    out = {}
    for key, value in timings.items():
        if isinstance(value, list):
            out[key] = [round(v, 4) for v in value]
        elif isinstance(value, float):
            out[key] = round(value, 4)
        else:
            out[key] = value
    return out


def layout_record(method: Method, layout, num_steps: int | None, layers: list[int]) -> dict:
    if layout is None:
        return {"token_grid": None, "text_tokens": None, "seq_len": None, "attended_fraction": None,
                "effective_attended_fraction": None}
    return {"token_grid": list(layout.grid), "text_tokens": layout.text_len, "seq_len": layout.seq_len,
            "attended_fraction": attended_fraction(method, layout),
            "effective_attended_fraction": effective_density(method, layout, num_steps or 0, layers)}


def frames_record(frames: np.ndarray, fps: float) -> dict:
    """Frame count, size and frame rate (None for a single image) of written frames ``[F, H, W, 3]``."""
    return {"frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
            "fps": fps if frames.shape[0] > 1 else None}


def cache_record(handle) -> dict:
    """The step cache's settings and memory for the JSON record."""
    cache = getattr(handle, "cache", None)
    if cache is None:
        return {"enabled": False, "memory_bytes": 0}
    return {"enabled": True, "config": {"refresh_every": cache.refresh_every, "lse_gate": cache.lse_gate,
                                        "cosine_gate": cache.cosine_gate,
                                        "store_dtype": str(cache.store_dtype).replace("torch.", "") if cache.store_dtype else None,
                                        "offload": cache.offload, "light": cache.light},
            "memory_bytes": handle.peak_cache_bytes(),
            "note": "peak bytes held by the step cache during the generation (every layer and CFG branch)"}


# --------------------------------------------------------------------------------------------
# The command


def generate(*, prompts: list[str], seed: int = 0, method: Method, model: str | None = None, preset=None,
             preset_name: str | None = None, settings_cli: dict | None = None, out: list[str] | None = None,
             impl: str = "auto", device: str | None = None, dtype: str = "auto", fps: float | None = None,
             progress: bool = True, log: Callable = print, cache=None, upscale: float | None = None,
             highres=None, ulysses: int = 1, ulysses_anything: bool = False,
             random_weights: bool = False) -> list[dict]:
    """Generate one output per prompt; returns the JSON records written.

    ``random_weights``: the embedded pipeline with random weights (its frames are noise).

    ``upscale``: training-free high resolution (``diffattn.pipelines.highres``): each output is
    generated at the native size, upscaled by this factor and refined with FreeSwim's window and
    full branches (``highres``: a ``HighResConfig``, default FreeSwim's); ``method`` must be dense.

    ``ulysses``: run under diffusers' Ulysses context parallelism over this many processes (one per
    GPU, started by ``torchrun``); every rank generates with the same prompt and seed, rank 0 alone
    logs and writes the outputs, whose JSON gets the all-to-all traffic per layer.
    """
    from .attention import choose_impl

    t_start = time.perf_counter()
    plans = plan_outputs(out, prompts)
    if upscale is not None and ulysses != 1:
        raise UserError("upscale (FreeSwim) does not run under Ulysses context parallelism yet; use ulysses=1")
    if upscale is not None and (not method.plain_dense or cache is not None):
        raise UserError("--upscale runs its own attention on the high-resolution pass: use a dense method and no --cache")
    parallel = None
    if ulysses != 1:
        parallel = _join_ulysses(ulysses)
        device = str(parallel.device)
        if not parallel.is_main:
            log, progress = (lambda *a, **k: None), False
    target = load_target(model, preset, device=device, dtype=dtype, log=log, random_weights=random_weights)
    settings = generation_settings(target, preset, **(settings_cli or {}))
    if upscale is not None:
        from .upscale import generate_highres_outputs

        records = generate_highres_outputs(target, prompts, plans, settings, seed=seed, upscale=upscale,
                                           config=highres, fps=fps, progress=progress, log=log)
        log(f"done in {time.perf_counter() - t_start:.1f} s")
        return records
    check_fits(method, predict_grid(target.pipe, settings))
    if cache is not None and method.plain_dense:
        raise UserError("--cache needs a sparse method: dense attention has nothing to reuse")
    handle = install(target.pipe, method, impl, cache)
    if parallel is not None:
        _enable_ulysses(target.pipe, ulysses, ulysses_anything)
    log(f"method: {method.label}" + (f" -> {handle}" if handle is not None else " (diffusers' own attention processors)"))
    layers = _layers(target.pipe)
    all_dense_record(method, settings.get("num_inference_steps"), layers, log)
    try:
        impl_used = choose_impl(impl, target.device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    fps = 16.0 if fps is None else float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise UserError(f"--fps must be a positive number, got {fps}")
    records = []
    for i, (prompt, plan) in enumerate(zip(prompts, plans), start=1):
        if len(prompts) > 1:
            log(f"[{i}/{len(prompts)}] {prompt}")
        result = run_once(target.pipe, prompt, seed, settings, device=target.device, check=method, progress=progress)
        frames = result.frames
        steps_run = settings.get("num_inference_steps") or len(result.timings.get("steps", []))
        record = {"tool": "diffattn generate", "note": target.note, "prompt": prompt, "seed": seed}
        record.update(guarded_record([
            ("model", lambda: {"model": target.record(), "preset": preset_name}),
            ("method", lambda: {"method": {**method.record(), **all_dense_record(method, steps_run, layers)},
                                "impl": impl,
                                "impl_used": f"{impl_used[0]} ({impl_used[1]})" if not method.plain_dense
                                else "diffusers' attention (dense)",
                                "settings": settings}),
            ("layout", lambda: layout_record(method, result.layout, steps_run, layers)),
            ("frames", lambda: frames_record(frames, fps)),
            ("cache", lambda: {"cache": cache_record(handle)}),
            ("parallel", lambda: {"parallel": parallel_record(target.pipe, parallel, result.layout)}),
            ("timings", lambda: {"timings_s": _round_timings({"load": target.load_s, **result.timings}),
                                 "timings_note": TIMINGS_NOTE}),
            ("versions", lambda: {"versions": versions()}),
        ], log))
        if parallel is not None and not parallel.is_main:
            records.append(record)
            continue
        written = write_outputs(frames, plan, record, fps=fps)
        record["outputs"] = written
        records.append(record)
        shown = ", ".join(v for k, v in written.items())
        log(f"wrote {shown} ({frames.shape[0]} frame{'s' if frames.shape[0] != 1 else ''} "
            f"{frames.shape[2]}x{frames.shape[1]}, generated in {result.timings['generate']:.1f} s)")
    if target.embedded:
        log("note: " + target.note)
    if parallel is not None:
        import torch.distributed

        torch.distributed.barrier()
    log(f"done in {time.perf_counter() - t_start:.1f} s")
    return records


def _join_ulysses(degree: int):
    from .integration.parallel import init_distributed

    try:
        return init_distributed(degree)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--ulysses {degree}: {exc}") from None


def _enable_ulysses(pipe, degree: int, anything: bool) -> None:
    from .integration.parallel import enable_ulysses

    try:
        enable_ulysses(pipe, degree, anything=anything)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise UserError(f"--ulysses {degree}: {exc}") from None


def parallel_record(pipe, parallel, layout) -> dict | None:
    """The JSON record of a context-parallel run: degree, world size and the all-to-all bytes per
    self-attention layer for the run's token count (None for a single process)."""
    if parallel is None:
        return None
    import torch

    from .integration.parallel import ulysses_bytes_per_layer

    record = {"ulysses": parallel.degree, "world_size": parallel.world_size}
    transformer = next(iter(_transformers(pipe).values()))
    cfg = transformer.config
    heads, head_dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "attention_head_dim", None)
    if layout is not None and heads and head_dim:
        dtype_bytes = torch.finfo(transformer.dtype).bits // 8
        record["all_to_all_per_layer"] = ulysses_bytes_per_layer(layout.seq_len, heads, head_dim, parallel.degree,
                                                                 dtype_bytes=dtype_bytes).record()
    return record
