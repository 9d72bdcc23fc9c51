"""``diffattn.apply`` / ``diffattn.remove``: install sparse self-attention into a diffusers model.

Only diffusers' public extension points are used: ``set_attn_processor`` for the processors (or,
for transformers without it, each attention module's own processor slot; see ``processors``) and
a ``diffusers.hooks`` ``ModelHook`` on the transformer for the generation state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry

from ..attention import IMPLS
from ..patterns.base import Pattern
from .core import Schedule, SparseAttentionCore
from .step_cache import StepCache
from .families import all_adapters
from .processors import attn_processors, set_attn_processors
from .state import HOOK_NAME, GenerationState, GenerationStateHook

TRANSFORMER_ATTRS = ("transformer", "transformer_2")  # Wan 2.2 has two experts


@dataclass
class SparseHandle:
    """What ``apply`` replaced: per transformer attribute, the processor names now sparse."""

    family: str
    pattern: Pattern
    schedule: Schedule
    impl: str
    replaced: dict[str, list[str]]
    states: dict[str, GenerationState] = field(repr=False)
    cache: StepCache | None = None

    def cache_bytes(self) -> int:
        """Bytes the step cache holds now, over every transformer, layer and CFG branch."""
        return sum(state.cache_bytes() for state in self.states.values())

    def peak_cache_bytes(self) -> int:
        """The most the step cache held during the last generation."""
        return sum(state.peak_cache_bytes for state in self.states.values())

    def cache_bytes_per_layer(self) -> dict:
        """``{(transformer, layer, branch): bytes}`` of the step cache now."""
        return {(name, layer, branch): entry.nbytes for name, state in self.states.items()
                for (layer, branch), entry in state.cache.items()}

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {len(procs)} sparse attention processors" for name, procs in self.replaced.items())
        cache = "" if self.cache is None else f", cache={self.cache}"
        return (f"SparseHandle(family={self.family}, pattern={self.pattern}, dense_steps={self.schedule.dense_steps}, "
                f"dense_layers={self.schedule.dense_layers}, dense_last_steps={self.schedule.dense_last_steps}, "
                f"impl={self.impl!r}{cache}; {parts})")


def _transformers(target) -> tuple[dict[str, torch.nn.Module], object]:
    """``({attribute: transformer}, scheduler or None)`` of a pipeline or a bare transformer."""
    if isinstance(target, torch.nn.Module):
        return {"transformer": target}, None
    found = {name: getattr(target, name) for name in TRANSFORMER_ATTRS if isinstance(getattr(target, name, None), torch.nn.Module)}
    if not found:
        raise TypeError(f"target must be a diffusers pipeline with a transformer or a transformer model, got {type(target).__name__}")
    return found, getattr(target, "scheduler", None)


def _adapter_for(transformer: torch.nn.Module):
    name = type(transformer).__name__
    adapters = all_adapters()
    for adapter in adapters:
        if name in adapter.transformer_classes:
            return adapter
    supported = sorted(c for a in adapters for c in a.transformer_classes)
    raise ValueError(f"diffattn has no adapter for {name}; supported transformers: {', '.join(supported)}")


def _installed_hook(transformer: torch.nn.Module) -> GenerationStateHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(HOOK_NAME) if registry is not None else None


def apply(target, pattern: Pattern, *, dense_steps: int = 0, dense_layers: int = 0, dense_last_steps: int = 0,
          cache=None, impl: str = "auto", selection_every: int = 1) -> SparseHandle:
    """Make the DiT's visual self-attention sparse.

    Args:
        target: a diffusers pipeline (its ``transformer``, and ``transformer_2`` when present)
            or a transformer model.
        pattern: the attention pattern (``Dense()``, ``SlidingWindow(...)``, ``Radial(...)``).
        dense_steps: the first N denoising steps stay dense. Default 0.
        dense_layers: the first L transformer blocks stay dense. Default 0.
        dense_last_steps: the last M steps stay dense (needs a pipeline target). Default 0.
        cache: a ``StepCache`` to reuse the block-external attention across steps (None: off).
        impl: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``diffattn.attention``).
        selection_every: dynamic patterns re-select their blocks every k steps (per layer and
            CFG branch) and reuse the selection in between. Default 1.

    Returns:
        A ``SparseHandle`` describing what was replaced. Applying again replaces the previous
        installation cleanly; ``diffattn.remove(target)`` restores diffusers' processors.

    >>> import diffattn
    >>> from diffusers import WanTransformer3DModel
    >>> model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
    ...                               out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2)
    >>> diffattn.apply(model, diffattn.SlidingWindow((3, 5, 5)), dense_layers=1)
    SparseHandle(family=wan, pattern=SlidingWindow(window=(3, 5, 5), stride=1, dilation=1), dense_steps=0, dense_layers=1, dense_last_steps=0, impl='auto'; transformer: 2 sparse attention processors)
    >>> diffattn.remove(model)
    """
    schedule = _check(pattern, impl, cache, dense_steps, dense_layers, dense_last_steps, selection_every)
    transformers, scheduler = _transformers(target)
    adapters = {name: _adapter_for(t) for name, t in transformers.items()}
    replaced, states = {}, {}
    for attr, transformer in transformers.items():
        processors, names, state = _install_state(transformer, adapters[attr], pattern, schedule, impl, scheduler, cache)
        set_attn_processors(transformer, processors)
        replaced[attr], states[attr] = names, state
    family = next(iter(adapters.values())).name
    return SparseHandle(family, pattern, schedule, impl, replaced, states, cache)


def sparse_processors(transformer: torch.nn.Module, pattern: Pattern, *, dense_steps: int = 0, dense_layers: int = 0,
                      dense_last_steps: int = 0, impl: str = "auto", scheduler=None, cache: StepCache | None = None,
                      selection_every: int = 1) -> dict:
    """Processors for ``transformer.set_attn_processor(...)``, for code that installs processors
    itself.

    The generation-state hook the processors read (token grid, step index) is registered on
    ``transformer`` here; pass the pipeline's ``scheduler`` so steps come from its timesteps
    (otherwise they are counted from timestep changes). ``diffattn.remove(transformer)`` undoes
    both.

    >>> import diffattn
    >>> from diffusers import WanTransformer3DModel
    >>> model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
    ...                               out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2)
    >>> model.set_attn_processor(diffattn.sparse_processors(model, diffattn.Radial(0.2)))
    >>> diffattn.remove(model)
    """
    schedule = _check(pattern, impl, cache, dense_steps, dense_layers, dense_last_steps, selection_every)
    processors, _, _ = _install_state(transformer, _adapter_for(transformer), pattern, schedule, impl, scheduler, cache)
    return processors


def _check(pattern, impl, cache, dense_steps, dense_layers, dense_last_steps, selection_every=1) -> Schedule:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a diffattn pattern (Dense, SlidingWindow, Radial, ...), got {type(pattern).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if cache is not None and not isinstance(cache, StepCache):
        raise TypeError(f"cache must be a diffattn.StepCache or None, got {type(cache).__name__}")
    if cache is not None and not pattern.is_dense and getattr(pattern, "first_order", None) is not None:
        raise ValueError("cache= does not apply to Piecewise: it already covers every key")
    return Schedule(dense_steps, dense_layers, dense_last_steps, selection_every)


def _install_state(transformer, adapter, pattern, schedule, impl, scheduler, cache=None):
    """Register the generation-state hook (replacing an earlier installation) and build the
    processor dict: diffusers' processors with the sparse targets swapped in."""
    if _installed_hook(transformer) is not None:
        _remove_one(transformer)
    state = GenerationState()
    original = attn_processors(transformer)
    processors = dict(original)
    names = adapter.sparse_processor_names(transformer)
    layers = adapter.processor_layers(transformer) if hasattr(adapter, "processor_layers") else range(len(names))
    for slot, (layer, name) in enumerate(zip(layers, names)):
        proc = adapter.processor_class(SparseAttentionCore(pattern, schedule, layer, state, impl, cache, slot))
        proc._attention_backend = getattr(original[name], "_attention_backend", None)
        proc._parallel_config = getattr(original[name], "_parallel_config", None)
        processors[name] = proc
    hook = GenerationStateHook(adapter, state, scheduler, sparse=not pattern.is_dense)
    hook.original_processors = original
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    return processors, names, state


