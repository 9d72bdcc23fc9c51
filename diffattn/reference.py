"""Torch reference of masked attention: the readable oracle for the kernels.

Processes queries in chunks so it never allocates S x S: peak extra memory is about
``3 * chunk * S * B * H`` floats, with the chunk chosen to stay under ``max_elements``.
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
        A query with no attended key gets out 0 and lse -inf.
    """
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    chunk = max(1, min(s_q, max_elements // max(1, s_k * b * h)))
    kc = k.to(compute_dtype).permute(0, 2, 3, 1)  # [B, H, D, Sk]
    vc = v.to(compute_dtype).transpose(1, 2)  # [B, H, Sk, D]
    out = torch.empty_like(q)
    lse = torch.empty(b, s_q, h, dtype=torch.float32, device=q.device)
    kv_idx = torch.arange(s_k, device=q.device)
    for start in range(0, s_q, chunk):
        stop = min(s_q, start + chunk)
        qc = q[:, start:stop].to(compute_dtype).transpose(1, 2)  # [B, H, C, D]
        scores = torch.matmul(qc, kc) * scale  # [B, H, C, Sk]
        if mask_mod is not None:
            q_idx = torch.arange(start, stop, device=q.device)
            allowed = mask_mod(q_idx[:, None], kv_idx[None, :])  # [C, Sk]
            scores.masked_fill_(~allowed, float("-inf"))
        if key_padding is not None:
            scores.masked_fill_(~key_padding[:, None, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, H, C, 1]
        finite = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(finite, row_lse, torch.zeros_like(row_lse)))
        del scores
        probs.masked_fill_(~finite, 0.0)
        out[:, start:stop] = torch.matmul(probs, vc).transpose(1, 2).to(q.dtype)
        del probs
        lse[:, start:stop] = row_lse[..., 0].transpose(1, 2).float()
    return out, lse
