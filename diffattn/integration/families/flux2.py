"""FLUX.2 (``Flux2Transformer2DModel``: FLUX.2 [dev], FLUX.2 [klein]; text-to-image and multi-reference
editing): sparse joint attention of every double-stream block (``transformer_blocks.{i}.attn``,
``Flux2Attention``) and every single-stream block (``single_transformer_blocks.{i}.attn``,
``Flux2ParallelSelfAttention``), in execution order (double-stream blocks first).

q/k/v exactly as diffusers' ``Flux2AttnProcessor`` (separate or fused projections, per-head RMS q/k
norms, ``[text; image]``, real RoPE over the joint sequence) and ``Flux2ParallelSelfAttnProcessor``
(one fused ``to_qkv_mlp_proj`` whose MLP half runs beside attention and joins the output projection).
The two attention classes call their processors with different positional arguments, so each gets its
own diffattn processor.

Tokens: ``[text; image]`` in both kinds of block. The image part is the target grid followed by the
reference images of an editing call. ``img_ids`` (``[S_img, 4]`` or ``[B, S_img, 4]``: ``(t, h, w, l)``)
say which is which: the target is the leading run of rows with the first row's ``t`` and ``l``
(FLUX.2 pipelines give it ``t = 0``; references get ``t = 10, 20, ...``), and must be one raster grid
``(h0 + i // W, w0 + i % W)``. Reference tokens are attended densely, like text; the sequence
``[text; target; references]`` is reordered to ``[references; text; target]`` for attention and back
(``_packed``; under context parallelism such calls run dense, warned once). ``img_ids`` that are not
one grid plus trailing references run the call dense with a ``UserWarning``.

Refused: any other processor at apply time -- notably ``Flux2KleinKVPipeline``'s KV-cache processors
(``Flux2KVAttnProcessor`` / ``Flux2KVParallelSelfAttnProcessor``, installed by that pipeline: its
reference tokens attend only to themselves and are cached across steps, which diffattn's processors
would drop) -- and a transformer call with ``kv_cache_mode`` at call time.

Timestep: FLUX.2 pipelines pass ``timestep / 1000``; ``timestep()`` returns scheduler units.
"""

from __future__ import annotations

import functools
import warnings

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    _get_qkv_projections,
)

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore
from ._packed import attend_packed, packed_layout

# Flux2Transformer2DModel.forward(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance,
#                                 joint_attention_kwargs, return_dict, kv_cache, kv_cache_mode, ...)
_POSITIONS = {"hidden_states": 0, "encoder_hidden_states": 1, "timestep": 2, "img_ids": 3, "kv_cache_mode": 9}


_argument = functools.partial(call_argument, _POSITIONS)


