"""Cross-step reuse of the block-external attention (after FlashBlock, METHODS section 6).

At a refresh step a layer computes its pattern's internal partial and the external partial
(every visual key outside the pattern) with their log-sum-exps; merged, they are dense
attention. The external partial is stored per layer and CFG branch; at the following steps only
the internal (sparse) part is computed and merged with the stored external part.

Refreshes happen every ``refresh_every`` steps, at the last dense warm-up step before sparse
steps begin, whenever the shapes, dtype, device or token layout change, and optionally per head
when the internal part drifts (FlashBlock: cosine < 0.85 or |delta lse| > 0.05). The drift gates
flag heads on the device at a reuse step; the flags of all layers are read with one device-to-host
copy before the next transformer forward, and each flagged head is refreshed at its layer's next
call in the same CFG branch (one step later: never inside a forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STORE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class StepCache:
    """Configuration of the cross-step attention cache.

    Args:
        refresh_every: recompute the external partial every k steps. Default 3 (1 = every
            step: exact dense attention at sparse cost plus the external pass).
        lse_gate: also refresh a head when the mean ``|lse_internal - lse_internal_at_refresh|``
            over its queries exceeds this (FlashBlock: 0.05). None (default) disables it. A head
            the gates flag is refreshed at its layer's next call (the flags of all layers are
            read once per transformer forward).
        cosine_gate: also refresh a head when the cosine similarity of its internal output to the
            one at refresh falls below this (FlashBlock: 0.85); stores the internal output too
            (doubles the memory). None (default) disables it.
        store_dtype: dtype of the stored external output: None (the model's), float32,
            bfloat16 or float16. The log-sum-exp is always float32.
        offload: keep the stored partials in CPU memory (pinned when CUDA is used).
        light: store only each query's external softmax mass (its log-sum-exp, O(S x H)) instead
            of the external output (O(S x H x D)), and rescale the sparse output by the internal
            share of the total mass (after Re-ttention). Default False.

    >>> StepCache(refresh_every=3)
    StepCache(refresh_every=3, lse_gate=None, cosine_gate=None, store_dtype=None, offload=False, light=False)
    """

    refresh_every: int = 3
    lse_gate: float | None = None
    cosine_gate: float | None = None
    store_dtype: torch.dtype | None = None
    offload: bool = False
    light: bool = False

    def __post_init__(self):
        k = self.refresh_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"StepCache refresh_every must be an int >= 1, got {k!r}")
        for name in ("lse_gate", "cosine_gate"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"StepCache {name} must be None or a number >= 0, got {value!r}")
        if self.cosine_gate is not None and self.cosine_gate > 1:
            raise ValueError(f"StepCache cosine_gate must be <= 1, got {self.cosine_gate!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"StepCache store_dtype must be one of None, float32, bfloat16, float16, got {self.store_dtype!r}")
        for name in ("offload", "light"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"StepCache {name} must be a bool, got {getattr(self, name)!r}")


@dataclass
class CacheEntry:
    """The stored external partial of one layer and CFG branch."""

    step: int
    key: tuple  # (shape, dtype, device, token layout, heads): any change invalidates
    out_ext: torch.Tensor | None  # [B, S, H, D], store dtype, maybe on CPU (None in light mode)
    lse_ext: torch.Tensor  # [B, S, H] float32
    lse_in: torch.Tensor | None = None  # for the lse gate
    out_in: torch.Tensor | None = None  # for the cosine gate
    heads: tuple[int, int] | None = None  # global indices (first, stop) of the H heads held: under Ulysses
    # context parallelism each rank keeps the entries of its own heads
    selection: torch.Tensor | None = None  # bool [B, H, NQ, NK]: a dynamic pattern's blocks at the refresh,
    # used until the next one (the external partial is their complement)

    @property
    def nbytes(self) -> int:
        held = (self.out_ext, self.lse_ext, self.lse_in, self.out_in, self.selection)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


def light_merge(out_in: torch.Tensor, lse_in: torch.Tensor, lse_ext: torch.Tensor) -> torch.Tensor:
    """The sparse output scaled by its share of the total softmax mass, ``Z_in / (Z_in + Z_ext)``
    (light mode: the external output itself is not stored)."""
    share = torch.exp(lse_in - torch.logaddexp(lse_in, lse_ext.to(lse_in.device)))
    share = torch.where(torch.isfinite(share), share, torch.ones_like(share))
    return (out_in.float() * share[..., None]).to(out_in.dtype)


def stored(t: torch.Tensor, config: StepCache, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` as the cache keeps it (dtype, device). The partials are fresh tensors that nothing
    else writes to, so no copy is made unless the dtype or device changes."""
    t = t.detach().to(dtype or config.store_dtype or t.dtype)
    if config.offload and t.device.type != "cpu":  # one copy, straight into pinned memory
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True).copy_(t, non_blocking=True)
    return t


def drifted_heads(entry: CacheEntry, out_in: torch.Tensor, lse_in: torch.Tensor, config: StepCache) -> torch.Tensor:
    """``bool [H]``: heads whose internal part drifted past a gate since the last refresh."""
    heads = torch.zeros(lse_in.shape[-1], dtype=torch.bool, device=lse_in.device)
    if config.lse_gate is not None and entry.lse_in is not None:
        ref = entry.lse_in.to(lse_in.device)
        delta = (lse_in - ref).abs()
        delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
        heads |= delta.mean(dim=(0, 1)) > config.lse_gate
    if config.cosine_gate is not None and entry.out_in is not None:
        ref = entry.out_in.to(out_in.device, torch.float32)
        cos = torch.nn.functional.cosine_similarity(out_in.float().flatten(0, 1), ref.flatten(0, 1), dim=-1)  # [B*S, H]
        heads |= cos.mean(0) < config.cosine_gate
    return heads


def parse_step_cache(spec: str | None) -> StepCache:
    """``StepCache`` from a command-line string: ``"default"`` / ``""`` or
    ``"refresh_every=3,store_dtype=bfloat16,offload=true,lse_gate=0.05,cosine_gate=0.85"``.

    >>> parse_step_cache("refresh_every=2,store_dtype=bfloat16")
    StepCache(refresh_every=2, lse_gate=None, cosine_gate=None, store_dtype=torch.bfloat16, offload=False)
    """
    if spec is None or spec.strip() in ("", "default"):
        return StepCache()
    dtypes = {"none": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    kwargs = {}
    for item in spec.split(","):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            raise ValueError(f"cache option {item!r}: expected key=value")
        try:
            if key == "refresh_every":
                kwargs[key] = int(value)
            elif key in ("lse_gate", "cosine_gate"):
                kwargs[key] = None if value.lower() == "none" else float(value)
            elif key == "store_dtype":
                kwargs[key] = dtypes[value.lower()]
            elif key in ("offload", "light"):
                kwargs[key] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
            else:
                raise ValueError(f"unknown cache option {key!r}; allowed: refresh_every, lse_gate, cosine_gate, "
                                 "store_dtype, offload, light")
        except (KeyError, ValueError) as exc:
            if isinstance(exc, ValueError) and "unknown cache option" in str(exc):
                raise
            raise ValueError(f"cache option {key}={value!r} is not valid") from None
    return StepCache(**kwargs)
