"""Piecewise attention: critical blocks exact, every other block Taylor-approximated
(PISA, arXiv 2602.01077; METHODS section 5).

Selection as BlockTopK (top ``ceil(density * NK)`` key blocks per query block from pooled
scores, with the diagonal and sink guards). For a non-critical key block J with mean key k̄_J,
``exp(scale q.k_t) ~ exp(scale q.k̄_J) (1 + scale q.(k_t - k̄_J))``, so with
``a_iJ = exp(scale q_i.k̄_J)``, ``V_J = sum_t v_t`` and ``H_J = sum_t (k_t - k̄_J) v_t^T``:

- zeroth order: numerator ``a_iJ V_J``, denominator ``a_iJ |J|``;
- first order adds ``a_iJ scale q_i^T H_J`` to the numerator (its denominator term is 0).

First-order variants (``first_order``):

- ``"shared"`` (PISA): ``sum_{J not in C} a_iJ H_J ~ (g_i / S) sum_J H_J`` with
  ``g_i = sum_{J not in C} |J| a_iJ``: one d x d matrix, O(S d^2);
- ``"exact"``: the per-block term, O(S * NK * d^2);
- ``"lowrank"``: each ``H_J`` projected on the top-``rank`` principal directions of its block's
  centred keys, ``H_J ~ U_J U_J^T H_J``: O(S * NK * rank * d);
- ``"pooled"`` (default): per query block I one d x d matrix
  ``H~_I = sum_{J not in C_I} w_IJ H_J`` with ``w_IJ`` the softmax of ``scale q̄_I . k̄_J`` over the
  non-critical blocks (the block-mean query stands in for each query), rescaled per query by its
  own approximate mass: ``sum_J a_iJ H_J ~ (g_i / sum_J w_IJ |J|) H~_I``. Cost
  O(NQ * NK * d^2 + S * d^2): the exact term's cost divided by the block size, and on
  structured inputs it keeps about 95% of the exact term's error reduction (README table).

Everything is combined with the exact part through one running maximum. The Triton kernel
covers order 0 and the ``"pooled"``, ``"shared"`` and ``"lowrank"`` terms; ``"exact"`` costs as
much as dense attention and runs in the reference only. Padded text keys (``key_padding``) are
excluded for every query.

Non-finite inputs: the selection keeps every block pair whose pooled score is not finite
(BlockTopK's rule), so the query block of a NaN query is computed exactly against every key
block, and the key block of a NaN key is critical (exact) for every query block. A NaN value
reaches every visual row, exactly or through its block's value sum ``V_J``. So NaN in q, k or v
gives NaN in the rows dense attention makes NaN (dense attends every key), and the other rows
stay finite. An infinity is pooled coarsely: the block statistics (``V_J``, ``H_J``, the pooled
and shared first-order sums) carry it to rows that dense attention keeps finite (an inf key
whose score is -inf for that row), and an inf value may come out NaN instead of inf. A row that
dense attention makes non-finite is never finite here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MaskMod, Pattern, num_blocks
from .topk import BlockTopK, block_means

FIRST_ORDER = ("pooled", "shared", "exact", "lowrank")


@dataclass(frozen=True)
class Piecewise(Pattern):
    """Exact-or-approximate attention over the whole key range.

    Args:
        density: fraction of key blocks computed exactly per query block, in (0, 1].
        block: block size in tokens, a power of two >= 16. Default 64.
        order: 0 (block means only) or 1 (adds a first-order term). Default 1.
        first_order: ``"pooled"``, ``"shared"`` (PISA), ``"exact"`` or ``"lowrank"``. Default ``"pooled"``.
        rank: rank of the ``"lowrank"`` term. Default 4.
    """

    density: float
    block: int = 64
    order: int = 1
    first_order: str = "pooled"
    rank: int = 4

    static = False
    covers_every_key = True

    def __post_init__(self):
        try:  # the same rules for density and block as BlockTopK's
            BlockTopK(density=self.density, block=self.block)
        except (ValueError, TypeError) as exc:
            raise type(exc)(str(exc).replace("BlockTopK", "Piecewise")) from None
        object.__setattr__(self, "density", float(self.density))
        if self.order not in (0, 1) or isinstance(self.order, bool):
            raise ValueError(f"Piecewise order must be 0 or 1, got {self.order!r}")
        if self.first_order not in FIRST_ORDER:
            raise ValueError(f"Piecewise first_order must be one of {FIRST_ORDER}, got {self.first_order!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"Piecewise rank must be a positive int, got {self.rank!r}")

    def spec(self) -> tuple:
        return ("Piecewise", self.density, self.block, self.order, self.first_order, self.rank)

    @property
    def selector(self) -> BlockTopK:
        return BlockTopK(density=self.density, block=self.block)

    def kernel_block_limit(self) -> int | None:
        return self.block

    def kernel_blocks(self, grid: tuple, head_dim: int, block_size=None) -> tuple[int, int]:
        if block_size is not None and tuple(block_size) != (self.block, self.block):
            raise ValueError(f"block_size={tuple(block_size)!r}: Piecewise runs blocks of its own block size "
                             f"({self.block}, {self.block}); leave block_size out or set Piecewise(block=...)")
        return self.block, self.block

    def make_plan(self, layout, head_dim: int, device, block_size=None):
        from ..plan import PiecewisePlan

        return PiecewisePlan(self, layout, head_dim, device, block_size)

    def reference_attention(self, q, k, v, layout, scale: float, key_padding=None, keep=None):
        return piecewise_attention_reference(q, k, v, self, layout, scale=scale, key_padding=key_padding,
                                             selection=keep)

    def select(self, q_vis: torch.Tensor, k_vis: torch.Tensor, scale: float) -> torch.Tensor:
        return self.selector.select(q_vis, k_vis, scale)

    def visual_mask_mod(self, grid: tuple, device=None) -> MaskMod:
        raise ValueError("Piecewise covers every key (exactly or approximately); it has no mask")

    def block_classes(self, grid: tuple, block_q: int, block_k: int) -> torch.Tensor:
        raise ValueError("Piecewise selects blocks from q and k per call; it has no static layout")

    def visual_pairs(self, grid: tuple) -> int:
        raise ValueError("Piecewise approximates the keys it does not compute; it has no pair count")


def block_statistics(k: torch.Tensor, v: torch.Tensor, block: int, first_order: str | None, rank: int = 4) -> dict:
    """Per key block: mean key, value sum, size and the first-order factors.

    Args:
        k, v: visual keys and values ``[B, N, H, D]``.

    Returns (float32, ``[B, H, NK, ...]``): ``k_mean [.., D]``, ``v_sum [.., D]``, ``size [NK]``,
    and for ``first_order``: ``"exact"`` / ``"pooled"`` -> ``h [.., D, D]``; ``"shared"`` -> ``h_sum [B, H, D, D]``;
    ``"lowrank"`` -> ``u [.., D, rank]`` and ``w [.., D, rank]`` with ``H_J ~ u w^T``.
    """
    b, n, h, d = k.shape
    nk = num_blocks(n, block)
    pad = nk * block - n
    kf, vf = k.float(), v.float()
    if pad:
        kf = torch.cat([kf, kf.new_zeros(b, pad, h, d)], 1)
        vf = torch.cat([vf, vf.new_zeros(b, pad, h, d)], 1)
    kb = kf.view(b, nk, block, h, d).permute(0, 3, 1, 2, 4)  # [B, H, NK, T, D]
    vb = vf.view(b, nk, block, h, d).permute(0, 3, 1, 2, 4)
    size = torch.full((nk,), float(block), device=k.device)
    size[-1] = block - pad
    k_mean = kb.sum(3) / size[:, None]
    valid = (torch.arange(block, device=k.device)[None, :] < size[:, None]).float()  # [NK, T]
    centred = (kb - k_mean[..., None, :]) * valid[..., None]  # padding rows contribute nothing
    stats = {"k_mean": k_mean, "v_sum": vb.sum(3), "size": size}
    if first_order in ("exact", "pooled"):
        stats["h"] = centred.transpose(-1, -2) @ vb  # [B, H, NK, D, D]
    elif first_order == "shared":
        stats["h_sum"] = (centred.transpose(-1, -2) @ vb).sum(2)  # [B, H, D, D]
    elif first_order == "lowrank":
        r = min(rank, d, block)
        # top-r right singular vectors of the centred keys = principal key directions
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: [B, H, NK, min(T, D), D]
        u = vh[..., :r, :].transpose(-1, -2)  # [B, H, NK, D, r]
        stats["u"] = u
        stats["w"] = vb.transpose(-1, -2) @ (centred @ u)  # [.., D, r]:  H_J ~ u (centred u)^T v = u w^T
    return stats


def pooled_first_order(q_vis: torch.Tensor, keep: torch.Tensor, stats: dict, block: int, scale: float):
    """Per query block: ``H~_I = sum_{J not in C_I} w_IJ H_J`` ``[B, H, NQ, D, D]`` and
    ``sum_J w_IJ |J|`` ``[B, H, NQ]``, with ``w_IJ = softmax_J(scale q̄_I . k̄_J)`` over the
    non-critical blocks (0 when every block is critical)."""
    logits = block_means(q_vis, block) @ stats["k_mean"].transpose(-1, -2) * scale  # [B, H, NQ, NK]
    weights = torch.softmax(logits.masked_fill(keep, float("-inf")), -1).nan_to_num(0.0)
    pooled_h = torch.einsum("bhij,bhjde->bhide", weights, stats["h"])
    pooled_size = (weights @ stats["size"]).clamp(min=torch.finfo(torch.float32).tiny)
    return pooled_h, pooled_size


def piecewise_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Piecewise, layout, *, scale: float | None = None,
    chunk: int = 256, selection: torch.Tensor | None = None, key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of Piecewise attention on ``[B, S, H, D]`` (text tokens exact and dense).

    ``key_padding``: optional ``bool [B, S]``, False on padded text keys, which no query attends
    (visual keys must stay True: they are approximated by block, not masked).

    Returns ``out [B, S, H, D]`` and ``lse [B, S, H]`` (float32; the log of the approximate
    softmax denominator).
    """
    b, s, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    vs, nv, blk = layout.visual_start, layout.num_visual, pattern.block
    q_vis, k_vis, v_vis = q[:, vs : vs + nv], k[:, vs : vs + nv], v[:, vs : vs + nv]
    keep = pattern.select(q_vis, k_vis, scale) if selection is None else selection  # [B, H, NQ, NK]
    order = pattern.order
    stats = block_statistics(k_vis, v_vis, blk, pattern.first_order if order else None, pattern.rank)
    text = torch.zeros(s, dtype=torch.bool, device=q.device)
    text[layout.text_start : layout.text_start + layout.text_len] = True
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # [B, H, S, D]
    if key_padding is not None:  # padded keys are never attended: their values must not reach p @ v as 0 * NaN
        vf = vf.masked_fill(~key_padding[:, None, :, None], 0.0)
    out = torch.empty_like(q)
    lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
    key_block = torch.clamp(torch.arange(s, device=q.device) - vs, 0, nv - 1) // blk
    if order == 1 and pattern.first_order == "pooled":
        pooled_h, pooled_size = pooled_first_order(q_vis, keep, stats, blk, scale)
    for start in range(0, s, chunk):
        stop = min(s, start + chunk)
        idx = torch.arange(start, stop, device=q.device)
        qc = q[:, start:stop].float().transpose(1, 2)  # [B, H, C, D]
        scores = qc @ kf.transpose(-1, -2) * scale  # [B, H, C, S]
        is_text_q = text[idx]
        qblock = torch.clamp(idx - vs, 0, nv - 1) // blk
        crit = keep[:, :, qblock][..., key_block]  # [B, H, C, S]: exact visual keys of each query
        crit = crit | text[None, None, None, :] | is_text_q[None, None, :, None]
        if key_padding is not None:
            crit = crit & key_padding[:, None, None, :]
        scores = scores.masked_fill(~crit, float("-inf"))
        logits = qc @ stats["k_mean"].transpose(-1, -2) * scale  # [B, H, C, NK]
        approx = ~keep[:, :, qblock] & ~is_text_q[None, None, :, None]  # [B, H, C, NK]
        logits = logits.masked_fill(~approx, float("-inf"))
        m = torch.maximum(scores.amax(-1), logits.amax(-1))[..., None]  # [B, H, C, 1]
        p = torch.exp(scores - m)
        a = torch.exp(logits - m)  # a_iJ, rescaled
        num = p @ vf + a @ stats["v_sum"]
        den_exact = p.sum(-1)
        den_approx = a @ stats["size"]
        if order == 1:
            fo = pattern.first_order
            if fo == "exact":
                qh = torch.einsum("bhcd,bhjde->bhcje", qc, stats["h"])  # [B, H, C, NK, D]
                term = scale * torch.einsum("bhcj,bhcje->bhce", a, qh)
            elif fo == "lowrank":
                proj = torch.einsum("bhcd,bhjdr->bhcjr", qc, stats["u"])  # [B, H, C, NK, r]
                term = scale * torch.einsum("bhcjr,bhjer->bhce", a[..., None] * proj, stats["w"])
            elif fo == "pooled":  # (g_i / sum_J w_IJ |J|) q_i^T H~_I
                qh = torch.einsum("bhcd,bhcde->bhce", qc, pooled_h[:, :, qblock])
                term = scale * (den_approx / pooled_size[:, :, qblock])[..., None] * qh
            else:  # shared: (g_i / S) q_i^T sum_J H_J, with g_i the approximate mass
                term = scale * (den_approx / nv)[..., None] * (qc @ stats["h_sum"])
            # text queries approximate nothing: no term at all (0 * a non-finite H would be NaN)
            num = num + torch.where(is_text_q[:, None], 0.0, term)
        den = den_exact + den_approx
        out[:, start:stop] = (num / den[..., None]).transpose(1, 2).to(q.dtype)
        lse[:, start:stop] = (m[..., 0] + torch.log(den)).transpose(1, 2)
    return out, lse