def move_state_hook_outermost(transformer: torch.nn.Module) -> None:
    """Re-register diffattn's generation-state hook (if installed) as the transformer's outermost
    hook, so it sees the call's inputs before any hook registered since (diffusers' context-parallel
    input split) changes them."""
    hook = _installed_hook(transformer)
    if hook is None:
        return
    registry = transformer._diffusers_hook
    registry.remove_hook(HOOK_NAME, recurse=False)
    registry.register_hook(hook, HOOK_NAME)


def _remove_one(transformer: torch.nn.Module) -> None:
    hook = _installed_hook(transformer)
    current = attn_processors(transformer)
    for name, proc in hook.original_processors.items():
        # enable_parallelism after apply configured diffattn's processors only: hand the setting on
        config = getattr(current.get(name), "_parallel_config", None)
        if config is not None and hasattr(proc, "_parallel_config") and proc._parallel_config is None:
            proc._parallel_config = config
    set_attn_processors(transformer, hook.original_processors)
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)


def remove(target) -> None:
    """Restore the attention processors ``apply`` replaced (outputs are then bit-identical to
    before ``apply``). Raises ValueError if diffattn is not applied to ``target``."""
    transformers, _ = _transformers(target)
    applied = [t for t in transformers.values() if _installed_hook(t) is not None]
    if not applied:
        raise ValueError(f"diffattn is not applied to this {type(target).__name__}")
    for transformer in applied:
        _remove_one(transformer)