class Flux2SparseProcessor:
    """FLUX.2 double-stream joint attention with diffattn (same projections, norms, ``[text; image]``
    order and RoPE as diffusers' ``Flux2AttnProcessor``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly Flux2AttnProcessor's.
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = attend_packed(self.core, query, key, value, backend=self._attention_backend,
                                      parallel_config=self._parallel_config, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class Flux2SingleSparseProcessor:
    """FLUX.2 single-stream (parallel) attention with diffattn (same fused projection, norms, RoPE
    and fused MLP as diffusers' ``Flux2ParallelSelfAttnProcessor``); the joint sequence arrives
    already ``[text; image]``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly Flux2ParallelSelfAttnProcessor's.
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)

        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = attend_packed(self.core, query, key, value, backend=self._attention_backend,
                                      parallel_config=self._parallel_config, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        return attn.to_out(hidden_states)


def target_grid(img_ids: torch.Tensor, num_image_tokens: int) -> tuple[tuple[int, int] | None, int, str]:
    """``((H, W), n_target, "")`` when ``img_ids`` start with one raster grid of constant ``t`` and
    ``l`` (the target) -- any rows after it are reference tokens -- else ``(None, 0, why not)``."""
    if not isinstance(img_ids, torch.Tensor):
        return None, 0, f"img_ids must be a tensor, got {type(img_ids).__name__}"
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[-1] != 4 or ids.shape[0] != num_image_tokens or num_image_tokens == 0:
        return None, 0, (f"img_ids must be [S, 4] (t, h, w, l) with S = {num_image_tokens} image tokens, got shape "
                         f"{tuple(img_ids.shape)}")
    ids64 = ids.detach().to(torch.float64)
    first = ids64[0]
    same = (ids64[:, 0] == first[0]) & (ids64[:, 3] == first[3])
    n = int(same.long().cumprod(0).sum())  # the leading run of the first row's (t, l)
    width = int((ids64[:n, 1] == first[1]).sum())
    if width and n % width == 0:
        index = torch.arange(n, dtype=torch.float64, device=ids.device)
        expected = torch.stack([first[0].expand(n), first[1] + torch.div(index, width, rounding_mode="floor"),
                                first[2] + index % width, first[3].expand(n)], dim=1)
        if torch.equal(expected, ids64[:n]) and not bool(same[n:].any()):
            return (n // width, width), n, ""
    return None, 0, (f"the {n} leading img_ids rows with (t, l) = ({first[0].item():g}, {first[3].item():g}) are not "
                     "one (H, W) grid in raster order followed only by reference images")


class Flux2Adapter:
    """How diffattn meets FLUX.2's transformer."""

    name = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    _num_double = 0  # set by sparse_processor_names, read by processor_class (apply calls them in turn)

    def sparse_processor_names(self, transformer) -> list[str]:
        """Double-stream, then single-stream attention processors; each must be diffusers' default."""
        double = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}.attn.processor"
                  for i in range(len(transformer.single_transformer_blocks))]
        processors = transformer.attn_processors
        for names, default in ((double, Flux2AttnProcessor), (single, Flux2ParallelSelfAttnProcessor)):
            for name in names:
                proc = processors[name]
                if type(proc) is not default:
                    why = ("Flux2KleinKVPipeline's reference-image KV cache (its reference tokens attend only to "
                           "themselves and are reused across steps), which diffattn's processors would drop"
                           if "KV" in type(proc).__name__ else f"diffattn replaces only diffusers' {default.__name__}")
                    raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(proc).__name__} ({why})")
        self._num_double = len(double)
        return double + single

    def processor_class(self, core: SparseAttentionCore):
        """The processor for the attention at ``core.slot`` (double-stream slots come first)."""
        cls = Flux2SparseProcessor if core.slot < self._num_double else Flux2SingleSparseProcessor
        return cls(core)

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """``[text; target]`` (references dense, as a PackedLayout), or None (dense, warned) when
        ``img_ids`` are not a target grid followed by references."""
        if _argument("kv_cache_mode", args, kwargs) is not None:
            raise ValueError("diffattn's FLUX.2 processors do not implement kv_cache_mode (Flux2KleinKVPipeline's "
                             "reference-image KV cache); diffattn.remove() the transformer to use it")
        hidden = _argument("hidden_states", args, kwargs)
        text = _argument("encoder_hidden_states", args, kwargs)
        img_ids = _argument("img_ids", args, kwargs)
        if hidden is None or text is None or img_ids is None:
            return None
        grid, target, why = target_grid(img_ids, hidden.shape[1])
        if grid is None:
            warnings.warn(f"diffattn: {why}; this FLUX.2 transformer call runs diffusers' dense attention",
                          UserWarning, stacklevel=2)
            return None
        runs = [("text", text.shape[1]), ("grid", target), ("dense", hidden.shape[1] - target)]
        return packed_layout(grid, runs, text_first=True)

    def timestep(self, args, kwargs):
        """The call's timestep in scheduler units (FLUX.2 pipelines pass ``t / 1000``)."""
        t = _argument("timestep", args, kwargs)
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            t = t.reshape(-1)[0]
        return float(t) * 1000.0


ADAPTER = Flux2Adapter()
