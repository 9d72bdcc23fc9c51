"""Shared by families whose processors use diffusers' legacy ``Attention`` projections."""

from __future__ import annotations

import torch


def legacy_qkv_heads(attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``to_q / to_k / to_v`` split into heads ``[B, H, S, D]`` and q/k-normed, exactly as
    diffusers' ``CogVideoXAttnProcessor2_0`` and ``JointAttnProcessor2_0`` compute them."""
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value
