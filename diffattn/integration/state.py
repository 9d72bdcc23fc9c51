"""Per-generation state read from the transformer's inputs, never from counting attention calls.

A ``GenerationStateHook`` (a diffusers ``ModelHook``) runs before every transformer forward and
records the token layout of the call and the denoising step index. The step index comes from
the pipeline's scheduler when diffattn was applied to a pipeline (the position of the call's
timestep in ``scheduler.timesteps``, so CFG calls of one step share it and every generation
starts at 0); applied to a bare transformer it counts timestep changes and starts again when
the timestep goes up (a new generation). Some pipelines hand the transformer their timestep in
other units than the scheduler's (Cosmos 2 passes ``sigma / (sigma + 1)`` beside ``1000 * sigma``
timesteps): a timestep that is not on the schedule (further from every entry than low-precision
rounding) takes the scheduler's own ``step_index`` (0 before its first step) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..tokens import TokenLayout

HOOK_NAME = "diffattn.generation_state"  # the hook's name in the transformer's diffusers HookRegistry


@dataclass
class GenerationState:
    """What the processors need to know about the current transformer call."""

    step: int = 0
    num_steps: int | None = None
    timestep: float | None = None
    layout: TokenLayout | None = None
    calls: int = 0
    branch: str | None = None  # diffusers' cache_context name ("cond" / "uncond"), if any
    selections: dict = field(default_factory=dict)  # (layer, branch) -> (step, key, kept blocks)
    cache: dict = field(default_factory=dict)  # (layer, branch) -> step_cache.CacheEntry
    head_refreshes: int = 0  # heads refreshed by the drift gates in this generation
    drift_flags: dict = field(default_factory=dict)  # (layer, branch) -> (CacheEntry, bool [H] on the device):
    # the heads the step cache's drift gates flagged at the layer's last call, not read yet
    drift_heads: dict = field(default_factory=dict)  # (layer, branch) -> (CacheEntry, int64 [n] on the CPU):
    # flagged heads, read, to be refreshed at the layer's next call
    drift_reads: int = 0  # reads of the drift flags in this generation (with the timestep's: one per forward)
    mask_lens: tuple | None = None  # (attention mask, layout, text lens) of the current call
    peak_cache_bytes: int = 0

    def reset(self) -> None:
        self.step, self.num_steps, self.timestep, self.layout, self.calls = 0, None, None, None, 0
        self.branch = None
        self.clear_generation()

    def clear_generation(self) -> None:
        """Forget what one generation keeps for its later steps: reused selections, the step cache,
        drift flags, the per-generation counters."""
        self.selections.clear()
        self.cache.clear()
        self.head_refreshes = 0
        self.drift_flags.clear()
        self.drift_heads.clear()
        self.drift_reads = 0
        self.mask_lens = None

    def read_host_values(self, timestep) -> float | None:
        """The call's timestep (its first element, as a float) and the drift flags every gated layer
        left at its last call (turned into head indices in :attr:`drift_heads`), read together: one
        device-to-host copy per transformer forward at most (two only when the timestep and the
        flags live on different devices). Called once before each forward."""
        if not self.drift_flags:
            return _first_timestep(timestep)
        keys = list(self.drift_flags)
        flags = torch.cat([self.drift_flags[key][1].reshape(-1) for key in keys])
        lead = []
        if isinstance(timestep, torch.Tensor) and timestep.numel() and timestep.device == flags.device:
            lead = [timestep.reshape(-1)[:1].to(torch.float64)]
            t = None
        else:
            t = _first_timestep(timestep)
        values = torch.cat(lead + [flags.to(torch.float64)]).tolist()  # the one read
        self.drift_reads += 1
        if lead:
            t, values = values[0], values[1:]
        start = 0
        for key in keys:
            entry, head_flags = self.drift_flags[key]
            heads = [i for i, flagged in enumerate(values[start : start + head_flags.numel()]) if flagged]
            start += head_flags.numel()
            if heads:
                self.drift_heads[key] = (entry, torch.tensor(heads, dtype=torch.int64))
            else:
                self.drift_heads.pop(key, None)
        self.drift_flags.clear()
        return t

    def cache_bytes(self) -> int:
        """Bytes held by the step cache now (every layer and CFG branch)."""
        return sum(entry.nbytes for entry in self.cache.values())


class _ContextOnly(BaseState):
    """diffusers hands each stateful hook's StateManager the current cache context; diffattn only
    reads its name."""

    def reset(self, *args, **kwargs):
        pass


def _first_timestep(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else None
    return float(value)


def match_step(timesteps: torch.Tensor, t: float, scheduler=None) -> int:
    """The index of timestep ``t`` in the scheduler's ``timesteps``.

    The nearest entry, except where the model received its timestep in low precision: a bf16
    Flux call passes ``t / 1000``, which near ``t = 1000`` rounds by up to ~4 units, more than
    the spacing of a long, shifted schedule. Among the entries within that rounding of the nearest,
    the scheduler's own ``step_index`` (the step it is about to take) decides.
    """
    dist = (timesteps.double().cpu() - t).abs()
    best = int(dist.argmin())
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    if isinstance(index, int) and 0 <= index < len(dist) and index != best:
        rounding = abs(t) * 2.0**-7  # bf16's relative spacing (fp16's is finer)
        if float(dist[index]) <= float(dist[best]) + rounding:
            return index
    return best


def on_schedule(timesteps: torch.Tensor, index: int, t: float) -> bool:
    """Whether ``t`` is entry ``index`` of ``timesteps`` up to bf16 rounding (of either value)."""
    entry = float(timesteps[index])
    return abs(entry - t) <= max(abs(entry), abs(t)) * 2.0**-7 + 1e-12


def scheduler_step(scheduler, num_steps: int) -> int:
    """The step the scheduler is about to take: its ``step_index`` (None before the first
    ``step()`` of a generation: its ``begin_index``, else 0), within ``[0, num_steps)``."""
    for name in ("step_index", "begin_index"):
        index = getattr(scheduler, name, None)
        if isinstance(index, int):
            return min(max(index, 0), num_steps - 1)
    return 0


class GenerationStateHook(ModelHook):
    """Records the token layout and step index before each transformer forward."""

    _is_stateful = True

    def __init__(self, adapter, state: GenerationState, scheduler=None, handle=None, sparse: bool = True):
        super().__init__()
        self.adapter = adapter
        self.state = state
        self.scheduler = scheduler
        self.handle = handle
        self.sparse = sparse  # some attention may run sparse (checked under context parallelism)
        self.contexts = StateManager(_ContextOnly)  # receives cache_context("cond" / "uncond")

    def pre_forward(self, module, *args, **kwargs):
        if self.sparse and getattr(module, "_parallel_config", None) is not None:
            self._check_parallel(module)
        state = self.state
        context = self.contexts._context
        state.branch = context.name if context is not None else None
        if state.calls == 0:  # first call of a generation (the state was reset)
            state.peak_cache_bytes = 0
        state.layout = self.adapter.token_layout(module, args, kwargs)
        t = state.read_host_values(self.adapter.timestep(args, kwargs))
        timesteps = getattr(self.scheduler, "timesteps", None) if self.scheduler is not None else None
        if t is not None and timesteps is not None and len(timesteps):
            state.step = match_step(timesteps, t, self.scheduler)
            if not on_schedule(timesteps, state.step, t):
                state.step = scheduler_step(self.scheduler, len(timesteps))
            state.num_steps = len(timesteps)
        elif t is not None:
            if state.timestep is None or t > state.timestep:
                if state.timestep is not None:  # the timestep went up: a new generation
                    state.clear_generation()
                    state.peak_cache_bytes = 0
                state.step = 0
            elif t != state.timestep:
                state.step += 1
        state.timestep = t
        state.calls += 1
        return args, kwargs

    def _check_parallel(self, module) -> None:
        """Under context parallelism: Ulysses only, and this hook must read the global inputs
        (before diffusers splits them). Raised at the first call, not after the dense warm-up."""
        from .parallel import check_hook_order, check_supported, context_parallel_config

        cp = context_parallel_config(module._parallel_config)
        if cp is not None:
            check_supported(cp)
            check_hook_order(module, HOOK_NAME)

    def post_forward(self, module, output):
        if self.state.cache:
            self.state.peak_cache_bytes = max(self.state.peak_cache_bytes, self.state.cache_bytes())
        return output

    def reset_state(self, module):
        self.state.reset()
        return module
