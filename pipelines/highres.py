"""Training-free high-resolution video generation with a Wan pipeline (FreeSwim, arXiv 2511.14712).

:func:`generate_highres` runs the whole procedure:

1. **base pass**: the pipeline generates the video at its native (training) resolution;
2. **upscale**: the frames are resized by ``upscale`` with OpenCV;
3. **high-resolution pass**: video-to-video at the target size — the upscaled frames are
   encoded by the pipeline's VAE, re-noised to ``strength`` and denoised with

   - the *window branch*: every self-attention query attends an inward-shifted spatial window
     of the native token extent over all frames (``SlidingWindow((None, kh, kw))``), so each
     receptive field stays at the training scale;
   - the *full branch* (``attention="freeswim"``): full self-attention on the same latents,
     whose text cross-attention output replaces the window branch's in every block. It runs
     on guide steps only (every ``guide_every`` steps); between them the window branch replays
     the per-block outputs recorded at the last guide step.

Both branches scale their self-attention logits by ``scale_factor`` (FreeSwim's correction).

Wan 2.2's two-expert text-to-video pipelines (``transformer`` for the high-noise steps,
``transformer_2`` for the low-noise ones, switched at ``boundary_ratio``) run with the dual path
on both experts; each step's expert and guidance scale (``guidance_scale_2`` for the low-noise
expert) are chosen exactly as diffusers' ``WanPipeline`` chooses them (:func:`expert_schedule`),
and the first step of each expert is a guide step (recorded outputs are never replayed across
experts). Image-to-video pipelines are refused.
The defaults are the original release's: strength 0.7, full branch every 2 steps, window
``2 * (n // 2) + 1`` tokens for a native extent of ``n`` tokens per axis, scale factor
``sqrt(log(2 s) / log(s))`` for ``s`` native tokens per frame, scheduler shift 9.0, bilinear
upscaling.

>>> from diffattn.pipelines.highres import HighResConfig
>>> HighResConfig().strength, HighResConfig().guide_every
(0.7, 2)
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "ATTENTION_MODES",
    "INTERPOLATIONS",
    "HighResConfig",
    "HighResResult",
    "boundary_timestep",
    "cross_cache_bytes",
    "default_scale_factor",
    "expert_schedule",
    "default_window",
    "generate_highres",
    "parse_highres_config",
    "target_size",
    "token_grid",
    "upscale_frames",
]

#: ``HighResConfig.attention``: FreeSwim's dual path, the window branch alone, or plain dense attention.
ATTENTION_MODES = ("freeswim", "window", "dense")
#: ``HighResConfig.interpolation`` -> OpenCV's flag name.
INTERPOLATIONS = {"linear": "INTER_LINEAR", "cubic": "INTER_CUBIC", "lanczos": "INTER_LANCZOS4", "area": "INTER_AREA",
                  "nearest": "INTER_NEAREST"}
_STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class HighResConfig:
    """Settings of the high-resolution pass.

    Args:
        strength: how far the upscaled video is re-noised, in (0, 1]: the pass runs
            ``int(num_inference_steps * strength)`` of the schedule's last steps. Default 0.7.
        attention: ``"freeswim"`` (window branch + full branch, default), ``"window"`` (the
            window branch alone) or ``"dense"`` (diffusers' full attention, no scale correction:
            the naive baseline).
        guide_every: the full branch runs every k denoising steps (1 = every step: no reuse),
            and on the first step of each expert of a two-expert pipeline. Default 2. Only for
            ``attention="freeswim"``.
        window: the window's spatial extent ``(kh, kw)`` in tokens; every frame is attended.
            None (default): ``2 * (n // 2) + 1`` for the native grid's extent ``n`` on each axis
            (the original's), capped at the target grid.
        scale_factor: multiplies the self-attention softmax scale ``D ** -0.5`` of both branches.
            None (default): ``sqrt(log(2 s) / log(s))`` with ``s`` the native tokens per frame
            (the original's); 1.0 turns the correction off.
        flow_shift: the scheduler's sigma shift for the high-resolution pass (``flow_shift`` of
            UniPC/DPM flow schedulers, ``shift`` of flow-match Euler). Default 9.0; None keeps the
            pipeline's.
        num_inference_steps: schedule length of the pass (before ``strength``). None (default):
            the base pass's.
        interpolation: frame upscaling: ``"linear"`` (default), ``"cubic"``, ``"lanczos"``,
            ``"area"`` or ``"nearest"``.
        store_dtype: dtype of the recorded cross-attention outputs: None (default: the model's),
            ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        offload: keep the recorded outputs in CPU memory (pinned with CUDA). Default False.
        impl: the window branch's attention implementation: ``"auto"`` (default), ``"triton"``
            or ``"reference"``.
    """

    strength: float = 0.7
    attention: str = "freeswim"
    guide_every: int = 2
    window: tuple[int, int] | None = None
    scale_factor: float | None = None
    flow_shift: float | None = 9.0
    num_inference_steps: int | None = None
    interpolation: str = "linear"
    store_dtype: torch.dtype | None = None
    offload: bool = False
    impl: str = "auto"

    def __post_init__(self):
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ValueError(f"strength must be a number in (0, 1], got {s!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        k = self.guide_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"guide_every must be an int >= 1 (the full branch runs every k steps), got {k!r}")
        if self.window is not None:
            w = tuple(self.window) if isinstance(self.window, (tuple, list)) else None
            if w is None or len(w) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in w):
                raise ValueError(f"window must be None or two ints >= 1 (kh, kw) in tokens, got {self.window!r}")
            object.__setattr__(self, "window", w)
        for name in ("scale_factor", "flow_shift"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < float("inf")):
                raise ValueError(f"{name} must be None or a positive number, got {value!r}")
        n = self.num_inference_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"num_inference_steps must be None or an int >= 1, got {n!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.store_dtype is not None and self.store_dtype not in _STORE_DTYPES.values():
            raise ValueError(f"store_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                             f"got {self.store_dtype!r}")
        if not isinstance(self.offload, bool):
            raise TypeError(f"offload must be a bool, got {self.offload!r}")
        if self.impl not in ("auto", "triton", "reference"):
            raise ValueError(f"impl must be one of auto, triton, reference, got {self.impl!r}")

    def record(self) -> dict:
        out = dataclasses.asdict(self)
        out["store_dtype"] = str(self.store_dtype).replace("torch.", "") if self.store_dtype else None
        return out


def parse_highres_config(spec: str | None, **overrides) -> HighResConfig:
    """A :class:`HighResConfig` from a command-line string such as
    ``"strength=0.7,guide_every=2,window=31x53,scale=auto,flow_shift=9,attention=freeswim,steps=50,
    interpolation=linear,store_dtype=bfloat16,offload=true,impl=auto"`` (every key optional;
    ``scale=auto`` and ``window=auto`` are the defaults, ``flow_shift=keep`` keeps the pipeline's).

    >>> parse_highres_config("guide_every=3,window=9x9").window
    (9, 9)
    """
    kwargs: dict[str, Any] = {}
    keys = ("strength", "attention", "guide_every", "window", "scale", "flow_shift", "steps", "interpolation",
            "store_dtype", "offload", "impl")
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, value = (x.strip() for x in item.partition("="))
        low = value.lower()
        if not sep:
            raise ValueError(f"highres option {item!r}: expected key=value")
        if key not in keys:
            raise ValueError(f"unknown highres option {key!r}; allowed: {', '.join(keys)}")
        try:
            if key in ("strength",):
                kwargs[key] = float(value)
            elif key in ("guide_every",):
                kwargs[key] = int(value)
            elif key == "steps":
                kwargs["num_inference_steps"] = int(value)
            elif key == "window":
                kwargs[key] = None if low == "auto" else tuple(int(x) for x in low.split("x"))
            elif key == "scale":
                kwargs["scale_factor"] = None if low == "auto" else float(value)
            elif key == "flow_shift":
                kwargs[key] = None if low == "keep" else float(value)
            elif key == "store_dtype":
                kwargs[key] = None if low in ("none", "auto") else _STORE_DTYPES[low]
            elif key == "offload":
                kwargs[key] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[low]
            else:
                kwargs[key] = value
        except (KeyError, ValueError):
            raise ValueError(f"highres option {key}={value!r} is not valid") from None
    kwargs.update(overrides)
    return HighResConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Geometry


#: The transformer attributes of a Wan pipeline, in expert order (Wan 2.2: high noise, low noise).
EXPERTS = ("transformer", "transformer_2")


def _experts(pipe) -> dict[str, torch.nn.Module]:
    """``{attribute: transformer}`` of the pipeline's experts that are present, in expert order."""
    return {name: getattr(pipe, name) for name in EXPERTS if getattr(pipe, name, None) is not None}


def _transformer(pipe):
    """The transformer whose configuration sets the geometry (diffusers: ``transformer``, else
    ``transformer_2``)."""
    experts = _experts(pipe)
    return next(iter(experts.values())) if experts else None


def _check_wan(pipe) -> None:
    experts = _experts(pipe)
    if not experts or any(type(m).__name__ != "WanTransformer3DModel" for m in experts.values()):
        found = ", ".join(f"{name}={type(getattr(pipe, name, None)).__name__}" for name in EXPERTS)
        raise ValueError(f"generate_highres needs a Wan pipeline (a WanTransformer3DModel as pipe.transformer, and "
                         f"as pipe.transformer_2 for Wan 2.2's two experts), got {type(pipe).__name__} with {found}")
    for name, model in experts.items():
        config = model.config
        if ("ImageToVideo" in type(pipe).__name__ or getattr(config, "image_dim", None) is not None
                or config.in_channels != config.out_channels):
            raise NotImplementedError(
                f"generate_highres supports Wan text-to-video pipelines (WanPipeline: Wan 2.1, and Wan 2.2 with its "
                f"two experts); {type(pipe).__name__} conditions pipe.{name} on an image (in_channels="
                f"{config.in_channels} for out_channels={config.out_channels}, image_dim="
                f"{getattr(config, 'image_dim', None)}): image-to-video is not supported (its high-resolution pass "
                f"would need the conditioning image re-encoded at the target size as mask + image-latent channels, "
                f"or as first-frame latents for TI2V)")


def boundary_ratio(pipe) -> float | None:
    """The pipeline's ``boundary_ratio`` (Wan 2.2 two-expert pipelines; None for Wan 2.1)."""
    return getattr(getattr(pipe, "config", None), "boundary_ratio", None)


def boundary_timestep(pipe, scheduler=None) -> float | None:
    """The timestep where a two-expert pipeline switches from ``transformer`` to ``transformer_2``:
    ``boundary_ratio x scheduler.config.num_train_timesteps`` as in diffusers' ``WanPipeline``
    (``scheduler`` defaults to the pipeline's); None without ``boundary_ratio``."""
    ratio = boundary_ratio(pipe)
    if ratio is None:
        return None
    return ratio * (scheduler or pipe.scheduler).config.num_train_timesteps


def expert_schedule(pipe, timesteps, scheduler=None) -> list[str]:
    """The expert that runs at each of ``timesteps``, chosen as diffusers' ``WanPipeline`` does:
    ``"transformer"`` while ``t >= boundary_timestep`` (or always without ``boundary_ratio``),
    ``"transformer_2"`` after.

    >>> from diffattn.pipelines import build_embedded_wan_pipeline
    >>> pipe = build_embedded_wan_pipeline()
    >>> pipe.register_to_config(boundary_ratio=0.5)
    >>> expert_schedule(pipe, torch.tensor([900.0, 500.0, 499.0]))
    ['transformer', 'transformer', 'transformer_2']
    """
    boundary = boundary_timestep(pipe, scheduler)
    return ["transformer" if boundary is None or t >= boundary else "transformer_2" for t in timesteps]


def token_grid(pipe, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """The self-attention token grid ``(F, H, W)`` of a Wan generation of that size.

    >>> from diffattn.pipelines import build_embedded_wan_pipeline
    >>> token_grid(build_embedded_wan_pipeline(), 128, 128, 17)
    (5, 8, 8)
    """
    pt, ph, pw = _transformer(pipe).config.patch_size
    frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    return (frames // pt, height // pipe.vae_scale_factor_spatial // ph, width // pipe.vae_scale_factor_spatial // pw)


def _size_multiple(pipe) -> int:
    return pipe.vae_scale_factor_spatial * max(_transformer(pipe).config.patch_size[1:])


def target_size(pipe, height: int, width: int, upscale: float) -> tuple[int, int]:
    """``(height, width)`` of the high-resolution pass: ``upscale`` x the native size, rounded to
    the nearest multiple the pipeline accepts (16 for Wan). Raises ValueError naming ``upscale``
    when it is not a number > 1, or when the target's token grid exceeds the transformer's
    rotary embedding (``rope_max_seq_len`` tokens per axis)."""
    if isinstance(upscale, bool) or not isinstance(upscale, (int, float)) or not math.isfinite(upscale) or upscale <= 1:
        raise ValueError(f"upscale must be a number > 1 (the factor of the native frame size), got {upscale!r}")
    step = _size_multiple(pipe)
    size = tuple(max(step, int(round(n * upscale / step)) * step) for n in (height, width))
    if size[0] <= height and size[1] <= width:
        raise ValueError(f"upscale={upscale!r} gives {size[1]}x{size[0]}, not larger than the native "
                         f"{width}x{height} (sizes are multiples of {step}); use a larger factor")
    _check_rope(pipe, *size)
    return size


def _check_rope(pipe, height: int, width: int) -> None:
    limits = [getattr(m.config, "rope_max_seq_len", None) for m in _experts(pipe).values()]
    limit = min((x for x in limits if x is not None), default=None)
    _, gh, gw = token_grid(pipe, height, width, 1)
    if limit is not None and max(gh, gw) > limit:
        raise ValueError(f"the target size {width}x{height} is a {gh}x{gw} token grid per frame, more than the "
                         f"transformer's rotary embedding covers (rope_max_seq_len={limit} tokens per axis, "
                         f"{limit * _size_multiple(pipe)} pixels); use a smaller upscale factor")


def default_window(native_grid: tuple, target_grid: tuple) -> tuple[int, int]:
    """FreeSwim's window: ``2 * (n // 2) + 1`` tokens for the native extent ``n`` on each spatial
    axis (the original's half-extent ``n // 2`` on both sides of the query), capped at the
    target grid.

    >>> default_window((21, 30, 52), (21, 68, 120))
    (31, 53)
    """
    return tuple(min(2 * (n // 2) + 1, t) for n, t in zip(native_grid[-2:], target_grid[-2:]))


def default_scale_factor(native_grid: tuple) -> float:
    """FreeSwim's attention-scale correction ``sqrt(log(2 s) / log(s))`` for ``s`` native tokens
    per frame (1.0 for a single token).

    >>> round(default_scale_factor((21, 30, 52)), 4)
    1.0461
    """
    s = native_grid[-2] * native_grid[-1]
    return math.sqrt(math.log(2 * s) / math.log(s)) if s > 1 else 1.0


def cross_cache_bytes(pipe, grid: tuple, dtype: torch.dtype | None = None, batch: int = 1) -> int:
    """Bytes the full branch's recorded cross-attention outputs take over every block for a token
    ``grid``: ``blocks x batch x F*H*W x C x itemsize`` (C = heads x head dim). With two experts
    the store holds one expert's outputs at a time (it is cleared at the switch): the larger.

    >>> from diffattn.pipelines import build_embedded_wan_pipeline
    >>> cross_cache_bytes(build_embedded_wan_pipeline(), (5, 16, 16))
    2621440
    """
    sizes = []
    for name in EXPERTS:
        model = getattr(pipe, name, None)
        if model is None:
            continue
        config = model.config
        channels = config.num_attention_heads * config.attention_head_dim
        itemsize = torch.empty((), dtype=dtype or model.dtype).element_size()
        sizes.append(config.num_layers * batch * math.prod(grid) * channels * itemsize)
    return max(sizes)


# --------------------------------------------------------------------------------------------
# Frames


def upscale_frames(frames: np.ndarray, height: int, width: int, interpolation: str = "linear") -> np.ndarray:
    """Resize ``[F, H, W, 3]`` float frames to ``[F, height, width, 3]`` with OpenCV.

    >>> upscale_frames(np.zeros((2, 8, 8, 3), np.float32), 16, 24).shape
    (2, 16, 24, 3)
    """
    import cv2

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    flag = getattr(cv2, INTERPOLATIONS[interpolation])
    out = np.stack([cv2.resize(frame, (width, height), interpolation=flag) for frame in frames])
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The passes


@dataclasses.dataclass
class HighResResult:
    """The high-resolution frames ``[F, H, W, 3]`` in [0, 1], the base pass's frames and a JSON-able
    record of both passes (settings, token grids, timings in seconds, cross-attention cache bytes)."""

    frames: np.ndarray
    base_frames: np.ndarray
    record: dict


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _frames_np(output) -> np.ndarray:
    frames = output.frames[0]
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    return np.asarray(frames, dtype=np.float32)


def _highres_scheduler(pipe, flow_shift: float | None):
    """A fresh scheduler for the pass (the base pipeline's stays as it was)."""
    config = dict(pipe.scheduler.config)
    if flow_shift is not None:
        key = "flow_shift" if "flow_shift" in config else ("shift" if "shift" in config else None)
        if key is None:
            raise ValueError(f"flow_shift={flow_shift!r}: {type(pipe.scheduler).__name__} has no flow_shift or shift "
                             "setting; use flow_shift=None")
        config[key] = float(flow_shift)
    return type(pipe.scheduler).from_config(config)


def _is_applied(pipe) -> bool:
    from diffattn.integration.apply import HOOK_NAME

    registries = [getattr(m, "_diffusers_hook", None) for m in _experts(pipe).values()]
    return any(registry is not None and registry.get_hook(HOOK_NAME) is not None for registry in registries)


def generate_highres(pipe, prompt: str, *, negative_prompt: str | None = None, height: int = 480, width: int = 832,
                     num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                     guidance_scale_2: float | None = None, max_sequence_length: int = 512, upscale: float = 2.0,
                     config: HighResConfig | None = None, seed: int = 0, base_frames: np.ndarray | None = None,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> HighResResult:
    """Generate at the native size, upscale the frames, and refine them at the target size.

    Args:
        pipe: a diffusers ``WanPipeline`` (text-to-video): Wan 2.1 (one transformer) or Wan 2.2's
            two experts (``transformer`` and ``transformer_2`` with ``boundary_ratio``: the dual path
            goes on both). diffattn must not be applied to it: the high-resolution pass installs its
            own processors and restores diffusers' after. Image-to-video pipelines are refused.
        prompt, negative_prompt: the text; the negative prompt drives classifier-free guidance.
        height, width, num_frames: the native (base pass) size. Defaults: Wan 2.1 1.3B's 480 x 832,
            81 frames.
        num_inference_steps, guidance_scale, max_sequence_length: the base pass's settings; the
            high-resolution pass uses the same unless ``config`` says otherwise.
        guidance_scale_2: the low-noise expert's (``transformer_2``'s) guidance scale in both passes;
            None (default): ``guidance_scale``. Only for pipelines with ``boundary_ratio``.
        upscale: target size = ``upscale`` x the native size (multiples of 16). Default 2.0.
        config: the high-resolution pass's settings (:class:`HighResConfig`); default FreeSwim's.
        seed: seeds the base pass's noise and the re-noising.
        base_frames: ``[F, height, width, 3]`` floats in [0, 1] to refine instead of running the
            base pass.
        progress: progress bars.
        log: called with one line per stage (None: silent).

    Returns:
        A :class:`HighResResult`.

    >>> from diffattn.pipelines import build_embedded_wan_pipeline
    >>> result = generate_highres(build_embedded_wan_pipeline(), "a fox", height=128, width=128,
    ...                           num_frames=9, num_inference_steps=4, max_sequence_length=64,
    ...                           progress=False)  # doctest: +SKIP
    >>> result.frames.shape  # doctest: +SKIP
    (9, 256, 256, 3)
    """
    config = config or HighResConfig()
    if not isinstance(config, HighResConfig):
        raise TypeError(f"config must be a HighResConfig, got {type(config).__name__}")
    _check_wan(pipe)
    if _is_applied(pipe):
        raise ValueError("diffattn is already applied to this pipeline's transformer: call diffattn.remove(pipe) "
                         "first (the base pass runs with diffusers' attention; the high-resolution pass installs "
                         "its own processors)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    for name, value in (("height", height), ("width", width), ("num_frames", num_frames),
                        ("num_inference_steps", num_inference_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    guidance = _guidance_scales(pipe, guidance_scale, guidance_scale_2)
    step_px = _size_multiple(pipe)
    if height % step_px or width % step_px:
        raise ValueError(f"height and width must be multiples of {step_px}, got {height} and {width}")
    out_h, out_w = target_size(pipe, height, width, upscale)
    native, target = token_grid(pipe, height, width, num_frames), token_grid(pipe, out_h, out_w, num_frames)
    steps = config.num_inference_steps or num_inference_steps
    run_steps = min(int(steps * config.strength), steps)
    if run_steps < 1:
        raise ValueError(f"strength={config.strength} of {steps} steps runs no step: int(steps * strength) must be "
                         ">= 1; raise strength or num_inference_steps")
    window = config.window or default_window(native, target)
    if window[0] > target[1] or window[1] > target[2]:
        raise ValueError(f"window={window} does not fit the target token grid {target[1]}x{target[2]} per frame "
                         f"(height x width); allowed: kh <= {target[1]}, kw <= {target[2]}")
    scale_factor = config.scale_factor or default_scale_factor(native)
    say = log or (lambda line: None)
    device = pipe._execution_device
    scheduler = _highres_scheduler(pipe, config.flow_shift)
    timesteps = _highres_timesteps(scheduler, steps, config.strength, device)
    schedule = expert_schedule(pipe, timesteps, scheduler)
    _check_experts_present(pipe, schedule, timesteps)
    generator = torch.Generator(device=device).manual_seed(seed)
    timings: dict[str, Any] = {}

    t0 = time.perf_counter()
    if base_frames is None:
        say(f"base pass: {num_frames} frames {width}x{height}, {num_inference_steps} steps")
        pipe.set_progress_bar_config(disable=not progress, leave=False)
        extra = {} if guidance_scale_2 is None else {"guidance_scale_2": guidance_scale_2}
        output = pipe(prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      max_sequence_length=max_sequence_length, generator=generator, output_type="np", **extra)
        base_frames = _frames_np(output)
        _sync(device)
        timings["base_pass"] = time.perf_counter() - t0
    else:
        base_frames = np.asarray(base_frames, dtype=np.float32)
        if base_frames.shape != (num_frames, height, width, 3):
            raise ValueError(f"base_frames must be [num_frames, height, width, 3] = {(num_frames, height, width, 3)}, "
                             f"got {base_frames.shape}")
    t1 = time.perf_counter()
    frames_up = upscale_frames(base_frames, out_h, out_w, config.interpolation)
    timings["upscale"] = time.perf_counter() - t1

    say(f"high-resolution pass: {num_frames} frames {out_w}x{out_h}, {run_steps} of {steps} steps, "
        f"attention={config.attention}" + (f", experts {_expert_summary(schedule)}" if len(_experts(pipe)) > 1 else ""))
    from diffattn.patterns import SlidingWindow

    pattern = SlidingWindow((None, *window))
    experts = _experts(pipe)
    dual = None
    if config.attention != "dense":
        from diffattn.integration.dual_path import DualPath

        dual = DualPath.install(list(experts.values()), pattern,
                                guide_every=config.guide_every if config.attention == "freeswim" else None,
                                scale_factor=scale_factor, store_dtype=config.store_dtype, offload=config.offload,
                                impl=config.impl)
    try:
        frames, pass_timings = _refine(pipe, prompt, negative_prompt, frames_up, height=out_h, width=out_w,
                                       steps=steps, strength=config.strength, guidance=guidance,
                                       max_sequence_length=max_sequence_length, scheduler=scheduler, seed=seed,
                                       dual=dual, progress=progress)
        dual_record = dual.record() if dual is not None else None
    finally:
        if dual is not None:
            dual.remove()
    timings["highres_pass"] = pass_timings
    timings["total"] = time.perf_counter() - t0

    density = 1.0 if config.attention == "dense" else float(pattern.attended_fraction(_layout(target)))
    record = {
        "method": "FreeSwim (inward window + full-branch cross-attention override)" if config.attention == "freeswim"
        else ("inward window only" if config.attention == "window" else "dense attention"),
        "base": {"height": height, "width": width, "num_frames": num_frames, "num_inference_steps": num_inference_steps,
                 "guidance_scale": guidance_scale, "guidance_scale_2": guidance_scale_2,
                 "token_grid": list(native), "given_frames": "base_pass" not in timings},
        "highres": {"height": out_h, "width": out_w, "num_frames": num_frames, "upscale": upscale,
                    "token_grid": list(target), "config": config.record(), "window": [None, *window],
                    "scale_factor": scale_factor if config.attention != "dense" else 1.0,
                    "steps_run": run_steps, "schedule_steps": steps,
                    "experts": list(experts), "boundary_timestep": boundary_timestep(pipe, scheduler),
                    "expert_per_step": schedule, "guidance_scales": guidance,
                    "window_attended_fraction": density,
                    "dual_path": dual_record,
                    "cross_cache_estimate_bytes": (cross_cache_bytes(pipe, target, config.store_dtype)
                                                   if config.attention == "freeswim" else 0)},
        "timings_s": timings,
    }
    return HighResResult(frames, base_frames, record)


def _guidance_scales(pipe, guidance_scale: float, guidance_scale_2: float | None) -> dict[str, float]:
    """``{expert: guidance scale}`` as diffusers' ``WanPipeline`` sets them: ``guidance_scale_2``
    (default ``guidance_scale``) for ``transformer_2``, allowed only with ``boundary_ratio``."""
    for name, value in (("guidance_scale", guidance_scale), ("guidance_scale_2", guidance_scale_2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if guidance_scale_2 is not None and boundary_ratio(pipe) is None:
        raise ValueError(f"guidance_scale_2={guidance_scale_2!r} is only for two-expert pipelines (Wan 2.2, with "
                         "boundary_ratio set); this pipeline has no boundary_ratio")
    return {"transformer": float(guidance_scale),
            "transformer_2": float(guidance_scale if guidance_scale_2 is None else guidance_scale_2)}


def _highres_timesteps(scheduler, steps: int, strength: float, device) -> torch.Tensor:
    """The pass's timesteps: the schedule's last ``int(steps * strength)`` steps, as diffusers'
    ``WanVideoToVideoPipeline.get_timesteps`` cuts them (``scheduler`` is left set to ``steps``)."""
    scheduler.set_timesteps(steps, device=device)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    return scheduler.timesteps[t_start * scheduler.order:]


def _check_experts_present(pipe, schedule: list[str], timesteps) -> None:
    for i, (name, t) in enumerate(zip(schedule, timesteps)):
        if getattr(pipe, name, None) is None:
            boundary = boundary_timestep(pipe)
            raise ValueError(f"step {i} of the high-resolution pass (t={float(t):.1f}) needs pipe.{name} "
                             f"(boundary timestep {boundary}), which is None; load both experts")


def _expert_summary(schedule: list[str]) -> str:
    """``"transformer x3 -> transformer_2 x2"``."""
    runs: list[list] = []
    for name in schedule:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return " -> ".join(f"{name} x{count}" for name, count in runs)


def _layout(grid):
    from diffattn.tokens import TokenLayout

    return TokenLayout(tuple(grid))


def _refine(pipe, prompt, negative_prompt, frames_up: np.ndarray, *, height: int, width: int, steps: int,
            strength: float, guidance: dict[str, float], max_sequence_length: int, scheduler, seed: int, dual,
            progress: bool) -> tuple[np.ndarray, dict]:
    """The video-to-video pass with diffusers' ``WanVideoToVideoPipeline`` pieces (prompt encoding,
    timesteps by strength, VAE encoding and re-noising, decoding) around :func:`denoise`."""
    from diffusers import WanVideoToVideoPipeline

    transformer = _transformer(pipe)
    v2v = WanVideoToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                  transformer=transformer, vae=pipe.vae, scheduler=scheduler)
    # diffusers 0.42's WanVideoToVideoPipeline takes the spatial factor as 2 ** (VAE levels), which is
    # wrong for the Wan 2.2-style VAEs that fold 2x2 pixels first (patch_size 2: the embedded VAE, 8x;
    # Wan 2.2 TI2V's, 16x); the base pipeline reads it from the VAE config (scale_factor_spatial).
    factor = pipe.vae_scale_factor_spatial
    if v2v.vae_scale_factor_spatial != factor:
        from diffusers.video_processor import VideoProcessor

        v2v.vae_scale_factor_spatial = factor
        v2v.video_processor = VideoProcessor(vae_scale_factor=factor)
    v2v.set_progress_bar_config(disable=not progress, leave=False)
    device = pipe._execution_device
    cfg = guidance["transformer"] > 1.0  # diffusers: do_classifier_free_guidance reads guidance_scale only
    timings: dict[str, Any] = {}

    with torch.no_grad():
        t0 = time.perf_counter()
        # The base pipeline's prompt encoding (the video-to-video one needs ftfy for its text cleaning).
        prompt_embeds, negative_embeds = pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt,
                                                            do_classifier_free_guidance=cfg,
                                                            max_sequence_length=max_sequence_length, device=device)
        prompt_embeds = prompt_embeds.to(transformer.dtype)
        negative_embeds = negative_embeds.to(transformer.dtype) if negative_embeds is not None else None
        timesteps = _highres_timesteps(scheduler, steps, strength, device)
        video = v2v.video_processor.preprocess_video(frames_up[None], height=height, width=width)
        video = video.to(device, dtype=torch.float32)
        generator = torch.Generator(device=device).manual_seed(seed)
        latents = v2v.prepare_latents(video, 1, transformer.config.in_channels, height, width, torch.float32, device,
                                      generator, None, timesteps[:1])
        if hasattr(scheduler, "set_begin_index"):  # as WanPipeline does: no step-index lookup per step
            scheduler.set_begin_index(len(scheduler.timesteps) - len(timesteps))
        _sync(device)
        t1 = time.perf_counter()
        timings["encode"] = t1 - t0

        with v2v.progress_bar(total=len(timesteps)) as bar:
            latents, step_times = denoise(pipe, latents, timesteps, scheduler, prompt_embeds, negative_embeds,
                                           guidance, dual, on_step=bar.update)
        t2 = time.perf_counter()
        timings["denoise"] = t2 - t1
        timings["steps"] = step_times

        latents = latents.to(v2v.vae.dtype)
        z = v2v.vae.config.z_dim
        mean = torch.tensor(v2v.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(v2v.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        decoded = v2v.vae.decode(latents * std + mean, return_dict=False)[0]
        frames = v2v.video_processor.postprocess_video(decoded, output_type="np")[0]
        _sync(device)
        timings["decode"] = time.perf_counter() - t2
    return np.asarray(frames, dtype=np.float32), timings


def denoise(pipe, latents: torch.Tensor, timesteps: torch.Tensor, scheduler, prompt_embeds: torch.Tensor,
             negative_embeds: torch.Tensor | None, guidance: dict[str, float], dual=None,
             on_step: Callable[[], Any] | None = None) -> tuple[torch.Tensor, list[float]]:
    """diffusers' ``WanPipeline`` denoising loop over ``timesteps``: each step's expert and guidance
    scale by :func:`expert_schedule` (``guidance`` maps expert -> scale), the timestep expanded per
    token when ``pipe.config.expand_timesteps`` (Wan 2.2 TI2V) and classifier-free guidance when
    ``guidance["transformer"] > 1``; every transformer call goes through the dual path ``dual``
    (None: diffusers' attention, the dense baseline). ``latents`` ``[B, C, F, H, W]`` float32 in and
    out; also returns the seconds of each step. ``scheduler`` must be set to a schedule that
    ``timesteps`` are the tail of (its ``num_train_timesteps`` places the expert boundary).

    With ``dual=None``, ``timesteps = scheduler.timesteps`` and ``scheduler.set_begin_index(0)``
    this is ``WanPipeline.__call__``'s loop for given latents and prompt embeddings, call for call.
    """
    experts = _experts(pipe)
    order = list(experts)
    transformer_dtype = _transformer(pipe).dtype
    cfg = guidance["transformer"] > 1.0
    expand = bool(getattr(getattr(pipe, "config", None), "expand_timesteps", False))
    mask = torch.ones(latents.shape, dtype=torch.float32, device=latents.device) if expand else None
    if dual is not None:
        dual.reset()
    step_times = []
    for i, (t, name) in enumerate(zip(timesteps, expert_schedule(pipe, timesteps, scheduler))):
        s0 = time.perf_counter()
        model, scale, expert = experts[name], guidance[name], order.index(name)
        x = latents.to(transformer_dtype)
        ts = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(x.shape[0], -1) if expand \
            else t.expand(x.shape[0])

        def call(embeds, branch):
            with model.cache_context(branch):
                return model(hidden_states=x, timestep=ts, encoder_hidden_states=embeds, return_dict=False)[0]

        if dual is None:
            noise = call(prompt_embeds, "cond")
        else:
            noise = dual.conditional(lambda: call(prompt_embeds, "cond"), i, expert)
        if cfg:
            if dual is None:
                uncond = call(negative_embeds, "uncond")
            else:
                uncond = dual.unconditional(lambda: call(negative_embeds, "uncond"), expert)
            noise = uncond + scale * (noise - uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        _sync(latents.device)
        step_times.append(time.perf_counter() - s0)
        if on_step is not None:
            on_step()
    return latents, step_times
