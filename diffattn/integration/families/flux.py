"""FLUX.1 (dev / schnell, and pipelines built on ``FluxTransformer2DModel``): sparse joint attention.

What becomes sparse: the joint text+image attention of every double-stream block
(``transformer_blocks.{i}.attn``) and every single-stream block (``single_transformer_blocks.{i}.attn``),
in execution order (double-stream blocks first, then single-stream). Flux has no other attention
modules. Processor names ``transformer_blocks.0.attn.processor``, ...,
``single_transformer_blocks.0.attn.processor``, ...; ``dense_layers=L`` keeps the first L of them
(in that order) dense.

Tokens: ``[text; image]`` (text first) in both kinds of block. Double-stream blocks concatenate
the text and image q/k/v themselves; single-stream blocks receive the already joined sequence
and are not told the text length, so it comes from the transformer call:
``text_len = encoder_hidden_states.shape[1]``. The image grid ``(H, W)`` comes from ``img_ids``
(``[S_img, 3]``, or the deprecated ``[B, S_img, 3]``), which Flux pipelines fill with
``(0, row, col)`` per packed 2x2 latent patch in raster order. The ids must form exactly one
full raster grid: ``img_ids[i] == (c, r0 + i // W, c0 + i % W)`` for every image token (any
constants ``c, r0, c0``), with ``H * W`` equal to the number of image tokens in
``hidden_states``.

When they do not -- Flux Kontext appends reference-image tokens with ``img_ids[:, 0] == 1``
after the target grid; other pipelines may use a non-raster order -- the call's layout is
treated as unknown: that transformer call runs diffusers' dense attention (the output is
exactly what diffusers computes) and a ``UserWarning`` names what is unsupported. This
keeps Kontext and similar pipelines working (correct output, no speed-up) instead of failing
mid-generation; a ``TokenLayout`` holds one image grid, so several images in one sequence
cannot be made sparse yet.

Other limitations, checked at ``apply`` time: every replaced processor must be diffusers'
plain ``FluxAttnProcessor``. A loaded Flux IP-Adapter (``FluxIPAdapterAttnProcessor`` on the
double-stream blocks, with its own weights and an extra image-prompt attention branch) is
refused with a ``ValueError``: replacing it would silently drop the IP-Adapter branch.

Timestep: Flux pipelines call the transformer with ``timestep / 1000`` (the transformer
multiplies by 1000 again); ``timestep()`` returns it in the scheduler's units
(``scheduler.timesteps``) so the step index is found in the pipeline's schedule.
"""

from __future__ import annotations

import functools
import warnings

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from ._calls import call_argument
from ...tokens import TokenLayout
from ..core import SparseAttentionCore

# FluxTransformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
#                                img_ids, txt_ids, ...): positions of the arguments read here.
_POSITIONS = {"hidden_states": 0, "encoder_hidden_states": 1, "timestep": 3, "img_ids": 4}


_argument = functools.partial(call_argument, _POSITIONS)


class FluxSparseProcessor:
    """Flux joint attention with diffattn's sparse attention: the same projections, q/k norms,
    ``[text; image]`` concatenation, RoPE and output projections as diffusers'
    ``FluxAttnProcessor``; only the attention itself goes through ``core.attend``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        self.core = core

    # The parameters are exactly FluxAttnProcessor's: FluxAttention.forward drops keyword
    # arguments a processor does not declare.
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

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            # text first
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.core.attend(query, key, value, backend=self._attention_backend,
                                         parallel_config=self._parallel_config, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def image_grid(img_ids: torch.Tensor, num_image_tokens: int | None = None) -> tuple[tuple[int, int] | None, str]:
    """``((H, W), "")`` when ``img_ids`` form one full raster grid, else ``(None, why not)``.

    ``img_ids`` is ``[S, 3]`` (or ``[B, S, 3]``, batch entry 0 is read, as Flux does) with
    ``img_ids[i] == (c, r0 + i // W, c0 + i % W)``. ``num_image_tokens``, when given, must equal S.
    """
    if not isinstance(img_ids, torch.Tensor):
        return None, f"img_ids must be a tensor, got {type(img_ids).__name__}"
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[-1] != 3 or ids.shape[0] == 0:
        return None, f"img_ids must be [S, 3] with S >= 1, got shape {tuple(img_ids.shape)}"
    n = ids.shape[0]
    if num_image_tokens is not None and n != num_image_tokens:
        return None, f"img_ids has {n} rows but hidden_states has {num_image_tokens} image tokens"
    ids64 = ids.detach().to(torch.float64)
    first = ids64[0]
    width = int((ids64[:, 1] == first[1]).sum())
    if width and n % width == 0:
        index = torch.arange(n, device=ids.device, dtype=torch.float64)
        expected = torch.stack([first[0].expand(n), first[1] + torch.div(index, width, rounding_mode="floor"),
                                first[2] + index % width], dim=1)
        if torch.equal(expected.to(ids.dtype), ids):
            return (n // width, width), ""
    other = int((ids64[:, 0] != first[0]).sum())
    if other:
        return None, (f"{other} of {n} image tokens have img_ids[:, 0] != {first[0].item():g}: more than one image "
                      "in the sequence (e.g. FluxKontextPipeline's reference-image tokens) is not supported")
    return None, f"img_ids ({n} image tokens) are not one (H, W) grid in raster order (row-major, then column)"


class FluxAdapter:
    """How diffattn meets Flux's transformer."""

    name = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    processor_class = FluxSparseProcessor

    def sparse_processor_names(self, transformer) -> list[str]:
        """Joint-attention processors in execution order: double-stream blocks, then single-stream."""
        names = [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
        names += [f"single_transformer_blocks.{i}.attn.processor"
                  for i in range(len(transformer.single_transformer_blocks))]
        processors = transformer.attn_processors
        for name in names:
            proc = processors[name]
            if type(proc) is not FluxAttnProcessor:
                what = ("a Flux IP-Adapter is loaded, whose image-prompt attention branch diffattn would drop; "
                        "unload it first (pipe.unload_ip_adapter())"
                        if "IPAdapter" in type(proc).__name__
                        else "diffattn replaces only diffusers' FluxAttnProcessor")
                raise ValueError(f"diffattn cannot make {name} sparse: it is a {type(proc).__name__}, not "
                                 f"FluxAttnProcessor ({what})")
        return names

    def token_layout(self, transformer, args, kwargs) -> TokenLayout | None:
        """``TokenLayout((H, W), text_len, text_first=True)`` of the call, or None (dense, with a
        warning) when ``img_ids`` are not one raster grid."""
        hidden = _argument("hidden_states", args, kwargs)
        text = _argument("encoder_hidden_states", args, kwargs)
        img_ids = _argument("img_ids", args, kwargs)
        if hidden is None or text is None or img_ids is None:
            return None  # the transformer itself will complain about the missing argument
        grid, why = image_grid(img_ids, hidden.shape[1])
        if grid is None:
            warnings.warn(f"diffattn: {why}; diffattn's TokenLayout holds one image grid, so this Flux transformer "
                          "call runs diffusers' dense attention", UserWarning, stacklevel=2)
            return None
        return TokenLayout(grid, text_len=text.shape[1], text_first=True)

    def timestep(self, args, kwargs):
        """The call's timestep in scheduler units (Flux pipelines pass ``t / 1000``)."""
        t = _argument("timestep", args, kwargs)
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            t = t.reshape(-1)[0]
        return float(t) * 1000.0


ADAPTER = FluxAdapter()
