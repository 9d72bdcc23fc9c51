"""Attention split into two partials over disjoint key sets, and their exact merge.

For a pattern, each query's keys split into *internal* (the pattern's keys, text included) and
*external* (every other visual key). Each partial is a softmax over its keys with its
log-sum-exp; ``merge_partials`` combines them into dense attention exactly:

    m = max(lse_1, lse_2);  O = (O_1 e^(lse_1 - m) + O_2 e^(lse_2 - m)) / (e^(lse_1 - m) + e^(lse_2 - m))

The step cache stores the external partial and merges it with fresh internal partials.
``attention_partials`` computes both partials; on Triton in one pass (each key block is visited
once, and the score tile of a partial block is split between the two partials), on the
reference as two masked attentions (the oracle).
"""

from __future__ import annotations

import functools

import torch

from .attention import (_check, _check_selection_use, _check_text_lens, _scale, _select, attention, choose_impl,
                        kernel_blocks)  # noqa: F401  (kernel_blocks: imported from here by benchmarks)
from .block_layout import build_block_layout, check_block_sizes
from .patterns.base import Pattern, pattern_from_spec
from .patterns.topk import selected_mask_mod
from .plan import get_plan
from .reference import masked_attention_reference
from .tokens import TokenLayout


def merge_partials(out_1: torch.Tensor, lse_1: torch.Tensor, out_2: torch.Tensor, lse_2: torch.Tensor,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention partials over disjoint keys: ``out [B, S, H, D]``, ``lse [B, S, H]``
    (natural log; -inf for a partial with no keys, whose output is then ignored).
    Returns ``(out, lse)``: out in out_1's dtype, lse float32; a row empty in both partials gets
    out 0 and lse -inf. NaN propagates from either partial: a NaN (or +inf) lse makes the row's
    out and lse NaN, and a NaN / inf in the output of a non-empty partial reaches the merged
    output even when that partial's weight rounds to 0 (as ``0 * NaN`` does in dense attention).

    ``impl``: ``"triton"`` (one fused kernel: CUDA, or CPU under ``TRITON_INTERPRET=1``),
    ``"reference"`` (torch), or ``"auto"`` (Triton on CUDA, else torch).

    >>> out, lse = torch.ones(1, 2, 1, 4), torch.zeros(1, 2, 1)
    >>> empty = torch.full_like(lse, float("-inf"))
    >>> merge_partials(out, lse, torch.full_like(out, float("nan")), empty)[0].equal(out)
    True
    """
    _check_merge(out_1, lse_1, out_2, lse_2)
    chosen, _ = choose_impl(impl, out_1.device)
    if chosen == "triton" and out_1.numel():  # (nothing to launch for empty tensors)
        from .kernels import launch
        from .kernels import merge_partials as merge_kernel

        return launch(merge_kernel, out_1, lse_1.float(), out_2, lse_2.float())
    lse_1, lse_2 = lse_1.float(), lse_2.float()
    m = torch.maximum(lse_1, lse_2)  # NaN if either is NaN
    m = m.masked_fill(m == float("-inf"), 0.0)  # both empty
    w_1, w_2 = torch.exp(lse_1 - m), torch.exp(lse_2 - m)  # NaN for a NaN or +inf lse
    total = w_1 + w_2
    empty = total == 0  # both partials empty (a NaN total is not)
    safe = total.masked_fill(empty, 1.0)
    # an empty partial (lse -inf) is skipped, not multiplied (0 * garbage is not 0); any other
    # partial is multiplied even with weight 0, so its NaN / inf propagate as in dense attention
    part_1 = torch.where((lse_1 == float("-inf"))[..., None], 0.0, out_1.float() * (w_1 / safe)[..., None])
    part_2 = torch.where((lse_2 == float("-inf"))[..., None], 0.0, out_2.float() * (w_2 / safe)[..., None])
    out = (part_1 + part_2).to(out_1.dtype)
    lse = torch.where(empty, float("-inf"), m + torch.log(safe))
    return out, lse


def _check_merge(out_1, lse_1, out_2, lse_2) -> None:
    named = (("out_1", out_1), ("lse_1", lse_1), ("out_2", out_2), ("lse_2", lse_2))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: floating-point dtypes")
    for name, t in (("out_1", out_1), ("out_2", out_2)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D] (4 dims), got shape {tuple(t.shape)}")
    if out_1.shape != out_2.shape:
        raise ValueError(f"out_1 and out_2 must have one shape [B, S, H, D], got {tuple(out_1.shape)} and "
                         f"{tuple(out_2.shape)}")
    for name, t in (("lse_1", lse_1), ("lse_2", lse_2)):
        if t.shape != out_1.shape[:-1]:
            raise ValueError(f"{name} must be [B, S, H] = {tuple(out_1.shape[:-1])} (the outputs' shape without D), "
                             f"got {tuple(t.shape)}")
    if len({t.device for _, t in named}) != 1:
        raise ValueError("out_1, lse_1, out_2, lse_2 must be on one device, got "
                         + ", ".join(str(t.device) for _, t in named))


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=64)
def max_partial_blocks(spec: tuple, grid: tuple, block_q: int, block_k: int) -> int:
    """The most partial key blocks of one query block in a static pattern's (CPU) layout."""
    blocks = build_block_layout(pattern_from_spec(spec), grid, block_q, block_k, "cpu")
    return int(blocks.part_num.max()) if blocks.part_num.numel() else 0


def _check_partials_call(q, k, v, pattern: Pattern, layout: TokenLayout, impl: str, block_size, selection=None) -> str:
    """Argument checks shared by the partials' entry points; returns the implementation to run."""
    _check(q, k, v, pattern, layout, True)
    _check_selection_use(pattern, selection)
    if pattern.covers_every_key:
        raise ValueError(f"{type(pattern).__name__} already covers every key (exactly or approximately): it has no "
                         "external part")
    if block_size is not None:
        if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
            raise ValueError(f"block_size must be (block_q, block_k), got {block_size!r}")
        check_block_sizes(*block_size)
    pattern.validate(layout.grid)
    return choose_impl(impl, q.device)[0]


def external_attention(q, k, v, pattern: Pattern, *, layout: TokenLayout, impl: str = "auto", scale: float | None = None,
                       block_size=None, selection: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The external partial: each visual query over the visual keys ``pattern`` does not attend
    (text queries and text keys are internal). Returns ``(out, lse)``; rows with no external key
    get out 0 and lse -inf."""
    chosen = _check_partials_call(q, k, v, pattern, layout, impl, block_size, selection)
    scale = _scale(scale, q.shape[-1])
    n = layout.num_visual
    if pattern.is_dense or q.numel() == 0:  # no external keys, or B == 0 / H == 0
        return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device)
    keep = None if pattern.static else _select(pattern, q, k, layout, scale, selection, chosen)
    if chosen == "reference":
        inner = selected_mask_mod(keep, pattern.block) if not pattern.static else pattern.visual_mask_mod(layout.grid, q.device)
        vs = layout.visual_start

        def mask(q_idx, kv_idx):
            qv, kv = q_idx - vs, kv_idx - vs
            visual = (qv >= 0) & (qv < n) & (kv >= 0) & (kv < n)
            return visual & ~inner(qv.clamp(0, n - 1), kv.clamp(0, n - 1))

        return masked_attention_reference(q, k, v, mask, scale=scale)
    plan = get_plan(pattern, layout, q.shape[-1], q.device, None if block_size is None else tuple(block_size))
    return plan.external(q, k, v, scale, keep)


def attention_partials(q, k, v, pattern: Pattern, *, layout: TokenLayout, impl: str = "auto", scale: float | None = None,
                       block_size=None, text_lens: torch.Tensor | None = None, selection: torch.Tensor | None = None):
    """Both attention partials of ``pattern``: ``(out_internal, lse_internal, out_external,
    lse_external)``; merged (``merge_partials``), they are dense attention, with the text padding
    of ``text_lens`` honoured in the internal part.

    Args:
        q, k, v, layout, impl, scale, block_size, text_lens, selection: as for
            ``diffattn.attention``. On Triton one kernel pass computes both partials; the
            reference runs two masked attentions.

    Returns:
        outputs ``[B, S, H, D]`` in q's dtype and lses ``[B, S, H]`` float32. Text rows and rows
        whose keys are all internal have an empty external partial (out 0, lse -inf); a Dense
        pattern's external partial is empty everywhere.

    A tiled SlidingWindow runs the one-pass kernel in tile-major token order (every block is
    wholly internal or wholly external); the partials come back in raster order.

    Raises:
        ValueError: for Piecewise, which covers every key and has no external part.

    >>> import torch, diffattn
    >>> from diffattn.partials import attention_partials, merge_partials
    >>> layout = diffattn.TokenLayout((4, 8, 8), text_len=8)
    >>> q = k = v = torch.randn(1, layout.seq_len, 2, 32)
    >>> o_in, l_in, o_ex, l_ex = attention_partials(q, k, v, diffattn.SlidingWindow((3, 5, 5)), layout=layout)
    >>> out, _ = merge_partials(o_in, l_in, o_ex, l_ex)
    >>> torch.allclose(out, diffattn.attention(q, k, v, diffattn.Dense(), layout=layout), atol=1e-5)
    True
    """
    chosen = _check_partials_call(q, k, v, pattern, layout, impl, block_size, selection)
    _check_text_lens(text_lens, q, layout)
    scale = _scale(scale, q.shape[-1])
    if q.numel() == 0:  # B == 0 or H == 0: empty partials
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        return torch.empty_like(q), lse, torch.empty_like(q), lse.clone()
    if chosen == "triton" and not pattern.is_dense and layout.num_visual:
        plan = get_plan(pattern, layout, q.shape[-1], q.device, None if block_size is None else tuple(block_size))
        return plan.partials(q, k, v, scale, text_lens, selection)
    if not pattern.static and selection is None and not pattern.is_dense:
        selection = _select(pattern, q, k, layout, scale, None, chosen)
    out_in, lse_in = attention(q, k, v, pattern, layout=layout, impl=impl, return_lse=True, scale=scale,
                               block_size=block_size, text_lens=text_lens, selection=selection)
    out_ex, lse_ex = external_attention(q, k, v, pattern, layout=layout, impl=impl, scale=scale,
                                        block_size=block_size, selection=selection)
    return out_in, lse_in, out_ex, lse_ex
