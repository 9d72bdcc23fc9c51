"""Launcher of the block-sparse attention kernel, registered as a torch custom op.

``torch.library.custom_op`` + ``register_fake`` let ``torch.compile`` trace through the call
without a graph break; the op runs on CUDA and, under ``TRITON_INTERPRET=1``, on CPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.runtime.errors import OutOfResources

from .block_sparse_attention import LOG2E, block_sparse_attn_fwd_kernel, block_sparse_partials_fwd_kernel
from .merge_partials import merge_partials_fwd_kernel
from .piecewise_attention import grid_for, piecewise_attn_fwd_kernel

MAX_HEAD_DIM = 256



_BODIES: dict = {}  # custom op -> the Python function it wraps


def _custom_op(name: str):
    """``torch.library.custom_op(name)``, remembering the wrapped function for ``launch``."""

    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _BODIES[op] = fn
        return op

    return wrap


def launch(op, *args):
    """Run one of diffattn's custom ops: through torch's dispatcher while torch.compile traces
    (the op's fake implementation keeps the graph whole), else its Python body directly. The
    dispatcher adds ~50 us of host time per call (measured on this CPU); the ops are forward-only
    (inference), so eager mode loses nothing by skipping it."""
    if torch.compiler.is_compiling():
        return op(*args)
    return _BODIES[op](*args)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_block_size(head_dim: int) -> tuple[int, int]:
    """Default (block_q, block_k) for a head dim; layouts are built at these sizes."""
    if head_dim <= 128:
        return 128, 64
    return 64, 64  # 128-row blocks run out of shared memory at D = 256


def launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """num_warps / num_stages for the kernel (swept on H100, bf16: benchmarks/tune_kernel.py).

    Head dims up to 64 run 8 warps: at 4 warps the 128-row blocks need more than 255 registers
    per thread (the partials kernel's two accumulators spill ~1.8 KB; ``diffattn.bench.spills``)."""
    if head_dim <= 64:
        return {"num_warps": 8, "num_stages": 3}
    if head_dim <= 128:
        return {"num_warps": 8, "num_stages": 3}
    return {"num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=16)
def packed_coords(frames: int, height: int, width: int, device: str) -> torch.Tensor | None:
    """``int32 [F * H * W]``: each visual token's ``(f << 20) | (h << 10) | w``, or None when
    the grid does not fit in 11 / 10 / 10 bits (the kernel then divides instead)."""
    if frames >= 2048 or height >= 1024 or width >= 1024:
        return None
    f = torch.arange(frames, dtype=torch.int32)[:, None, None] << 20
    h = torch.arange(height, dtype=torch.int32)[None, :, None] << 10
    w = torch.arange(width, dtype=torch.int32)[None, None, :]
    return (f | h | w).reshape(-1).to(device)


def _check_layout_tensor(name: str, t: torch.Tensor, dims: int, device: torch.device) -> None:
    if t.dtype != torch.int32 or t.dim() != dims or t.device != device:
        raise ValueError(f"{name} must be int32 with {dims} dims on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def check_32bit_offsets(*tensors: torch.Tensor) -> None:
    """The kernels address keys and values of one (batch, head) with 32-bit offsets (64-bit ones
    cost registers in the inner loops): ``S * token stride`` must stay below 2^31 elements."""
    for t in tensors:
        reach = (t.shape[1] - 1) * t.stride(1) + (t.shape[-1] - 1) * t.stride(-1)
        if reach >= 2**31:
            raise ValueError(f"a [B, S={t.shape[1]}, H, D] tensor with token stride {t.stride(1)} reaches element "
                             f"{reach} within one batch row, beyond the kernels' 32-bit offsets (< 2^31); "
                             "allowed: S * H * D below 2^31 per batch row, or impl='reference'")


def _checked_inputs(q, k, v, layout: dict, text_lens):
    """q, k, v with a unit stride on D, the layout tensors checked, text_lens as int32."""
    for name, t in layout.items():
        _check_layout_tensor(name, t, 4 if name.endswith("idx") else 3, q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    check_32bit_offsets(k, v)
    if text_lens is not None:
        if text_lens.shape != (q.shape[0],) or text_lens.device != q.device:
            raise ValueError(f"text_lens must be [B={q.shape[0]}] on {q.device}, got {tuple(text_lens.shape)} on "
                             f"{text_lens.device}")
        text_lens = text_lens.to(torch.int32).contiguous()  # read as TextLens + b
    return q, k, v, text_lens


def _block_sparse_launch(q, k, v, out, lse, layout, geometry: list[int], window: list[int], mask_kind: int, scale: float,
                         block_q: int, block_k: int, text_lens: torch.Tensor | None, dense_rows: bool
                         ) -> tuple[tuple, list, dict]:
    """What both block-sparse kernels share: (grid, the arguments after q, k, v and the outputs,
    compile-time flags and launch configuration). ``out`` / ``lse``: one partial's outputs (the
    others share their strides); ``dense_rows``: run the text query blocks (the dense rows)."""
    batch, seq_len, heads, head_dim = q.shape
    vis_start, n_vis, text_start, text_len, grid_h, grid_w = geometry
    n_vis_q_blocks = triton.cdiv(n_vis, block_q) if n_vis else 0
    dense_start, dense_len = (0, seq_len) if n_vis == 0 else (text_start, text_len)  # rows attending everything
    if not dense_rows:
        dense_len = 0
    grid = (n_vis_q_blocks + triton.cdiv(dense_len, block_q), batch * heads)
    coords = None
    if mask_kind == 1 and n_vis:
        coords = packed_coords(n_vis // (grid_h * grid_w), grid_h, grid_w, str(q.device))
    args = [*layout, layout[0] if coords is None else coords, layout[0] if text_lens is None else text_lens]
    for t in (q, k, v, out, lse):
        args += [t.stride(0), t.stride(1), t.stride(2)]
    for t in layout:  # a dim of size 1 broadcasts over the batch or the heads
        args += [0 if t.shape[0] == 1 and batch != 1 else t.stride(0), 0 if t.shape[1] == 1 and heads != 1 else t.stride(1),
                 t.stride(2)]
    args += [heads, seq_len, vis_start, n_vis, dense_start, dense_len, text_start, text_len, n_vis_q_blocks,
             grid_h, grid_w, *window, scale * LOG2E]
    flags = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        MASK_KIND=mask_kind,
        DILATED=mask_kind == 1 and any(r != 1 for r in window[3::4]),
        PACKED_COORDS=coords is not None,
        HAS_TEXT_LENS=text_lens is not None,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **({} if interpreting() else launch_config(head_dim, q.dtype)),
    )
    return grid, args, flags


@_custom_op("diffattn::block_sparse_attention")
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    geometry: list[int],
    window: list[int],
    mask_kind: int,
    scale: float,
    block_q: int,
    block_k: int,
    text_lens: torch.Tensor | None = None,
    external: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward.

    Args:
        q, k, v: ``[B, S, H, D]``, fp16 / bf16 / fp32, same shape.
        full_num, part_num: ``int32 [Z, Hz, NQ]`` with Z in {1, B}, Hz in {1, H}.
        full_idx, part_idx: ``int32 [Z, Hz, NQ, *]`` key block indices.
        geometry: ``[vis_start, n_vis, text_start, text_len, grid_h, grid_w]``; ``n_vis == 0``
            makes every query block dense over the whole sequence.
        window: 12 ints, (n, k, s, r) for the F, H and W axes (used when mask_kind == 1).
        mask_kind: 0 bounds only, 1 neighborhood window.
        scale: softmax scale.
        block_q, block_k: the layout's block sizes.
        text_lens: optional ``int32 [B]``: attended text tokens per batch row (the rest of the
            text segment is padding, masked for every query).
        external: compute the complement partial from the pattern's own layout: visual queries
            over the visual keys outside the pattern (the key blocks in neither list, and the
            window mask inverted inside partial blocks); text rows get out 0 and lse -inf. The
            lists must be ascending.

    Returns:
        ``out [B, S, H, D]`` (q's dtype) and ``lse [B, S, H]`` float32.
    """
    layout = {"full_num": full_num, "full_idx": full_idx, "part_num": part_num, "part_idx": part_idx}
    q, k, v, text_lens = _checked_inputs(q, k, v, layout, text_lens)
    batch, seq_len, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, seq_len, heads), dtype=torch.float32, device=q.device)
    if external:  # no text query blocks run: their rows have no external keys
        text_start, text_len = geometry[2], geometry[3]
        out[:, text_start : text_start + text_len].zero_()
        lse[:, text_start : text_start + text_len].fill_(float("-inf"))
    grid, args, flags = _block_sparse_launch(q, k, v, out, lse, tuple(layout.values()), geometry, window, mask_kind,
                                             scale, block_q, block_k, text_lens, dense_rows=not external)
    block_sparse_attn_fwd_kernel[grid](q, k, v, out, lse, *args, EXTERNAL=external, **flags)
    return out, lse


@block_sparse_attention.register_fake
def _(q, k, v, full_num, full_idx, part_num, part_idx, geometry, window, mask_kind, scale, block_q, block_k, text_lens=None,
      external=False):
    batch, seq_len, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, seq_len, heads), dtype=torch.float32)


@_custom_op("diffattn::block_sparse_partials")
def block_sparse_partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    geometry: list[int],
    window: list[int],
    mask_kind: int,
    scale: float,
    block_q: int,
    block_k: int,
    text_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Internal and external attention partials in one pass over the key blocks.

    Args:
        q, k, v, geometry, window, mask_kind, scale, block_q, block_k, text_lens: as for
            ``block_sparse_attention``; ``n_vis`` must be > 0 (a Dense pattern has no external part).
        full_num, full_idx, part_num, part_idx: the pattern's BlockLayout (internal key blocks,
            ascending lists); every other visual key block is external (walked in the kernel:
            no external layout is built).

    Returns:
        ``(out_internal, lse_internal, out_external, lse_external)``: outputs ``[B, S, H, D]`` in
        q's dtype, lse ``[B, S, H]`` float32. Text rows have no external keys (out 0, lse -inf).
    """
    if geometry[1] <= 0:
        raise ValueError(f"block_sparse_partials needs visual tokens (geometry n_vis > 0), got geometry {geometry}")
    layout = {"full_num": full_num, "full_idx": full_idx, "part_num": part_num, "part_idx": part_idx}
    q, k, v, text_lens = _checked_inputs(q, k, v, layout, text_lens)
    batch, seq_len, heads, _ = q.shape
    out_in, out_ex = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    lse_in, lse_ex = (torch.empty((batch, seq_len, heads), dtype=torch.float32, device=q.device) for _ in range(2))
    grid, args, flags = _block_sparse_launch(q, k, v, out_in, lse_in, tuple(layout.values()), geometry, window,
                                             mask_kind, scale, block_q, block_k, text_lens, dense_rows=True)
    block_sparse_partials_fwd_kernel[grid](q, k, v, out_in, lse_in, out_ex, lse_ex, *args, **flags)
    return out_in, lse_in, out_ex, lse_ex


@block_sparse_partials.register_fake
def _(q, k, v, full_num, full_idx, part_num, part_idx, geometry, window, mask_kind, scale, block_q, block_k,
      text_lens=None):
    batch, seq_len, heads, _ = q.shape
    lse = q.new_empty((batch, seq_len, heads), dtype=torch.float32)
    return torch.empty_like(q), lse, torch.empty_like(q), torch.empty_like(lse)


@_custom_op("diffattn::merge_partials")
def merge_partials(out_1: torch.Tensor, lse_1: torch.Tensor, out_2: torch.Tensor, lse_2: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention partials over disjoint keys (see ``merge_partials.py``).

    Args:
        out_1, out_2: ``[B, S, H, D]`` (any float dtypes, one shape).
        lse_1, lse_2: ``[B, S, H]`` float32, natural log, -inf for a partial with no keys.

    Returns:
        ``out [B, S, H, D]`` in out_1's dtype and ``lse [B, S, H]`` float32.
    """
    if out_1.shape != out_2.shape or lse_1.shape != out_1.shape[:-1] or lse_2.shape != lse_1.shape:
        raise ValueError(f"merge_partials: outputs {tuple(out_1.shape)}, {tuple(out_2.shape)} and lses "
                         f"{tuple(lse_1.shape)}, {tuple(lse_2.shape)} must be [B, S, H, D] and [B, S, H]")
    if lse_1.dtype != torch.float32 or lse_2.dtype != torch.float32:
        raise ValueError(f"merge_partials: lses must be float32, got {lse_1.dtype}, {lse_2.dtype}")
    if len({t.device for t in (out_1, lse_1, out_2, lse_2)}) != 1:
        raise ValueError(f"merge_partials: all tensors must be on one device, got {out_1.device}, {lse_1.device}, "
                         f"{out_2.device}, {lse_2.device}")
    out_1, lse_1, out_2, lse_2 = (t.contiguous() for t in (out_1, lse_1, out_2, lse_2))
    out = torch.empty_like(out_1)
    lse = torch.empty_like(lse_1)
    head_dim = out_1.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_r = max(1, min(64, 4096 // block_d))
    n_rows = lse_1.numel()
    merge_partials_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        out_1, lse_1, out_2, lse_2, out, lse, n_rows, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d)
    return out, lse


@merge_partials.register_fake
def _(out_1, lse_1, out_2, lse_2):
    return torch.empty_like(out_1), torch.empty_like(lse_1)


def piecewise_launch(head_dim: int, block: int, first_order: int, rank: int, has_text_lens: bool,
                     dtype: torch.dtype, interpreter: bool | None = None) -> tuple[dict, int, int]:
    """Compile-time flags, num_warps and num_stages of the Piecewise kernel (one place, so the
    spill measurements of ``diffattn.bench.spills`` compile what runs)."""
    interpreter = interpreting() if interpreter is None else interpreter
    rank_p = triton.next_power_of_2(rank) if first_order == 3 else 1
    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_J=max(16, 64 // rank_p) if first_order == 3 else 64,
        LOWRANK=first_order == 3,
        APPROX_SHARE=first_order in (1, 2),
        RANK=rank if first_order == 3 else 1,
        RANK_P=rank_p,
        HAS_TEXT_LENS=has_text_lens,
        UPCAST=interpreter and dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    # 8 warps and, for the low-rank term's two extra dots, no software pipelining of the
    # statistics loads: the variants that compile without register spills on sm_90
    return constexprs, 8, 1 if first_order == 3 else 2


@_custom_op("diffattn::piecewise_attention")
def piecewise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    keep: torch.Tensor,
    k_mean: torch.Tensor,
    v_sum: torch.Tensor,
    size: torch.Tensor,
    geometry: list[int],
    scale: float,
    block: int,
    first_order: int,
    text_lens: torch.Tensor | None = None,
    lowrank_u: torch.Tensor | None = None,
    lowrank_w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Piecewise attention forward (see ``piecewise_attention.py``).

    Args:
        q, k, v: ``[B, S, H, D]``.
        full_num .. part_idx: the critical blocks as a BlockLayout ``[B, H, NQ, *]`` at ``block``.
        keep: ``int8 [B, H, NQ, NK]``, 1 for critical blocks.
        k_mean, v_sum: ``float32 [B, H, NK, D]``; size: ``float32 [NK]``.
        geometry: ``[vis_start, n_vis, text_start, text_len]``.
        first_order: 0 none, 1 pooled / 2 shared (added by the caller from the returned share),
            3 low rank (in the kernel).
        text_lens: optional ``int [B]``: attended text tokens per batch row (the rest of the text
            segment is padding, masked for every query).
        lowrank_u, lowrank_w: ``float32 [B, H, NK, D, r]`` with ``H_J ~ U_J W_J^T`` (first_order 3).

    Returns:
        ``out [B, S, H, D]``, ``lse [B, S, H]`` float32 and, for first_order 1 / 2, ``share``
        ``float32 [B, S, H]``: each visual row's approximate part of its softmax denominator
        (text rows unset); an empty tensor otherwise.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    check_32bit_offsets(k, v)
    batch, seq_len, heads, head_dim = q.shape
    vis_start, n_vis, text_start, text_len = geometry
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, seq_len, heads), dtype=torch.float32, device=q.device)
    share = torch.empty((batch, seq_len, heads) if first_order in (1, 2) else (0,), dtype=torch.float32,
                        device=q.device)
    full_num, part_num, keep, k_mean, v_sum = (t.contiguous() for t in (full_num, part_num, keep, k_mean, v_sum))
    n_vis_q_blocks = triton.cdiv(n_vis, block)
    grid = grid_for(n_vis_q_blocks, text_len, block, batch * heads)
    rank = 1
    if first_order == 3:
        if lowrank_u is None or lowrank_w is None or lowrank_u.shape != lowrank_w.shape:
            raise ValueError("first_order=3 (low rank) needs lowrank_u and lowrank_w of one shape [B, H, NK, D, r]")
        lowrank_u, lowrank_w = lowrank_u.contiguous(), lowrank_w.contiguous()
        rank = lowrank_u.shape[-1]
    else:
        lowrank_u = lowrank_w = k_mean
    if text_lens is not None:
        if text_lens.shape != (batch,) or text_lens.device != q.device:
            raise ValueError(f"text_lens must be [B={batch}] on {q.device}, got {tuple(text_lens.shape)} on {text_lens.device}")
        text_lens = text_lens.to(torch.int32).contiguous()  # read as TextLens + b
    constexprs, num_warps, num_stages = piecewise_launch(head_dim, block, first_order, rank, text_lens is not None,
                                                         q.dtype)
    try:
        piecewise_attn_fwd_kernel[grid](
            q, k, v, out, lse, share if first_order in (1, 2) else lse,
            full_num, full_idx, part_num, part_idx, keep, k_mean, v_sum, size,
            lowrank_u, lowrank_w, full_num if text_lens is None else text_lens,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            full_num.stride(0), full_num.stride(1),
            full_idx.stride(0), full_idx.stride(1), full_idx.stride(2),
            part_idx.stride(0), part_idx.stride(1), part_idx.stride(2),
            keep.stride(0), keep.stride(1), keep.stride(2),
            k_mean.stride(0), k_mean.stride(1),
            lowrank_u.stride(0), lowrank_u.stride(1),
            heads, seq_len, vis_start, n_vis, text_start, text_len, n_vis_q_blocks, keep.shape[-1],
            scale * LOG2E, scale,
            **constexprs,
            **({} if interpreting() else {"num_warps": num_warps, "num_stages": num_stages}),
        )
    except OutOfResources as exc:  # shared memory grows with the block, the head dim and the rank
        order = {0: "order 0", 1: "pooled", 2: "shared", 3: f"lowrank rank {rank}"}[first_order]
        raise ValueError(f"Piecewise (block {block}, head dim {head_dim}, {order}) needs more GPU shared memory "
                         f"than this GPU has ({exc}); use block=64, a low rank <= 4, or impl='reference'") from None
    return out, lse, share


@piecewise_attention.register_fake
def _(q, k, v, full_num, full_idx, part_num, part_idx, keep, k_mean, v_sum, size, geometry, scale, block,
      first_order, text_lens=None, lowrank_u=None, lowrank_w=None):
    batch, seq_len, heads, _ = q.shape
    share_shape = (batch, seq_len, heads) if first_order in (1, 2) else (0,)
    return (torch.empty_like(q), q.new_empty((batch, seq_len, heads), dtype=torch.float32),
            q.new_empty(share_shape, dtype=torch.float32))
