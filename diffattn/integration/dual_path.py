"""FreeSwim's dual path on a Wan transformer: a window branch and a full-attention branch
(arXiv 2511.14712, METHODS section 2).

Above its training resolution every self-attention query of the *window branch* attends an
inward-shifted spatial window of the training-resolution token extent over all frames
(``SlidingWindow((None, kh, kw))``), so its receptive field stays at the training scale. The
*full branch* runs the same latents through full self-attention. Its text cross-attention
output replaces the window branch's in every block (the cross-attention override), so the
semantics come from a full receptive field while the details come from the window.

The full branch is only computed on guide steps (the first step, then every ``guide_every``
steps); in between, the window branch replays the per-block cross-attention outputs recorded at
the last guide step.

Wan 2.2's two-expert models (``transformer`` for the high-noise steps, ``transformer_2`` for the
low-noise ones) get the dual path on both experts, sharing one store. Recorded outputs are never
replayed across experts (their weights differ): the first step an expert runs is always a guide
step, the store is cleared at the switch, and every stored output remembers its expert. The unconditional (negative-prompt) pass of classifier-free guidance runs
the window branch alone with its own cross-attention, as in the original. Both branches scale
their self-attention logits by ``scale_factor`` (FreeSwim's attention-scale correction).

Installed with :meth:`DualPath.install` through diffusers' public extension points only
(``set_attn_processor`` via ``diffattn.apply``); the caller's denoising loop runs each
transformer call through :meth:`DualPath.conditional` or :meth:`DualPath.unconditional`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..patterns.window import SlidingWindow
from .cross_attention_override import CrossAttentionOverride, CrossAttentionStore

__all__ = ["BRANCHES", "BranchCore", "DualPath"]

BRANCHES = ("window", "full")
WAN_TRANSFORMERS = ("WanTransformer3DModel",)


class BranchCore:
    """Stands in for a processor's ``SparseAttentionCore``: the window branch (the wrapped core's
    sparse attention) or the full branch (dense attention through diffusers' dispatcher), with the
    logits scaled by ``scale_factor``.

    Args:
        inner: the processor's ``SparseAttentionCore``.
        scale_factor: multiplies the softmax scale ``D ** -0.5`` of both branches. 1.0 = none.

    ``branch`` (attribute, default ``"window"``): which branch the next calls compute.
    """

    def __init__(self, inner, scale_factor: float = 1.0):
        self.inner = inner
        self.scale_factor = float(scale_factor)
        self.branch = "window"

    def __getattr__(self, name):  # layer, state, pattern, ... are the wrapped core's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend=None, parallel_config=None,
               attn_mask: torch.Tensor | None = None, visual_only: bool = False) -> torch.Tensor:
        """``[B, S, H, D]`` in, ``[B, S, H, D]`` out."""
        if self.branch == "full":
            return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                         scale=self.scale_factor * q.shape[-1] ** -0.5, backend=backend,
                                         parallel_config=parallel_config)
        if self.scale_factor != 1.0:
            q = q * self.scale_factor  # (s q) . k = s (q . k): the wrapped core keeps its D ** -0.5
        return self.inner.attend(q, k, v, backend=backend, parallel_config=parallel_config, attn_mask=attn_mask,
                                 visual_only=visual_only)


def _check_guide_every(guide_every) -> None:
    if guide_every is not None and (isinstance(guide_every, bool) or not isinstance(guide_every, int) or guide_every < 1):
        raise ValueError(f"guide_every must be an int >= 1 (the full branch runs every k steps) or None "
                         f"(window branch only), got {guide_every!r}")


class DualPath:
    """The window and full branches installed on a Wan transformer, or on both experts of a Wan 2.2
    two-expert model.

    Build it with :meth:`install`; run the denoising loop's transformer calls through
    :meth:`conditional` (prompt pass) and :meth:`unconditional` (negative-prompt pass), naming the
    expert that runs; :meth:`remove` restores diffusers' processors.

    Attributes:
        guide_every: the full branch runs on the first conditional step of each expert and then
            every k steps after the last guide step (steps ``0, k, 2k, ...`` for one expert starting
            at 0); None: never (the window branch alone, with its own cross-attention).
        store: the recorded per-block cross-attention outputs of the full branch, shared by the
            experts and cleared when the expert changes.
        full_passes, window_passes: transformer calls of each branch so far (all experts).
        guide_steps: ``(step, expert)`` of every guide step so far.
        expert_switches: how many times the conditional pass changed expert.
    """

    def __init__(self, transformers: list, handles: list, cores: list[list[BranchCore]],
                 overrides: list[list[CrossAttentionOverride]], store: CrossAttentionStore, guide_every: int | None):
        self.transformers = transformers
        self.handles = handles
        self.expert_cores = cores
        self.expert_overrides = overrides
        self.cores = [core for expert in cores for core in expert]
        self.overrides = [override for expert in overrides for override in expert]
        self.store = store
        self.guide_every = guide_every
        self.reset()

    @property
    def transformer(self):
        """The first (or only) expert."""
        return self.transformers[0]

    @property
    def handle(self):
        return self.handles[0]

    @property
    def num_experts(self) -> int:
        return len(self.transformers)

    @classmethod
    def install(cls, transformer: torch.nn.Module | Sequence[torch.nn.Module], window: SlidingWindow, *,
                guide_every: int | None = 2, scale_factor: float = 1.0, store_dtype: torch.dtype | None = None,
                offload: bool = False, impl: str = "auto") -> "DualPath":
        """Install the dual path on ``transformer``: a ``WanTransformer3DModel``, or a sequence of
        them, one per expert (Wan 2.2: ``[pipe.transformer, pipe.transformer_2]``; expert ``i`` is
        the i-th).

        Args:
            window: the window branch's self-attention pattern, e.g. ``SlidingWindow((None, 31, 53))``.
            guide_every: run the full branch every k conditional steps of an expert (and on its first);
                None: never. Default 2.
            scale_factor: multiplies both branches' softmax scale. Default 1.0.
            store_dtype, offload: how the recorded cross-attention outputs are kept
                (:class:`CrossAttentionStore`).
            impl: the window branch's attention implementation (``diffattn.attention``).

        >>> from diffusers import WanTransformer3DModel
        >>> from diffattn import SlidingWindow
        >>> model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...                               out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2)
        >>> dual = DualPath.install(model, SlidingWindow((None, 3, 3)), guide_every=2)
        >>> dual
        DualPath(window=SlidingWindow(window=(None, 3, 3), stride=1, dilation=1), guide_every=2, scale_factor=1.0, 2 blocks)
        >>> dual.remove()
        """
        from .apply import apply

        experts = list(transformer) if isinstance(transformer, (list, tuple)) else [transformer]
        if not experts:
            raise ValueError("transformer must be a Wan transformer or a non-empty sequence of them (one per expert)")
        for i, model in enumerate(experts):
            name = type(model).__name__
            if name not in WAN_TRANSFORMERS:
                raise ValueError(f"the dual path (FreeSwim) supports Wan transformers ({', '.join(WAN_TRANSFORMERS)}), "
                                 f"got {name}" + (f" as expert {i}" if len(experts) > 1 else ""))
        if len({id(model) for model in experts}) != len(experts):
            raise ValueError("the experts must be distinct transformer modules, got the same module twice")
        if not isinstance(window, SlidingWindow):
            raise TypeError(f"window must be a diffattn.SlidingWindow, got {type(window).__name__}")
        _check_guide_every(guide_every)
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) or not 0 < scale_factor < float("inf"):
            raise ValueError(f"scale_factor must be a positive number, got {scale_factor!r}")
        store = CrossAttentionStore(store_dtype, offload)
        handles, cores, overrides = [], [], []
        try:
            for expert, model in enumerate(experts):
                handles.append(apply(model, window, impl=impl))
                expert_cores, expert_overrides = _install_branches(model, expert, store, scale_factor)
                cores.append(expert_cores)
                overrides.append(expert_overrides)
        except Exception:
            from .apply import remove

            for model in experts[:len(handles)]:
                remove(model)
            raise
        return cls(experts, handles, cores, overrides, store, guide_every)

    # --- branch switching -------------------------------------------------------------

    @contextlib.contextmanager
    def _branch(self, branch: str, cross: str):
        for core in self.cores:
            core.branch = branch
        for override in self.overrides:
            override.mode = cross
        try:
            yield
        finally:
            for core in self.cores:
                core.branch = "window"
            for override in self.overrides:
                override.mode = "pass"

    def _check_call(self, step: int, expert: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be an int in [0, {self.num_experts}) (the index of the transformer that "
                             f"runs), got {expert!r}")

    def is_guide_step(self, step: int, expert: int = 0) -> bool:
        """Whether :meth:`conditional` at ``step`` (0-based) with ``expert`` runs the full branch: on
        the first conditional step since :meth:`reset`, on the first step of a different expert than
        the last guide step's, and ``guide_every`` or more steps after the last guide step."""
        self._check_call(step, expert)
        if self.guide_every is None:
            return False
        last = self._guided_step
        return last is None or expert != self._guided_expert or step - last >= self.guide_every

    def conditional(self, run: Callable[[], torch.Tensor], step: int, expert: int = 0) -> torch.Tensor:
        """The prompt pass of denoising step ``step`` run by expert ``expert`` (0 = ``transformer``,
        1 = ``transformer_2``): ``run()`` calls that expert once per branch needed; returns the window
        branch's output.

        On a guide step the full branch runs first and records its cross-attention outputs; the
        window branch then uses them in place of its own. Between guide steps the window branch
        replays the outputs of the last guide step. When the expert changes, the store is cleared
        and the step is a guide step. Steps must increase within a generation (:meth:`reset`
        starts a new one).
        """
        self._check_call(step, expert)
        if self._last_step is not None and step <= self._last_step:
            raise RuntimeError(f"step {step} does not follow step {self._last_step}: conditional steps must increase "
                               "within a generation; call reset() before a new generation")
        self._last_step = step
        if self.guide_every is None:
            return self.unconditional(run, expert)
        if self.is_guide_step(step, expert):
            if self.store.recorded_by() - {expert}:
                self.store.clear()  # another expert's outputs: never replayed here, and their memory is freed
                self.expert_switches += 1
            with self._branch("full", "record"):
                run()
            self.full_passes += 1
            self._guided_step, self._guided_expert = step, expert
            self.guide_steps.append((step, expert))
        with self._branch("window", "replace"):
            out = run()
        self.window_passes += 1
        return out

    def unconditional(self, run: Callable[[], torch.Tensor], expert: int = 0) -> torch.Tensor:
        """A pass of the window branch alone, with its own cross-attention (classifier-free
        guidance's negative-prompt pass, and every pass when ``guide_every`` is None). ``expert``
        only checks the index; the store is not used."""
        self._check_call(0, expert)
        with self._branch("window", "pass"):
            out = run()
        self.window_passes += 1
        return out

    # --- bookkeeping ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the recorded outputs and counters (a new generation)."""
        self.store.clear()
        self.store.peak_bytes = 0
        self.full_passes = self.window_passes = self.expert_switches = 0
        self.guide_steps: list[tuple[int, int]] = []
        self._guided_step: int | None = None
        self._guided_expert: int | None = None
        self._last_step: int | None = None

    def remove(self) -> None:
        """Restore the processors every expert had before :meth:`install`."""
        from .apply import remove

        self.store.clear()
        failures = []
        for model in self.transformers:  # every expert, even when one of them fails
            try:
                remove(model)
            except Exception as exc:  # noqa: BLE001 - reported after the others are restored
                failures.append(exc)
        if failures:
            raise failures[0]

    def record(self) -> dict:
        """Settings, pass counts, guide steps and cache memory for a JSON record."""
        store = self.store
        blocks = max(len(overrides) for overrides in self.expert_overrides)
        return {"guide_every": self.guide_every, "scale_factor": self.cores[0].scale_factor if self.cores else None,
                "experts": self.num_experts, "full_passes": self.full_passes, "window_passes": self.window_passes,
                "guide_steps": [list(entry) for entry in self.guide_steps], "expert_switches": self.expert_switches,
                "cross_cache": {"store_dtype": str(store.store_dtype).replace("torch.", "") if store.store_dtype else None,
                                "offload": store.offload, "peak_bytes": store.peak_bytes,
                                "blocks": blocks, "peak_bytes_per_block": store.peak_bytes // max(blocks, 1)}}

    def __repr__(self) -> str:
        factor = self.cores[0].scale_factor if self.cores else None
        blocks = " + ".join(str(len(cores)) for cores in self.expert_cores)
        experts = f", {self.num_experts} experts" if self.num_experts > 1 else ""
        return (f"DualPath(window={self.handle.pattern}, guide_every={self.guide_every}, scale_factor={factor}, "
                f"{blocks} blocks{experts})")


def _install_branches(transformer, expert: int, store: CrossAttentionStore,
                      scale_factor: float) -> tuple[list[BranchCore], list[CrossAttentionOverride]]:
    """Wrap the sparse self-attention cores of ``transformer`` (diffattn applied) in
    :class:`BranchCore` and put a :class:`CrossAttentionOverride` on every block's ``attn2``."""
    processors = dict(transformer.attn_processors)
    cores, overrides = [], []
    for layer, _ in enumerate(transformer.blocks):
        self_name, cross_name = f"blocks.{layer}.attn1.processor", f"blocks.{layer}.attn2.processor"
        proc = processors[self_name]
        proc.core = BranchCore(proc.core, scale_factor)
        cores.append(proc.core)
        override = CrossAttentionOverride(processors[cross_name], layer, store, expert)
        processors[cross_name] = override
        overrides.append(override)
    transformer.set_attn_processor(processors)
    return cores, overrides
