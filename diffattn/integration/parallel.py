"""Sparse attention under diffusers' Ulysses context parallelism.

diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(
ulysses_degree=N))``) splits the token sequence across N ranks and, in every attention call,
exchanges q/k/v with an all-to-all so that each rank holds the whole sequence for ``H / N``
heads; after attention a second all-to-all returns each rank's tokens with all heads. diffattn's
processors take part in the same exchange: the sparse pattern, the block selection and the step
cache run per rank on its heads, over the whole sequence.

Two details make the gathered sequence differ from the transformer call's ``TokenLayout``:

- **Token order.** A model's ``_cp_plan`` splits each of its inputs separately. Flux splits
  ``hidden_states`` (image) and ``encoder_hidden_states`` (text), and every rank concatenates
  ``[text_r; image_r]``, so the gathered sequence is ``[text_0; image_0; text_1; image_1; ...]``.
  Each segment of the layout (text and visual) is treated as split on its own, and the gathered
  tokens are put back in layout order before attention (and returned in gathered order after).
  Wan and LTX split only the visual sequence: the gathered order already is the layout order.
- **Uneven splits.** With ``ulysses_anything=True`` diffusers splits a segment of n tokens with
  ``tensor_split`` (the first ``n % N`` ranks hold one token more) and pads the head dimension to a
  multiple of N (the last rank holds fewer heads). The same sizes are used here; without
  ``ulysses_anything``, sequence segments and heads must divide evenly.

Only Ulysses is supported. Ring attention (``ring_degree > 1``, alone or unified with Ulysses)
is refused with a ``NotImplementedError``: a ring rank sees one key chunk at a time, and a static
or selected block pattern over the global sequence would have to be cut per chunk.

>>> from diffattn.integration.parallel import ulysses_bytes_per_layer
>>> ulysses_bytes_per_layer(seq_len=32760, heads=40, head_dim=128, degree=2).per_rank_sent
335462400
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..tokens import TokenLayout

SUPPORTED_MODE = "Ulysses (ContextParallelConfig(ulysses_degree=N), optionally ulysses_anything=True)"
CP_INPUT_HOOK = "cp_input---"  # diffusers' name of the input-split hook on the transformer itself ("" in _cp_plan)


def context_parallel_config(parallel_config):
    """The ``ContextParallelConfig`` inside a processor's ``_parallel_config`` (a diffusers
    ``ParallelConfig``, or a ``ContextParallelConfig`` itself), or None."""
    if parallel_config is None:
        return None
    if hasattr(parallel_config, "ulysses_degree"):
        return parallel_config
    return getattr(parallel_config, "context_parallel_config", None)


def check_supported(cp) -> None:
    """Raise ``NotImplementedError`` unless ``cp`` (a ``ContextParallelConfig``) is Ulysses only."""
    ring = getattr(cp, "ring_degree", 1) or 1
    if ring > 1:
        raise NotImplementedError(
            f"diffattn's sparse attention supports diffusers' context parallelism in {SUPPORTED_MODE} mode only; "
            f"got ring_degree={ring}, ulysses_degree={cp.ulysses_degree} (ring attention). Use "
            f"ContextParallelConfig(ulysses_degree=N) with ring_degree=1, or diffattn.remove() the sparse processors "
            "to run diffusers' ring attention densely"
        )


def split_sizes(n: int, world: int, uneven: bool) -> list[int]:
    """How diffusers splits ``n`` tokens over ``world`` ranks: ``tensor.chunk`` of an evenly
    divisible segment, or ``tensor_split`` (first ``n % world`` ranks one token more) when
    ``uneven`` (``ulysses_anything``)."""
    if not uneven:
        if n % world:
            raise ValueError(
                f"a segment of {n} tokens does not split evenly over ulysses_degree={world}; use "
                "ContextParallelConfig(ulysses_degree=N, ulysses_anything=True) for uneven splits"
            )
        return [n // world] * world
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def layout_segments(layout: TokenLayout) -> list[int]:
    """Token counts of the layout's segments in sequence order (text and visual), empty ones left out."""
    text, visual = layout.text_len, layout.num_visual
    ordered = [text, visual] if layout.text_first else [visual, text]
    return [n for n in ordered if n]


