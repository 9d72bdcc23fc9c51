"""Load a diffusers pipeline and install a preset's sparse attention: ``load_pipeline``.

>>> from diffattn.pipelines import PIPELINE_CLASSES, GENERATION_KEYS
>>> PIPELINE_CLASSES["wan"][0], GENERATION_KEYS["flux"]
('WanPipeline', ('height', 'width', 'num_inference_steps', 'guidance_scale'))
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..presets import FAMILIES, GENERATION_KEYS, Preset, list_presets, load_preset

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline

    from ..integration.apply import SparseHandle

__all__ = ["EMBEDDED_MARK", "GENERATION_KEYS", "PIPELINE_CLASSES", "TRANSFORMER_FAMILIES", "family_of", "is_embedded",
           "load_pipeline"]

logger = logging.getLogger("diffattn")

#: Per family: the diffusers pipeline classes of its checkpoints, text-to-video/image first.
#: ``load_pipeline`` does not choose among them: ``DiffusionPipeline.from_pretrained`` builds
#: the class the checkpoint's ``model_index.json`` names (e.g. WanImageToVideoPipeline for
#: Wan I2V checkpoints).
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {
    "wan": ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    "hunyuan_video": ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline"),
    "cogvideox": ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
    "flux": ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline"),
    "sd3": ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    "ltx": ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
    "wan_vace": ("WanVACEPipeline",),
    "wan_animate": ("WanAnimatePipeline",),
    "skyreels_v2": ("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline",
                    "SkyReelsV2DiffusionForcingImageToVideoPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline"),
    "hunyuan_video15": ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
    "ltx2": ("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline"),
    "kandinsky5": ("Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline", "Kandinsky5T2IPipeline", "Kandinsky5I2IPipeline"),
    "motif_video": ("MotifVideoPipeline", "MotifVideoImage2VideoPipeline"),
    "qwen_image": ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
                   "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline", "QwenImageLayeredPipeline",
                   "QwenImageControlNetPipeline"),
    "flux2": ("Flux2Pipeline", "Flux2KleinPipeline"),
    "mochi": ("MochiPipeline",),
    # Predict2 Video2World first: the cosmos preset's checkpoint; Predict2.5 takes the same sizes.
    "cosmos": ("Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline", "Cosmos2_5_TransferPipeline",
               "CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline", "Cosmos2TextToImagePipeline"),
    "z_image": ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageControlNetPipeline",
                "ZImageControlNetInpaintPipeline", "ZImageOmniPipeline"),
}
# MiniMax-H3 has an adapter but no entry: it ships as a modular pipeline (MiniMaxH3ModularPipeline),
# which DiffusionPipeline.from_pretrained does not build; use diffattn.apply on its transformer.
_MODULAR_HINT = ("load it with diffusers.ModularPipeline.from_pretrained(...) and load_components(), then "
                 "diffattn.apply(pipe, pattern, dense_steps=..., dense_layers=...) (pipe.transformer_ref for "
                 "MiniMax-H3's ref2va workflow)")

#: Transformer classes whose family is not their adapter's name: Wan's variants run Wan's adapter
#: but have their own pipelines, sizes and presets.
TRANSFORMER_FAMILIES: dict[str, str] = {
    "WanVACETransformer3DModel": "wan_vace",
    "WanAnimateTransformer3DModel": "wan_animate",
    "SkyReelsV2Transformer3DModel": "skyreels_v2",
}

#: Attribute set on every pipeline ``load_pipeline`` returns: True for the embedded demo
#: pipeline (a tiny Wan trained on clips of coloured shapes), False for a loaded checkpoint.
EMBEDDED_MARK = "diffattn_embedded"

_TRANSFORMER_KEYS = ("transformer", "transformer_2")
# from_pretrained keyword arguments that also apply to reading model_index.json.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def _family_of_class(class_name: str) -> str | None:
    from ..integration.families import all_adapters

    for adapter in all_adapters():
        if class_name in adapter.transformer_classes:
            return TRANSFORMER_FAMILIES.get(class_name, adapter.name)
    return None


def known_families() -> tuple[str, ...]:
    """Every family ``load_pipeline(family=...)`` accepts: the preset families (``FAMILIES``), then
    the families of adapters that have no presets yet."""
    from ..integration.families import all_adapters

    extra = sorted({a.name for a in all_adapters()} - set(FAMILIES))
    return (*FAMILIES, *extra)


def _supported_transformers() -> str:
    from ..integration.families import all_adapters

    return ", ".join(sorted(c for a in all_adapters() for c in a.transformer_classes))


def family_of(pipe) -> str:
    """The model family (``"wan"``, ``"flux"``, ``"wan_vace"``, ...: one of ``diffattn.presets.FAMILIES``)
    of a loaded pipeline, from its transformer's class.

    Raises ValueError for pipelines without a transformer diffattn has an adapter for.
    """
    for key in _TRANSFORMER_KEYS:
        transformer = getattr(pipe, key, None)
        if isinstance(transformer, torch.nn.Module):
            name = type(transformer).__name__
            family = _family_of_class(name)
            if family is None:
                raise ValueError(f"diffattn has no adapter for {name}; supported transformers: {_supported_transformers()}")
            return family
    raise ValueError(f"{type(pipe).__name__} has no transformer; diffattn supports DiT pipelines ({_supported_transformers()})")


def is_embedded(pipe) -> bool:
    """Whether ``pipe`` is the embedded demo pipeline (a tiny Wan trained on clips of coloured shapes)."""
    return bool(getattr(pipe, EMBEDDED_MARK, False))


def _model_index(model: str | os.PathLike, hub_kwargs: dict) -> tuple[dict, str]:
    """``(model_index.json contents, how the model was named)``, read before any weights load."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            if (path / "modular_model_index.json").is_file():
                raise ValueError(f"model {str(model)!r} is a diffusers modular pipeline (modular_model_index.json), which "
                                 f"load_pipeline does not build; {_MODULAR_HINT}")
            raise ValueError(f"model {str(model)!r} is a folder but not a diffusers pipeline: it has no model_index.json")
        try:
            return json.loads(index.read_text(encoding="utf-8")), str(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model {str(model)!r}: cannot read model_index.json: {exc}") from None
    text = str(model)
    if isinstance(model, os.PathLike) or path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(
            f"model must be a diffusers pipeline folder or a hub id like 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'; "
            f"{text!r} is neither (no such folder)"
        )
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(text, **hub_kwargs)
    except OSError as exc:
        raise ValueError(f"model {text!r} is not a local folder and its model_index.json could not be read from the "
                         f"hub: {exc}") from None
    return dict(config), text


def _family_of_index(index: dict, model: str) -> str:
    classes = [index[key][1] for key in _TRANSFORMER_KEYS
               if isinstance(index.get(key), (list, tuple)) and len(index[key]) == 2 and index[key][1]]
    if not classes:
        raise ValueError(
            f"model {model!r} is a {index.get('_class_name', 'diffusers')} pipeline without a transformer; "
            f"diffattn supports DiT pipelines ({_supported_transformers()})"
        )
    family = _family_of_class(classes[0])
    if family is None:
        raise ValueError(f"model {model!r}: diffattn has no adapter for {classes[0]}; supported transformers: "
                         f"{_supported_transformers()}")
    if family not in PIPELINE_CLASSES:
        raise ValueError(f"model {model!r}: {classes[0]} ships in a diffusers modular pipeline, which load_pipeline "
                         f"does not build; {_MODULAR_HINT}")
    return family


def _check_family(found: str, wanted: str | None, model: str, preset: Preset | None) -> None:
    if wanted is None or found == wanted:
        return
    asked = f"preset {preset.name!r} is for family {wanted!r}" if preset is not None else f"family={wanted!r} was asked for"
    shipped = [name for name in list_presets() if name.startswith(f"{found}-")]
    hint = f" (shipped: {', '.join(shipped)})" if shipped else ""
    raise ValueError(f"model {model!r} is a {found!r} pipeline but {asked}; use a {wanted} checkpoint or a {found} preset{hint}")


def _check_call_settings(preset: Preset | None, pipeline_class: str | None, model: str) -> None:
    """Refuse a preset whose generation settings the checkpoint's pipeline does not take (a video
    preset on Kandinsky5T2IPipeline, Qwen-Image's sizes on QwenImageLayeredPipeline, ...), from
    ``model_index.json``'s class name, before any weights load."""
    if preset is None or not pipeline_class:
        return
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        return
    try:
        parameters = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic pipelines
        return
    missing = [key for key in preset.generation if key not in parameters]
    if missing:
        raise ValueError(
            f"model {model!r} is a {pipeline_class}, which does not take the generation setting(s) "
            f"{', '.join(missing)} of preset {preset.name!r}; that preset is for "
            f"{', '.join(PIPELINE_CLASSES.get(preset.family, ())[:1]) or preset.family} checkpoints. Use diffattn.apply "
            "with a pattern and schedule of your own on this pipeline"
        )


def load_pipeline(
    model: str | os.PathLike | None = None,
    preset: str | os.PathLike | Preset | None = None,
    *,
    family: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    impl: str = "auto",
    **from_pretrained_kwargs: Any,
) -> tuple["DiffusionPipeline", "SparseHandle | None"]:
    """Load a diffusers pipeline and install a preset's sparse attention and schedule.

    Args:
        model: a diffusers pipeline folder or a hub id, loaded with
            ``DiffusionPipeline.from_pretrained`` (which builds the pipeline class the
            checkpoint's ``model_index.json`` names: WanPipeline, WanImageToVideoPipeline,
            FluxPipeline, ...). ``None``:

            - with a Wan preset, ``family="wan"``, or neither a preset nor a family: the
              **embedded demo pipeline** (``build_embedded_wan_pipeline``: a tiny Wan trained
              on clips of coloured shapes, which draws prompts like "a red circle moving right"
              and nothing else; marked ``pipe.diffattn_embedded = True`` and logged as a warning). Generate with ``EMBEDDED_DEFAULTS`` settings, not the
              preset's (the preset's window may not fit the tiny grid);
            - with a preset of another family: the preset's default checkpoint ``preset.model``.
        preset: a preset name (``"wan-radial"``), a YAML path, or a ``Preset``. None: load
            only, install nothing (the handle is None).
        family: the family the model must be (one of ``diffattn.presets.FAMILIES``: ``"wan"``,
            ``"hunyuan_video"``, ``"wan_vace"``, ``"qwen_image"``, ...); checked against the
            checkpoint's transformer class. Must agree with the preset's family when both are given.
        torch_dtype: dtype of the weights (passed to from_pretrained as ``dtype``; the embedded
            pipeline's transformer and text encoder). Default: float32.
        device: where the pipeline is moved (``pipe.to(device)``). Default: where it loaded.
        impl: kernel choice for ``diffattn.apply``: ``"auto"``, ``"triton"`` or ``"reference"``.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``variant``,
            ``local_files_only``, ``cache_dir``, ...).

    Returns:
        ``(pipe, handle)``: the pipeline and the ``SparseHandle`` of ``diffattn.apply`` (None
        without a preset).

    Raises:
        ValueError: the checkpoint's transformer is not of the preset's / ``family``'s family,
            or its pipeline does not take the preset's generation settings (both checked from
            ``model_index.json`` before any weights load), a folder that is not a diffusers
            pipeline, an unknown family, or a bad preset (``PresetError``).
    """
    if isinstance(preset, (str, os.PathLike)):
        preset = load_preset(preset)
    elif preset is not None and not isinstance(preset, Preset):
        raise TypeError(f"preset must be a preset name, a YAML path or a Preset, got {type(preset).__name__}")
    if family is not None and family not in known_families():
        raise ValueError(f"family must be one of {', '.join(known_families())}, got {family!r}")
    if preset is not None and family is not None and preset.family != family:
        raise ValueError(f"family={family!r} contradicts preset {preset.name!r}, which is for family {preset.family!r}")
    wanted = preset.family if preset is not None else family
    if torch_dtype is not None and (not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point):
        raise TypeError(f"torch_dtype must be a floating torch.dtype such as torch.bfloat16, got {torch_dtype!r}")
    if torch_dtype is not None and from_pretrained_kwargs.get("dtype") is not None:
        raise ValueError("pass torch_dtype or dtype, not both")
    dtype = torch_dtype if torch_dtype is not None else from_pretrained_kwargs.pop("dtype", None)
    from_pretrained_kwargs.pop("dtype", None)

    if model is None and wanted in (None, "wan"):
        pipe = _embedded(dtype, device, from_pretrained_kwargs)
    else:
        if model is None:
            if preset is None:
                raise ValueError(
                    f"model=None gives the embedded demo pipeline, which is a Wan pipeline; for family {wanted!r} "
                    f"pass model= (a diffusers pipeline folder or a hub id) or a {wanted} preset"
                )
            model = preset.model
            logger.info("diffattn: loading preset %s's default checkpoint %s", preset.name, model)
        hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
        index, shown = _model_index(model, hub_kwargs)
        _check_family(_family_of_index(index, shown), wanted, shown, preset)
        _check_call_settings(preset, index.get("_class_name"), shown)

        from diffusers import DiffusionPipeline

        if dtype is not None:
            from_pretrained_kwargs["dtype"] = dtype
        pipe = DiffusionPipeline.from_pretrained(model, **from_pretrained_kwargs)
        _check_family(family_of(pipe), wanted, shown, preset)  # what was built, not only what the index said
        if device is not None:
            pipe.to(device)
        setattr(pipe, EMBEDDED_MARK, False)

    handle = preset.apply(pipe, impl=impl) if preset is not None else None
    return pipe, handle


def _embedded(dtype, device, from_pretrained_kwargs: dict):
    from .embedded import build_embedded_wan_pipeline

    given = sorted(k for k, v in from_pretrained_kwargs.items() if v is not None)
    if given:
        raise TypeError(f"model=None builds the embedded demo pipeline, which takes no from_pretrained arguments; got {given}")
    logger.warning(
        "diffattn: model=None: using the EMBEDDED DEMO pipeline, a tiny Wan trained on clips of coloured shapes "
        "(it draws prompts like 'a red circle moving right' and nothing else). Pass model= a checkpoint for real "
        "generation."
    )
    pipe = build_embedded_wan_pipeline(device=device or "cpu", dtype=dtype or torch.float32)
    setattr(pipe, EMBEDDED_MARK, True)
    return pipe
