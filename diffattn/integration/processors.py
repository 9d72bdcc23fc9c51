"""A transformer's attention processors as a ``{name: processor}`` dict, read and set.

Most diffusers transformers inherit ``AttentionMixin`` and have ``attn_processors`` /
``set_attn_processor``; those are used as they are. A few do not (``MochiTransformer3DModel``,
``CosmosTransformer3DModel`` and ``ZImageTransformer2DModel`` in diffusers 0.42), while their attention
modules still hold a processor: ``Attention`` / ``AttentionModuleMixin`` modules through their
``get_processor`` / ``set_processor``, and ``MochiAttention`` as its ``processor`` attribute (its
constructor argument), which its ``forward`` calls. For those the same dict is built from the
modules, with the names diffusers' ``attn_processors`` would give (``"<module path>.processor"``).
"""

from __future__ import annotations

import torch

_SUFFIX = ".processor"


def _holds_processor(module: torch.nn.Module) -> bool:
    if hasattr(module, "get_processor"):
        return True
    processor = getattr(module, "processor", None)
    return callable(processor) and not isinstance(processor, torch.nn.Module)


def attn_processors(model: torch.nn.Module) -> dict:
    """``{name: processor}`` of every attention module of ``model``."""
    if hasattr(model, "attn_processors"):
        return dict(model.attn_processors)
    found = {}
    for name, module in model.named_modules():
        if name and _holds_processor(module):
            found[name + _SUFFIX] = module.get_processor() if hasattr(module, "get_processor") else module.processor
    return found


def set_attn_processors(model: torch.nn.Module, processors: dict) -> None:
    """Give every attention module of ``model`` its processor from ``processors`` (all of them named,
    as ``set_attn_processor`` requires)."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(processors)
        return
    names = set(attn_processors(model))
    if set(processors) != names:
        missing, unknown = sorted(names - set(processors)), sorted(set(processors) - names)
        raise ValueError(f"processors must name every attention module of this {type(model).__name__}; "
                         f"missing {missing}, unknown {unknown}")
    modules = dict(model.named_modules())
    for name, processor in processors.items():
        module = modules[name[: -len(_SUFFIX)]]
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor
