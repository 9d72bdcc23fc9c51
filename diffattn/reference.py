"""Torch reference of masked attention: the readable oracle for the kernels.

Processes queries in chunks so it never allocates S x S: peak extra memory is about
``3 * chunk * S * B * H`` floats, with the chunk chosen to stay under ``max_elements`` (about
twice that when v holds NaN or inf).

Non-finite inputs follow IEEE arithmetic over each query's *attended* keys only, as a sparse
kernel that never reads the other keys would: a NaN query, or an attended key that makes a score
NaN or +inf, gives a NaN row (lse NaN); an attended NaN value makes that output component NaN,
an attended +-inf value makes it +-inf (NaN if both signs, or if its softmax weight is 0).
Masked-out keys and values never leak in. (Torch's SDPA with a boolean ``attn_mask`` differs
there: it adds the mask as -inf, so a NaN key or value it masks out still turns rows NaN.)
A row whose attended scores are all -inf gets out 0 and lse -inf, like an empty row (as SDPA).
"""

from __future__ import annotations

import torch

from .patterns.base import MaskMod

DEFAULT_MAX_ELEMENTS = 1 << 24  # score elements per chunk: 64 MB in fp32


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod | None,
    *,
    scale: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    compute_dtype: torch.dtype | None = None,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted by ``mask_mod``.

    Args:
        q, k, v: ``[B, S, H, D]`` (k and v may have another length S_k).
        mask_mod: ``(q_idx, kv_idx) -> bool`` on sequence indices, or None for dense.
        scale: softmax scale, default ``D ** -0.5``.
        max_elements: bound on ``chunk * S_k * B * H`` score elements held at once.
        compute_dtype: float32 by default (float64 when the inputs are float64).
        key_padding: optional ``bool [B, S_k]``, False for keys no query may attend.

    Returns:
        ``out [B, S, H, D]`` in q's dtype and ``lse [B, S, H]`` float32 (natural log).
        A query with no attended key (or only -inf scores) gets out 0 and lse -inf; NaN / inf
        inputs as in the module docstring (lse NaN where the softmax is ill-defined).
    """
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    chunk = max(1, min(s_q, max_elements // max(1, s_k * b * h)))
    kc = k.to(compute_dtype).permute(0, 2, 3, 1)  # [B, H, D, Sk]
    vc = v.to(compute_dtype).transpose(1, 2)  # [B, H, Sk, D]
    v_bad = ~torch.isfinite(vc)
    if not bool(v_bad.any()):
        v_bad = None
    else:  # the finite part goes through the matmul; NaN / inf values are added per attended key
        v_fin = vc.masked_fill(v_bad, 0.0)
        v_nan, v_pinf, v_ninf = (x.to(compute_dtype) for x in (vc.isnan(), vc == float("inf"), vc == float("-inf")))
    out = torch.empty_like(q)
    lse = torch.empty(b, s_q, h, dtype=torch.float32, device=q.device)
    kv_idx = torch.arange(s_k, device=q.device)
    for start in range(0, s_q, chunk):
        stop = min(s_q, start + chunk)
        qc = q[:, start:stop].to(compute_dtype).transpose(1, 2)  # [B, H, C, D]
        scores = torch.matmul(qc, kc) * scale  # [B, H, C, Sk]
        allowed = None
        if mask_mod is not None:
            q_idx = torch.arange(start, stop, device=q.device)
            allowed = mask_mod(q_idx[:, None], kv_idx[None, :])  # [C, Sk] or [B, H, C, Sk]
        if key_padding is not None:
            padding = key_padding[:, None, None, :]
            allowed = padding if allowed is None else allowed & padding
        if allowed is not None:  # masked scores are -inf whatever q . k was (NaN included)
            scores.masked_fill_(~allowed, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, H, C, 1]: NaN / +inf when ill-defined
        empty = row_lse == float("-inf")  # no attended key, or every attended score -inf
        probs = torch.exp(scores - row_lse.masked_fill(empty, 0.0))  # 0 on masked keys; NaN rows stay NaN
        del scores
        if v_bad is None:
            res = torch.matmul(probs, vc)
        else:
            res = torch.matmul(probs, v_fin)
            att = torch.ones_like(probs) if allowed is None else allowed.expand_as(probs).to(compute_dtype)
            weighted = (probs > 0).to(compute_dtype)
            unweighted = att * (1 - weighted) * (~empty).to(compute_dtype)  # attended with weight 0: 0 * inf
            poison = torch.matmul(att, v_nan) + torch.matmul(unweighted, v_pinf + v_ninf)
            res = res + torch.where(torch.matmul(weighted, v_pinf) > 0, float("inf"), 0.0)
            res = res - torch.where(torch.matmul(weighted, v_ninf) > 0, float("inf"), 0.0)  # inf - inf: NaN
            res = res.masked_fill(poison > 0, float("nan"))
            del att, weighted, unweighted, poison
        out[:, start:stop] = res.transpose(1, 2).to(q.dtype)
        del probs, res
        row_lse = row_lse.masked_fill(row_lse == float("inf"), float("nan"))  # as the kernels: no finite lse
        lse[:, start:stop] = row_lse[..., 0].transpose(1, 2).float()
    return out, lse