@functools.lru_cache(maxsize=64)
def _gathered_positions(segments: tuple[int, ...], world: int, uneven: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    sizes = [split_sizes(n, world, uneven) for n in segments]
    if len(segments) == 1:
        return None  # one segment: the gathered order is the layout order
    starts = [sum(segments[:i]) for i in range(len(segments))]
    global_of_gathered = []  # gathered position -> layout position
    for r in range(world):
        for seg, start in enumerate(starts):
            first = start + sum(sizes[seg][:r])
            global_of_gathered.extend(range(first, first + sizes[seg][r]))
    to_global = torch.tensor(global_of_gathered, dtype=torch.long)
    return to_global, torch.argsort(to_global)


def gathered_order(layout: TokenLayout, world: int, uneven: bool = False,
                   device="cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(layout_of_gathered, gathered_of_layout)``, two ``long [S]`` permutations, or None when
    the gathered sequence already is in layout order.

    After Ulysses' all-to-all, position ``p`` of the gathered sequence holds layout token
    ``layout_of_gathered[p]``; ``gathered[:, gathered_of_layout]`` is in layout order.

    >>> from diffattn import TokenLayout
    >>> gathered_order(TokenLayout((2, 2), text_len=2), world=2)[0].tolist()  # [t0; i0 i1; t1; i2 i3]
    [0, 2, 3, 1, 4, 5]
    """
    return _gathered_on(tuple(layout_segments(layout)), world, uneven, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _gathered_on(segments: tuple[int, ...], world: int, uneven: bool, device: str):
    # once per device: the permutations index q/k/v of every sparse attention call
    order = _gathered_positions(segments, world, uneven)
    return None if order is None else tuple(t.to(device) for t in order)


@dataclass(frozen=True)
class UlyssesShard:
    """One rank's share of one attention call under Ulysses: heads ``[head_start, head_start +
    head_count)`` of ``num_heads`` over the whole sequence.

    ``to_heads`` turns ``[B, S_local, H, D]`` (this rank's tokens, every head) into
    ``[B, S, H_local, D]`` in layout order; ``to_sequence`` is its inverse for the output.
    """

    group: object
    world: int
    rank: int
    uneven: bool
    num_heads: int
    head_start: int
    head_count: int
    local_len: int
    order: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def heads(self) -> tuple[int, int]:
        """``(first, stop)``: the global indices of the heads this rank attends."""
        return self.head_start, self.head_start + self.head_count

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S_local, H, D]`` -> ``[B, S, H_local, D]``, tokens in layout order."""
        from diffusers.models.attention_dispatch import _all_to_all_dim_exchange, all_to_all_single_any_qkv_async

        if self.uneven:
            x = all_to_all_single_any_qkv_async(x.contiguous(), self.group)()
        else:
            x = _all_to_all_dim_exchange(x.contiguous(), scatter_idx=2, gather_idx=1, group=self.group)
        if self.order is not None:
            x = x.index_select(1, self.order[1])
        return x

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, H_local, D]`` in layout order -> ``[B, S_local, H, D]`` (this rank's tokens)."""
        from diffusers.models.attention_dispatch import _all_to_all_dim_exchange, all_to_all_single_any_o_async

        if self.order is not None:
            x = x.index_select(1, self.order[0])
        x = x.contiguous()
        if self.uneven:
            return all_to_all_single_any_o_async(x, self.group, NUM_QO_HEAD=self.num_heads, Q_S_LOCAL=self.local_len)()
        return _all_to_all_dim_exchange(x, scatter_idx=1, gather_idx=2, group=self.group)


def ulysses_shard(parallel_config, layout: TokenLayout, q: torch.Tensor) -> UlyssesShard | None:
    """This rank's ``UlyssesShard`` for an attention call with local ``q [B, S_local, H, D]``, or
    None when ``parallel_config`` holds no context parallelism.

    Raises ``NotImplementedError`` for ring attention, ``ValueError`` when heads or segments do
    not split evenly without ``ulysses_anything``, and ``RuntimeError`` when this rank's token
    count is not the layout's share (the layout must describe the global sequence)."""
    cp = context_parallel_config(parallel_config)
    if cp is None:
        return None
    check_supported(cp)
    world, uneven = cp.ulysses_degree, bool(cp.ulysses_anything)
    group = cp._ulysses_mesh.get_group()
    rank = dist.get_rank(group)
    heads = q.shape[2]
    if uneven:
        per_rank = -(-heads // world)
        head_start = rank * per_rank
        head_count = max(0, min(per_rank, heads - head_start))
    else:
        if heads % world:
            raise ValueError(
                f"{heads} attention heads do not split evenly over ulysses_degree={world}; use "
                "ContextParallelConfig(ulysses_degree=N, ulysses_anything=True)"
            )
        head_count = heads // world
        head_start = rank * head_count
    sizes = [split_sizes(n, world, uneven) for n in layout_segments(layout)]
    expected = sum(s[rank] for s in sizes)
    if q.shape[1] != expected:
        raise RuntimeError(
            f"diffattn: under Ulysses rank {rank} of {world} received {q.shape[1]} tokens, but its share of the "
            f"transformer call's token layout {layout} is {expected}. The layout must describe the global sequence: "
            "call diffattn.apply after transformer.enable_parallelism (or use "
            "diffattn.integration.parallel.enable_ulysses, which takes care of the order)"
        )
    return UlyssesShard(group, world, rank, uneven, heads, head_start, head_count, q.shape[1],
                        gathered_order(layout, world, uneven, q.device))


def check_hook_order(transformer: torch.nn.Module, hook_name: str) -> None:
    """Raise when the transformer's context-parallel input split runs before diffattn's
    generation-state hook: that hook would read one rank's share of the inputs, not the global
    token layout and timestep."""
    registry = getattr(transformer, "_diffusers_hook", None)
    order = list(getattr(registry, "_hook_order", ()))
    if CP_INPUT_HOOK in order and hook_name in order and order.index(hook_name) < order.index(CP_INPUT_HOOK):
        raise RuntimeError(
            f"diffattn was applied to this {type(transformer).__name__} before transformer.enable_parallelism(...), so "
            "diffusers splits the inputs before diffattn reads the token layout. Call diffattn.apply after "
            "enable_parallelism, or enable parallelism with diffattn.integration.parallel.enable_ulysses (any order)"
        )


# --- set-up -------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process stands: ``rank`` of ``world_size`` (1 without parallelism), its device,
    and the Ulysses degree. Only the main process (rank 0) should write outputs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    degree: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(degree: int) -> ParallelInfo:
    """Join the process group of a ``torchrun`` launch (once; NCCL on CUDA, Gloo otherwise; the
    CUDA device is ``LOCAL_RANK``) and say where this process stands. ``degree`` 1: a single
    process, nothing to join. Call it before loading the pipeline to know its device.

    Raises ``RuntimeError`` when ``degree > 1`` but the process was not started by torchrun, and
    ``ValueError`` when ``degree`` is not the number of processes."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an int >= 1, got {degree!r}")
    cuda = torch.cuda.is_available()
    if degree == 1:
        return ParallelInfo(0, 1, 0, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"), 1)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                f"ulysses degree {degree} needs one process per rank: launch with "
                f"'torchrun --nproc-per-node {degree} ...' (RANK and WORLD_SIZE are not set)"
            )
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != degree:
        raise ValueError(f"ulysses degree {degree} must equal the number of processes ({world}); launch with "
                         f"'torchrun --nproc-per-node {degree}'")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return ParallelInfo(rank, world, local_rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
                        degree)


def enable_ulysses(target, degree: int, *, anything: bool = False) -> ParallelInfo:
    """Run every transformer of ``target`` (a pipeline or a transformer) under diffusers' Ulysses
    context parallelism over ``degree`` processes, with or without diffattn applied.

    Joins torchrun's process group when needed (``init_distributed``), then calls
    ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree,
    ulysses_anything=anything))`` on each transformer. When diffattn is already applied, its
    generation-state hook is moved in front of diffusers' input split, so it keeps reading the
    global token layout. Every rank must run the pipeline with the same inputs (prompt, seed);
    the pipeline belongs on ``info.device``, and only ``info.is_main`` should write outputs.

    >>> from diffusers import WanTransformer3DModel
    >>> model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
    ...                               out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1)
    >>> enable_ulysses(model, 1).world_size  # one process: nothing to split
    1

    Args:
        target: a diffusers pipeline (``transformer``, and ``transformer_2`` when present) or a
            transformer whose class has a ``_cp_plan`` (Wan, Flux, LTX-Video, ...).
        degree: Ulysses degree; must equal the world size. 1: nothing to do (single process).
        anything: ``ulysses_anything``: sequence lengths and head counts that do not divide by
            ``degree`` (uneven splits). Default False.

    Returns:
        A ``ParallelInfo``.
    """
    from diffusers import ContextParallelConfig

    from .apply import _transformers, move_state_hook_outermost

    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an int >= 1, got {degree!r}")
    transformers, _ = _transformers(target)
    for name, transformer in transformers.items():
        if getattr(transformer, "_cp_plan", None) is None:
            raise ValueError(f"{name} ({type(transformer).__name__}) has no context-parallel plan (_cp_plan) in "
                             "diffusers, so it cannot run under Ulysses")
        heads = getattr(transformer.config, "num_attention_heads", None)
        if degree > 1 and isinstance(heads, int) and heads % degree:
            if not anything:
                raise ValueError(f"{name} has {heads} attention heads, not divisible by ulysses degree {degree}; "
                                 "pass anything=True (ulysses_anything)")
            if (-heads) % degree >= -(-heads // degree):  # diffusers pads fewer heads than a rank holds
                raise ValueError(f"{name} has {heads} attention heads: diffusers' ulysses_anything cannot pad them "
                                 f"to {degree} ranks; use a degree that divides {heads} or leaves less padding")
    info = init_distributed(degree)
    if degree == 1:
        return info
    if torch.accelerator.device_count() < 1:
        raise RuntimeError("diffusers' context parallelism needs an accelerator (torch.accelerator.device_count() "
                           ">= 1); none is visible to this process")
    for transformer in transformers.values():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, ulysses_anything=anything))
        move_state_hook_outermost(transformer)
    return info


# --- communication --------------------------------------------------------------------


@dataclass(frozen=True)
class UlyssesTraffic:
    """All-to-all traffic of one attention layer call under Ulysses (bytes).

    ``all_to_alls``: 4 (q, k, v to heads; the output back). ``tensor_bytes``: one full
    ``[B, S, H, D]`` tensor. ``per_rank_sent``: what each rank sends to the others in the 4
    exchanges, ``4 * tensor_bytes / N * (N - 1) / N`` (the ``1/N`` it keeps does not move).
    ``total``: summed over ranks."""

    all_to_alls: int
    tensor_bytes: int
    per_rank_sent: int
    total: int

    def record(self) -> dict:
        return {"all_to_alls": self.all_to_alls, "tensor_bytes": self.tensor_bytes,
                "per_rank_sent_bytes": self.per_rank_sent, "total_bytes": self.total}


def ulysses_bytes_per_layer(seq_len: int, heads: int, head_dim: int, degree: int, *, batch: int = 1,
                            dtype_bytes: int = 2) -> UlyssesTraffic:
    """Bytes one attention layer exchanges per call under Ulysses (the same for diffusers' dense
    attention and diffattn's sparse attention: the pattern changes the compute, not the exchange).

    Args:
        seq_len: tokens of the joint sequence (text included for Flux-style models).
        heads, head_dim: of the attention.
        degree: Ulysses degree N (>= 1; 1 moves nothing).
        batch: batch rows per call (a CFG pipeline that batches both branches: 2). Default 1.
        dtype_bytes: 2 for bf16/fp16 (default), 4 for fp32.

    >>> t = ulysses_bytes_per_layer(seq_len=75600, heads=40, head_dim=128, degree=4)
    >>> t.tensor_bytes, t.per_rank_sent
    (774144000, 580608000)
    """
    for name, value in (("seq_len", seq_len), ("heads", heads), ("head_dim", head_dim), ("degree", degree),
                        ("batch", batch), ("dtype_bytes", dtype_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    tensor = batch * seq_len * heads * head_dim * dtype_bytes
    per_rank = 4 * tensor * (degree - 1) // (degree * degree)
    return UlyssesTraffic(4, tensor, per_rank, per_rank * degree)
