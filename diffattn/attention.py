"""``diffattn.attention``: pattern-restricted attention on ``[B, S, H, D]`` tensors."""

from __future__ import annotations

import logging
import math
import numbers
import os

import torch

from .block_layout import check_block_sizes
from .patterns.base import Pattern
from .plan import get_plan
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
    """The kernel's (block_q, block_k) for ``pattern`` (``Pattern.kernel_blocks``): ``block_size``
    or the head dim's default, capped by the pattern's own block; a tiled SlidingWindow's blocks
    depend on ``grid``."""
    if grid is None:
        if getattr(pattern, "tile", None) is not None:
            raise ValueError(f"kernel_blocks needs the grid for a tiled SlidingWindow ({pattern!r}): its blocks "
                             "depend on the tile order of that grid")
        grid = (1, 1)
    return pattern.kernel_blocks(tuple(grid), head_dim, block_size)


def tile_order_of(pattern: Pattern, layout: TokenLayout) -> TileOrder | None:
    """The token order the pattern's kernel runs in for ``layout``: a ``TileOrder`` for a tiled
    SlidingWindow, None (raster order) otherwise."""
    return pattern.tile_order(layout)


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
    chosen, why = choose_impl(impl, q.device)
    if not torch.compiler.is_compiling():
        logger.debug("diffattn.attention: %s (%s)", chosen, why)
    scale = _scale(scale, q.shape[-1])
    if chosen == "triton":  # the call site's plan: validated and built on first use
        plan = get_plan(pattern, layout, q.shape[-1], q.device, None if block_size is None else tuple(block_size))
    else:
        pattern.validate(layout.grid)
        if block_size is not None:
            pattern.kernel_blocks(layout.grid, q.shape[-1], tuple(block_size))
    if q.numel() == 0:  # B == 0 or H == 0: an empty result, as torch's SDPA gives
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    if chosen == "triton":
        out, lse = plan.attention(q, k, v, scale, text_lens, selection)
    else:
        padding = None if text_lens is None else text_key_padding(text_lens, layout)
        keep = None if pattern.static else _select(pattern, q, k, layout, scale, selection, "reference")
        out, lse = pattern.reference_attention(q, k, v, layout, scale, padding, keep)
    return (out, lse) if return_lse else out
