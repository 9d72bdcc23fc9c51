"""``diffattn.attention``: pattern-restricted attention on ``[B, S, H, D]`` tensors."""

from __future__ import annotations

import logging
import math
import numbers
import os

import torch

from .block_layout import BlockLayout, check_block_sizes, layout_tensors
from .patterns.base import Pattern, as_grid3, sequence_mask_mod
from .patterns.piecewise import Piecewise, block_statistics, piecewise_attention_reference, pooled_first_order
from .patterns.topk import selected_classes, selected_mask_mod
from .patterns.window import SlidingWindow
from .reference import masked_attention_reference
from .tile_order import TileOrder
from .tokens import TokenLayout

logger = logging.getLogger("diffattn")

IMPLS = ("auto", "triton", "reference")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"triton cannot be imported ({exc})"
    return True, "triton is importable"


def choose_impl(impl: str, device: torch.device) -> tuple[str, str]:
    """The implementation that will run for ``impl`` on ``device``, and why.

    ``"auto"`` picks Triton on CUDA and the reference elsewhere; an explicit impl never falls
    back: ``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if impl == "reference":
        return "reference", "impl='reference' was asked for"
    ok, why = _triton_available()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if impl == "triton":
        if not ok:
            raise RuntimeError(f"impl='triton' was asked for but {why}")
        if device.type != "cuda" and not interpret:
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
                "to run the kernel on CPU through Triton's interpreter, or use impl='reference'"
            )
        return "triton", "impl='triton' was asked for"
    if device.type == "cuda" and ok:
        return "triton", "CUDA tensors and triton is importable"
    if device.type == "cuda":
        return "reference", f"CUDA tensors but {why}"
    return "reference", f"tensors on {device}: the Triton kernels run on CUDA"


def _check_tensors(named: tuple, pattern, layout) -> None:
    """q, k (, v): ``[B, S, H, D]`` tensors of one allowed dtype, shape and device, ``1 <= D <= 256``,
    ``S == layout.seq_len``; ``pattern`` a Pattern, ``layout`` a TokenLayout. An empty batch
    (B == 0) or no heads (H == 0) is allowed: the result is empty, as torch's SDPA gives."""
    names = ", ".join(name for name, _ in named)
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D] (4 dims), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: float16, bfloat16, float32")
    tensors = [t for _, t in named]
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"{names} must share one dtype, got {', '.join(str(t.dtype) for t in tensors)}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{names} must be on one device, got {', '.join(str(t.device) for t in tensors)}")
    if len({t.shape[-1] for t in tensors}) != 1:
        raise ValueError("head dims must match: " + ", ".join(f"{n} has D={t.shape[-1]}" for n, t in named))
    if len({t.shape for t in tensors}) != 1:
        raise ValueError(f"{names} must have the same [B, S, H, D] shape (self-attention), got "
                         + ", ".join(str(tuple(t.shape)) for t in tensors))
    d = tensors[0].shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is not supported; allowed: 1 <= D <= {MAX_HEAD_DIM}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a diffattn pattern (Dense, SlidingWindow, Radial, ...), got {type(pattern).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a diffattn.TokenLayout, got {type(layout).__name__}")
    if tensors[0].shape[1] != layout.seq_len:
        raise ValueError(
            f"{named[0][0]} has S={tensors[0].shape[1]} tokens but {layout} has {layout.seq_len} "
            f"({layout.num_visual} visual + {layout.text_len} text)"
        )


def _check(q, k, v, pattern, layout, return_lse) -> None:
    _check_tensors((("q", q), ("k", k), ("v", v)), pattern, layout)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")


def _scale(scale, head_dim: int) -> float:
    """The softmax scale: ``scale`` as a float (a finite number), or ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number (default D ** -0.5), got {scale!r}")
    return float(scale)


def _check_text_lens(text_lens, q: torch.Tensor, layout: TokenLayout) -> None:
    if text_lens is None:
        return
    if not isinstance(text_lens, torch.Tensor) or text_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"text_lens must be an int32/int64 tensor [B], got {type(text_lens).__name__}"
                        f"{'' if not isinstance(text_lens, torch.Tensor) else ' of ' + str(text_lens.dtype)}")
    if text_lens.shape != (q.shape[0],) or text_lens.device != q.device:
        raise ValueError(f"text_lens must be [B={q.shape[0]}] on {q.device}, got {tuple(text_lens.shape)} on {text_lens.device}")
    # Values are checked where that costs no device sync; on a GPU they come from the processors'
    # mask check, once per transformer call, and the kernels clamp them to the text segment.
    if (not torch.compiler.is_compiling() and text_lens.device.type == "cpu"
            and bool(((text_lens < 0) | (text_lens > layout.text_len)).any())):
        raise ValueError(f"text_lens must lie in [0, text_len={layout.text_len}], got {text_lens.tolist()}")


def text_key_padding(text_lens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``bool [B, S]``: False on the padded text keys of each batch row."""
    idx = torch.arange(layout.seq_len, device=text_lens.device)
    in_text = (idx >= layout.text_start) & (idx < layout.text_start + layout.text_len)
    padded = in_text[None, :] & (idx[None, :] >= layout.text_start + text_lens[:, None])
    return ~padded


def select_blocks(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, layout: TokenLayout, scale: float | None = None,
                  impl: str = "auto") -> torch.Tensor:
    """A dynamic pattern's (BlockTopK, Piecewise) kept blocks ``bool [B, H, NQ, NK]`` over the
    visual tokens of ``q, k [B, S, H, D]``; pass it back as ``attention(..., selection=...)`` to
    reuse it.

    ``impl`` as in ``attention``: ``"triton"`` runs the selection kernel (pooling, pooled
    scores, top-k / cdf in one pass per query-block row), ``"reference"`` the torch code of
    ``BlockTopK.select``, ``"auto"`` the kernel on CUDA and the reference elsewhere. Both break
    ties between equal scores toward the lower key-block index, and both keep every block pair
    whose pooled score is NaN or inf (so NaN in q or k is never dropped with its block). q and k
    are checked as for ``attention``; B == 0 or H == 0 gives an empty selection.

    >>> import torch, diffattn
    >>> layout = diffattn.TokenLayout((2, 8, 8))
    >>> q = k = torch.randn(1, layout.seq_len, 2, 32)
    >>> diffattn.select_blocks(q, k, diffattn.BlockTopK(density=0.5, block=16), layout).shape
    torch.Size([1, 2, 8, 8])
    """
    _check_tensors((("q", q), ("k", k)), pattern, layout)
    if pattern.static:
        raise ValueError(f"{type(pattern).__name__} is static: its blocks come from build_block_layout; "
                         "select_blocks takes a dynamic pattern (BlockTopK, Piecewise)")
    chosen, _ = choose_impl(impl, q.device)
    scale = _scale(scale, q.shape[-1])
    vs, nv = layout.visual_start, layout.num_visual
    if q.numel() == 0:  # B == 0 or H == 0: nothing to select
        nb = -(-nv // pattern.selector.block)
        return torch.zeros((q.shape[0], q.shape[2], nb, nb), dtype=torch.bool, device=q.device)
    if chosen == "triton":
        from .kernels.block_selection import block_select

        rule = pattern.selector
        return block_select(q, k, vs, nv, rule.block, float(scale), rule.keep_count(-(-nv // rule.block)),
                            rule.cdf or 0.0, rule.keep_diagonal, rule.keep_sink, rule.similarity)
    return pattern.select(q[:, vs : vs + nv], k[:, vs : vs + nv], scale)


def _select(pattern: Pattern, q, k, layout: TokenLayout, scale: float, selection=None, impl: str = "auto") -> torch.Tensor:
    if selection is None:
        return select_blocks(q, k, pattern, layout, scale, impl)
    nq = -(-layout.num_visual // pattern.block)
    expected = (q.shape[0], q.shape[2], nq, nq)
    if not isinstance(selection, torch.Tensor) or selection.dtype != torch.bool or tuple(selection.shape) != expected:
        got = (f"{selection.dtype} {tuple(selection.shape)}" if isinstance(selection, torch.Tensor)
               else type(selection).__name__)
        raise ValueError(f"selection must be a bool tensor of shape [B, H, NQ, NK] = {expected}, got {got}")
    if selection.device != q.device:
        raise ValueError(f"selection must be on q's device {q.device}, got {selection.device}")
    return selection


def _check_selection_use(pattern: Pattern, selection) -> None:
    if selection is not None and pattern.static:
        raise ValueError(f"selection is for dynamic patterns (BlockTopK, Piecewise); {type(pattern).__name__} is "
                         "static and has no selection: leave selection=None")


def kernel_blocks(pattern: Pattern, head_dim: int, block_size=None, grid: tuple | None = None) -> tuple[int, int]:
    """The kernel's (block_q, block_k): ``block_size`` or the head dim's default, capped by the
    pattern's own block; for a tiled SlidingWindow (``grid`` needed), blocks whose tile-order
    layout has no partial block (``SlidingWindow.tile_blocks``)."""
    from .kernels import kernel_block_size

    block_q, block_k = block_size or kernel_block_size(head_dim)
    if isinstance(pattern, SlidingWindow) and pattern.tile is not None:
        if grid is None:
            raise ValueError(f"kernel_blocks needs the grid for a tiled SlidingWindow ({pattern!r}): its blocks "
                             "depend on the tile order of that grid")
        return pattern.tile_blocks(tuple(grid), block_q, block_k, fixed=block_size is not None)
    limit = pattern.kernel_block_limit()
    if block_size is None and limit is not None:
        block_q, block_k = min(block_q, limit), min(block_k, limit)
    if limit is not None and (limit % block_q or limit % block_k):
        raise ValueError(f"block_size (block_q, block_k) = {(block_q, block_k)!r}: {type(pattern).__name__} keeps "
                         f"whole blocks of {limit} tokens, so kernel blocks must divide {limit}")
    return block_q, block_k


def tile_order_of(pattern: Pattern, layout: TokenLayout) -> TileOrder | None:
    """The token order the pattern's kernel runs in for ``layout``: a ``TileOrder`` for a tiled
    SlidingWindow, None (raster order) otherwise."""
    return pattern.tile_order(layout) if isinstance(pattern, SlidingWindow) else None


def in_kernel_order(order: TileOrder | None, *tensors: torch.Tensor) -> tuple:
    """``[B, S, ...]`` tensors in the kernel's token order (unchanged when ``order`` is None)."""
    return tensors if order is None else tuple(order.to_tiles(t) for t in tensors)


def in_raster_order(order: TileOrder | None, *tensors: torch.Tensor) -> tuple:
    """The kernel's ``[B, S, ...]`` results back in raster token order."""
    return tensors if order is None else tuple(order.from_tiles(t) for t in tensors)


def _attention_triton(q, k, v, pattern: Pattern, layout: TokenLayout, scale: float, block_size, text_lens,
                      selection=None) -> tuple:
    from .kernels import block_sparse_attention

    block_q, block_k = kernel_blocks(pattern, q.shape[-1], block_size, layout.grid)
    order = tile_order_of(pattern, layout)
    _, grid_h, grid_w = as_grid3(layout.grid)
    if pattern.is_dense:
        empty = torch.zeros((1, 1, 1), dtype=torch.int32, device=q.device)
        empty_idx = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=q.device)
        tensors = (empty, empty_idx, empty, empty_idx)
        geometry = [0, 0, layout.text_start, layout.text_len, grid_h, grid_w]  # n_vis == 0: every row dense
        mask_kind, params = 0, ()
    elif not pattern.static:
        keep = _select(pattern, q, k, layout, scale, selection, "triton")
        classes = selected_classes(keep, pattern.block, block_q, block_k, layout.num_visual)
        blocks = BlockLayout.from_classes(classes, block_q, block_k, layout.num_visual, fixed_width=True)
        tensors = (blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx)
        geometry = [layout.visual_start, layout.num_visual, layout.text_start, layout.text_len, grid_h, grid_w]
        mask_kind, params = 0, ()
    else:
        tensors = layout_tensors(pattern.spec(), layout.grid, block_q, block_k, str(q.device))
        geometry = [layout.visual_start, layout.num_visual, layout.text_start, layout.text_len, grid_h, grid_w]
        mask_kind, params = pattern.kernel_mask(layout.grid)
    window = list(params) + [1] * (12 - len(params))
    q, k, v = in_kernel_order(order, q, k, v)
    out, lse = block_sparse_attention(q, k, v, *tensors, geometry, window, mask_kind, scale, block_q, block_k, text_lens)
    return in_raster_order(order, out, lse)


def _piecewise_triton(q, k, v, pattern: Piecewise, layout: TokenLayout, scale: float, selection=None,
                      text_lens=None) -> tuple:
    from .kernels import piecewise_attention

    first_order = pattern.first_order if pattern.order == 1 else None
    if first_order == "exact":
        raise ValueError("Piecewise first_order='exact' has no kernel: its per-block term costs as much as dense "
                         "attention (O(S * NK * d^2)); use impl='reference', or first_order='pooled', 'shared' or 'lowrank'")
    vs, nv, blk = layout.visual_start, layout.num_visual, pattern.block
    q_vis, k_vis, v_vis = q[:, vs : vs + nv], k[:, vs : vs + nv], v[:, vs : vs + nv]
    keep = _select(pattern, q, k, layout, scale, selection, "triton")
    blocks = BlockLayout.from_classes(selected_classes(keep, blk, blk, blk, nv), blk, blk, nv, fixed_width=True)
    stats = block_statistics(k_vis, v_vis, blk, first_order, pattern.rank)
    kind = {None: 0, "pooled": 1, "shared": 2, "lowrank": 3}[first_order]
    out, lse, share = piecewise_attention(
        q, k, v, blocks.full_num, blocks.full_idx, blocks.part_num, blocks.part_idx, keep.to(torch.int8),
        stats["k_mean"], stats["v_sum"], stats["size"], [vs, nv, layout.text_start, layout.text_len], scale, blk,
        kind, text_lens, stats.get("u"), stats.get("w"))
    if first_order in ("pooled", "shared"):
        out[:, vs : vs + nv] += _first_order_term(q_vis, share[:, vs : vs + nv], keep, stats, first_order, blk,
                                                  scale).to(out.dtype)
    return out, lse


def _first_order_term(q_vis, share, keep, stats: dict, first_order: str, block: int, scale: float) -> torch.Tensor:
    """The pooled / shared first-order numerator term divided by each row's denominator:
    ``scale * (share / norm) * (q @ H)`` ``[B, N, H, D]`` float32, with ``share = l_approx / l`` from
    the kernel, ``H`` the query block's pooled matrix (``norm`` its pooled size) or the head's sum
    over all blocks (``norm = N``). A batched matrix product outside the kernel (O(S d^2))."""
    b, n, h, d = q_vis.shape
    if first_order == "shared":
        qh = torch.einsum("bnhd,bhde->bnhe", q_vis.float(), stats["h_sum"])
        return (scale / n) * share[..., None] * qh
    pooled_h, pooled_size = pooled_first_order(q_vis, keep, stats, block, scale)  # [B, H, NQ, D, D], [B, H, NQ]
    nq = pooled_h.shape[2]
    q_blocks = torch.nn.functional.pad(q_vis.float(), (0, 0, 0, 0, 0, nq * block - n)).view(b, nq, block, h, d)
    qh = torch.einsum("bnthd,bhnde->bnthe", q_blocks, pooled_h).reshape(b, nq * block, h, d)[:, :n]
    norm = pooled_size.transpose(1, 2).repeat_interleave(block, dim=1)[:, :n]  # [B, N, H]
    return scale * (share / norm)[..., None] * qh


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    layout: TokenLayout,
    impl: str = "auto",
    return_lse: bool = False,
    scale: float | None = None,
    block_size: tuple[int, int] | None = None,
    text_lens: torch.Tensor | None = None,
    selection: torch.Tensor | None = None,
):
    """Attention of ``q`` over ``k, v`` restricted to ``pattern``.

    Args:
        q, k, v: ``[B, S, H, D]`` (diffusers' layout), float16 / bfloat16 / float32, one
            shape and device, ``S == layout.seq_len``, ``1 <= D <= 256``. B == 0 gives an empty
            result. NaN / inf propagate as in dense attention restricted to the pattern's keys
            (``masked_attention_reference``); they are never turned into finite values.
        pattern: Dense(), SlidingWindow(...), Radial(...), ...
        layout: the TokenLayout saying where visual and text tokens sit.
        impl: ``"triton"`` (the kernel: CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"reference"`` (chunked torch), or ``"auto"`` (Triton on CUDA, else reference;
            the choice is logged at debug level on the ``diffattn`` logger).
        return_lse: also return the log-sum-exp ``[B, S, H]`` (float32, natural log).
        scale: softmax scale (a finite number), default ``D ** -0.5``.
        block_size: ``(block_q, block_k)`` of the kernel, powers of two >= 16; default
            chosen from the head dim.
        text_lens: optional ``int [B]``: how many text tokens of each batch row are real; the
            rest of the text segment is padding and no query attends it (HunyuanVideo's
            prompt padding). Default: all text tokens are attended.
        selection: for dynamic patterns, the kept blocks from ``select_blocks`` (reused instead
            of selecting again). Default: select from q and k.

    A SlidingWindow with a ``tile`` runs on Triton in tile-major token order: q, k, v are
    permuted, the kernel visits only full blocks, and out / lse are permuted back, so the
    result is in raster order like every other pattern's.

    Returns:
        ``out`` ``[B, S, H, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse=True``.

    >>> import torch, diffattn
    >>> layout = diffattn.TokenLayout((4, 8, 8), text_len=16)
    >>> q = k = v = torch.randn(1, layout.seq_len, 2, 64)
    >>> out = diffattn.attention(q, k, v, diffattn.SlidingWindow((3, 5, 5)), layout=layout)
    >>> out.shape
    torch.Size([1, 272, 2, 64])
    """
    _check(q, k, v, pattern, layout, return_lse)
    if block_size is not None:
        if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
            raise ValueError(f"block_size must be (block_q, block_k), got {block_size!r}")
        check_block_sizes(*block_size)
    _check_text_lens(text_lens, q, layout)
    _check_selection_use(pattern, selection)
    pattern.validate(layout.grid)
    chosen, why = choose_impl(impl, q.device)
    if not torch.compiler.is_compiling():
        logger.debug("diffattn.attention: %s (%s)", chosen, why)
    scale = _scale(scale, q.shape[-1])
    if q.numel() == 0:  # B == 0 or H == 0: an empty result, as torch's SDPA gives
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    if isinstance(pattern, Piecewise):
        if block_size is not None and tuple(block_size) != (pattern.block, pattern.block):
            raise ValueError(f"block_size={tuple(block_size)!r}: Piecewise runs blocks of its own block size "
                             f"({pattern.block}, {pattern.block}); leave block_size out or set Piecewise(block=...)")
        if chosen == "reference":
            padding = None if text_lens is None else text_key_padding(text_lens, layout)
            out, lse = piecewise_attention_reference(q, k, v, pattern, layout, scale=scale, key_padding=padding,
                                                     selection=_select(pattern, q, k, layout, scale, selection, "reference"))
        else:
            out, lse = _piecewise_triton(q, k, v, pattern, layout, scale, selection, text_lens)
    elif chosen == "reference":
        if pattern.is_dense:
            mask_mod = None
        elif not pattern.static:
            keep = _select(pattern, q, k, layout, scale, selection, "reference")
            mask_mod = sequence_mask_mod(selected_mask_mod(keep, pattern.block), layout)
        else:
            mask_mod = pattern.mask_mod(layout, q.device)
        padding = None if text_lens is None else text_key_padding(text_lens, layout)
        out, lse = masked_attention_reference(q, k, v, mask_mod, scale=scale, key_padding=padding)
    else:
        out, lse = _attention_triton(q, k, v, pattern, layout, scale, block_size, text_lens, selection)
    return (out, lse) if return_lse else out
