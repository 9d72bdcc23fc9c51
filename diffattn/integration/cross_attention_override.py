"""Cross-attention override: record one branch's text cross-attention output per block and hand
it to another branch in place of its own (FreeSwim, arXiv 2511.14712).

:class:`CrossAttentionOverride` is an attention processor for a Wan block's ``attn2`` that
delegates to the processor it replaces. In ``"record"`` mode it stores that processor's output
(after the output projection) in a :class:`CrossAttentionStore`; in ``"replace"`` mode it returns
the stored tensor without computing anything; in ``"pass"`` mode it is the original processor.

With two experts (Wan 2.2: ``transformer`` for high noise, ``transformer_2`` for low noise) one
store serves both, and every entry remembers the expert that recorded it: an expert never
replays another expert's outputs (their weights differ), it raises instead.
"""

from __future__ import annotations

import torch

__all__ = ["OVERRIDE_MODES", "STORE_DTYPES", "CrossAttentionOverride", "CrossAttentionStore"]

OVERRIDE_MODES = ("pass", "record", "replace")
STORE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


class CrossAttentionStore:
    """The recorded cross-attention outputs, one ``[B, S, C]`` tensor per transformer block.

    Args:
        store_dtype: dtype kept: None (default: the model's), float32, bfloat16 or float16.
        offload: keep the tensors in CPU memory (pinned when CUDA is used), copied back to the
            model's device when replayed. Default False.

    Memory: ``S x C x itemsize`` per block and per batch row; Wan 2.1 1.3B (C = 1536) at
    1920 x 1088 with 81 frames (S = 21 x 68 x 120 tokens) holds about 0.5 GB per block in
    bfloat16, 16 GB over its 30 blocks.
    """

    def __init__(self, store_dtype: torch.dtype | None = None, offload: bool = False):
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of None, float32, bfloat16, float16, got {store_dtype!r}")
        if not isinstance(offload, bool):
            raise TypeError(f"offload must be a bool, got {offload!r}")
        self.store_dtype = store_dtype
        self.offload = offload
        self.entries: dict[int, torch.Tensor] = {}
        self.experts: dict[int, int] = {}  # layer -> the expert that recorded entries[layer]
        self.peak_bytes = 0
        self.writes = 0

    def put(self, layer: int, output: torch.Tensor, expert: int = 0) -> None:
        """Keep ``output`` (detached, in the store's dtype and place) for block ``layer``, recorded
        by expert ``expert`` (0 for a one-transformer model)."""
        dtype = self.store_dtype or output.dtype
        old = self.entries.get(layer)
        if self.offload and output.device.type != "cpu":
            if old is not None and old.shape == output.shape and old.dtype == dtype:
                old.copy_(output.detach(), non_blocking=True)  # reuse the pinned buffer
            else:
                buffer = torch.empty(output.shape, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())
                self.entries[layer] = buffer.copy_(output.detach(), non_blocking=True)
        else:
            # The processor's output is a fresh tensor nothing else writes to: no copy needed.
            self.entries[layer] = output.detach().to(dtype)
        self.experts[layer] = expert
        self.writes += 1
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def get(self, layer: int, like: torch.Tensor, expert: int = 0) -> torch.Tensor:
        """Block ``layer``'s stored output on ``like``'s device in ``like``'s dtype, for expert
        ``expert``. Raises RuntimeError when nothing was recorded for that block or another expert
        recorded it."""
        if layer not in self.entries:
            raise RuntimeError(f"no cross-attention output was recorded for block {layer}: a guide step must run "
                               "the full branch before the window branch can replay it")
        if self.experts[layer] != expert:
            raise RuntimeError(f"block {layer}: the recorded cross-attention output is expert "
                               f"{self.experts[layer]}'s, not expert {expert}'s; experts have different weights, "
                               "so a guide step of this expert must record its own first")
        return self.entries[layer].to(like.device, like.dtype, non_blocking=True)

    def nbytes(self) -> int:
        """Bytes held now over every block."""
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def bytes_per_block(self) -> dict[int, int]:
        return {layer: t.numel() * t.element_size() for layer, t in sorted(self.entries.items())}

    def recorded_by(self) -> set[int]:
        """The experts whose outputs the store holds now (empty when cleared)."""
        return set(self.experts.values())

    def clear(self) -> None:
        self.entries.clear()
        self.experts.clear()

    def __repr__(self) -> str:
        dtype = str(self.store_dtype).replace("torch.", "") if self.store_dtype else "model dtype"
        return (f"CrossAttentionStore({len(self.entries)} blocks, {self.nbytes() / 2**20:.1f} MiB, {dtype}, "
                f"offload={self.offload})")


class CrossAttentionOverride:
    """Processor for a Wan block's text cross-attention (``blocks.i.attn2``) that records or
    replaces its output.

    Args:
        original: the processor it stands in for (diffusers' ``WanAttnProcessor``); it computes
            every ``"pass"`` and ``"record"`` call.
        layer: the block index, the key in ``store``.
        store: where outputs are recorded and replayed from.
        expert: which expert's block this is (0 = ``transformer``, 1 = ``transformer_2``). Default 0.

    ``mode`` (attribute, default ``"pass"``): ``"pass"`` runs ``original``; ``"record"`` runs it
    and stores the output; ``"replace"`` returns the stored output of this block (the queries of
    this call are not used, so nothing is computed).
    """

    def __init__(self, original, layer: int, store: CrossAttentionStore, expert: int = 0):
        self.original = original
        self.layer = layer
        self.store = store
        self.expert = expert
        self.mode = "pass"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if self.mode == "replace":
            out = self.store.get(self.layer, hidden_states, self.expert)
            if out.shape != hidden_states.shape:
                raise RuntimeError(f"block {self.layer}: the recorded cross-attention output has shape "
                                   f"{tuple(out.shape)} but this call's hidden states are {tuple(hidden_states.shape)}")
            return out
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if self.mode == "record":
            self.store.put(self.layer, out, self.expert)
        return out

    def __repr__(self) -> str:
        return (f"CrossAttentionOverride(layer={self.layer}, expert={self.expert}, mode={self.mode!r}, "
                f"original={type(self.original).__name__})")
