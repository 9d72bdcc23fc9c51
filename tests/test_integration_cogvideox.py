"""diffattn.apply / remove on tiny random-weight CogVideoX transformers, saved and loaded back.

Three variants of diffusers' ``CogVideoXTransformer3DModel``: 1.0 with sin-cos positional
embeddings (CogVideoX-2b), 1.0 with rotary embeddings (CogVideoX-5b), and 1.5 I2V (``patch_size_t``,
image latents on the channel axis, ``ofs`` embedding, rotary). The rotary embeddings are built by
the pipeline's own ``_prepare_rotary_positional_embeddings``.
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout

TINY = dict(num_attention_heads=2, attention_head_dim=16, out_channels=4, time_embed_dim=8, text_embed_dim=8,
            num_layers=3, sample_width=10, sample_height=8, sample_frames=9, max_text_seq_length=5)
VARIANTS = {
    "sincos": dict(in_channels=4),
    "rotary": dict(in_channels=4, use_rotary_positional_embeddings=True),
    "v15_i2v": dict(in_channels=8, patch_size_t=2, ofs_embed_dim=8, patch_bias=False,
                    use_rotary_positional_embeddings=True),
}
# latent video [B, F, C, H, W]: 3 frames (1.0) / 4 frames (1.5, patch_size_t=2) of 8 x 10 -> grid (3|2, 4, 5)
FRAMES = {"sincos": 3, "rotary": 3, "v15_i2v": 4}
NAMES = [f"transformer_blocks.{i}.attn1.processor" for i in range(3)]


def rotary(model, frames: int, height: int, width: int):
    if not model.config.use_rotary_positional_embeddings:
        return None
    fake_pipe = SimpleNamespace(vae_scale_factor_spatial=1, transformer=model)  # latent-sized height/width
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, height, width, frames, torch.device("cpu"))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request, tmp_path_factory):
    variant = request.param
    torch.manual_seed(0)
    built = CogVideoXTransformer3DModel(**TINY, **VARIANTS[variant])
    path = tmp_path_factory.mktemp(f"cogvideox_{variant}") / "transformer"
    built.save_pretrained(path)
    model = CogVideoXTransformer3DModel.from_pretrained(path).eval()
    gen = torch.Generator().manual_seed(1)
    frames = FRAMES[variant]
    kwargs = dict(
        hidden_states=torch.randn(1, frames, model.config.in_channels, 8, 10, generator=gen),
        encoder_hidden_states=torch.randn(1, 5, 8, generator=gen),
        timestep=torch.tensor([500]),
        image_rotary_emb=rotary(model, frames, 8, 10),
    )
    if model.config.ofs_embed_dim:
        kwargs["ofs"] = torch.tensor([2.0])
    return SimpleNamespace(model=model, kwargs=kwargs, grid=(frames // (model.config.patch_size_t or 1), 4, 5))


@torch.no_grad()
def run(case):
    return case.model(**case.kwargs).sample


def test_variants_are_what_they_claim(case):
    rope = case.model.config.use_rotary_positional_embeddings
    assert (case.kwargs["image_rotary_emb"] is not None) == rope
    assert case.model.patch_embed.use_positional_embeddings == (not rope)


@torch.no_grad()
def test_dense_is_bit_exact_and_remove_restores(case):
    base = run(case)
    handle = diffattn.apply(case.model, Dense())
    assert handle.family == "cogvideox"
    assert handle.replaced["transformer"] == NAMES
    assert torch.equal(run(case), base)
    assert handle.states["transformer"].layout == TokenLayout(case.grid, text_len=5, text_first=True)
    diffattn.apply(case.model, SlidingWindow((1, 3, 3)))
    assert not torch.allclose(run(case), base)
    diffattn.remove(case.model)
    assert torch.equal(run(case), base)
    with pytest.raises(ValueError, match="not applied"):
        diffattn.remove(case.model)


@torch.no_grad()
def test_window_covering_the_grid_matches_default(case):
    base = run(case)
    diffattn.apply(case.model, SlidingWindow(case.grid))  # the whole token grid
    torch.testing.assert_close(run(case), base, atol=1e-5, rtol=1e-5)
    diffattn.remove(case.model)


@torch.no_grad()
def test_small_window_is_finite_and_differs(case):
    base = run(case)
    diffattn.apply(case.model, SlidingWindow((1, 3, 3), stride=(1, 1, 2)))
    out = run(case)
    diffattn.remove(case.model)
    assert out.shape == base.shape
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


@torch.no_grad()
def test_dense_layers_keep_every_block_dense(case):
    base = run(case)
    diffattn.apply(case.model, SlidingWindow((1, 3, 3)), dense_layers=3)
    assert torch.equal(run(case), base)
    diffattn.remove(case.model)


@torch.no_grad()
def test_apply_twice_replaces_cleanly(case):
    base = run(case)
    diffattn.apply(case.model, SlidingWindow((1, 3, 3)))
    handle = diffattn.apply(case.model, Radial(0.2, block=16))
    assert handle.replaced["transformer"] == NAMES
    assert sum(isinstance(p, type(case.model.attn_processors[NAMES[0]])) for p in case.model.attn_processors.values()) == 3
    out = run(case)
    diffattn.remove(case.model)
    assert torch.isfinite(out).all()
    assert torch.equal(run(case), base)
    assert all(type(p).__name__ == "CogVideoXAttnProcessor2_0" for p in case.model.attn_processors.values())


@torch.no_grad()
def test_positional_call_gives_the_same_layout_and_output(case):
    """The hook reads hidden_states / encoder_hidden_states / timestep given by position too."""
    base = run(case)
    handle = diffattn.apply(case.model, SlidingWindow((1, 3, 3)))
    kw = dict(case.kwargs)
    args = (kw.pop("hidden_states"), kw.pop("encoder_hidden_states"), kw.pop("timestep"))
    by_keyword = run(case)
    by_position = case.model(*args, **kw).sample
    state = handle.states["transformer"]
    diffattn.remove(case.model)
    assert torch.equal(by_keyword, by_position) and not torch.equal(by_position, base)
    assert state.layout == TokenLayout(case.grid, text_len=5) and state.timestep == 500.0


@torch.no_grad()
def test_resolution_and_text_length_change_between_calls(case):
    model = case.model
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    p_t = model.config.patch_size_t or 1
    rope = model.config.use_rotary_positional_embeddings
    # sin-cos models need exactly max_text_seq_length text tokens; 1.5 rotary needs a grid within
    # sample_height x sample_width
    for frames, height, width, text in ((2 * p_t, 6, 8, 3 if rope else 5), (p_t, 8, 6, 7 if rope else 5)):
        kwargs = dict(case.kwargs, hidden_states=torch.randn(1, frames, model.config.in_channels, height, width),
                      encoder_hidden_states=torch.randn(1, text, 8),
                      image_rotary_emb=rotary(model, frames, height, width))
        out = model(**kwargs).sample
        assert out.shape == (1, frames, 4, height, width) and torch.isfinite(out).all()
        assert handle.states["transformer"].layout == TokenLayout((frames // p_t, height // 2, width // 2), text_len=text)
    diffattn.remove(model)


@pytest.mark.parametrize("config", [
    dict(num_layers=1),  # CogVideoX-2b shapes (sin-cos positions)
    dict(num_layers=1, num_attention_heads=48, use_rotary_positional_embeddings=True),  # CogVideoX-5b
    dict(num_layers=1, num_attention_heads=48, in_channels=32, patch_size_t=2, ofs_embed_dim=512, patch_bias=False,
         sample_height=300, sample_width=300, sample_frames=81, use_rotary_positional_embeddings=True),  # 1.5-5B-I2V
], ids=["2b", "5b", "1.5-5b-i2v"])
def test_real_model_shapes_on_meta(config):
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**config)
    original = dict(model.attn_processors)
    assert list(original) == ["transformer_blocks.0.attn1.processor"]
    handle = diffattn.apply(model, SlidingWindow((3, 5, 5)))
    assert handle.replaced["transformer"] == ["transformer_blocks.0.attn1.processor"]
    assert type(model.attn_processors["transformer_blocks.0.attn1.processor"]).__name__ == "CogVideoXSparseProcessor"
    diffattn.remove(model)
    assert all(model.attn_processors[n] is p for n, p in original.items())


@torch.no_grad()
def test_pipeline_steps_follow_the_scheduler(tmp_path):
    """A whole CogVideoXPipeline (no VAE, given prompt embeddings, CFG batched): dense steps are
    exact, and each step's layout and index reach the processors."""
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**dict(TINY, sample_width=4, sample_height=4),
                                              in_channels=4, use_rotary_positional_embeddings=True).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    gen_kwargs = dict(height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
                      prompt_embeds=torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2)),
                      negative_prompt_embeds=torch.zeros(1, 5, 8), output_type="latent")

    def generate():
        return pipe(generator=torch.Generator().manual_seed(3), **gen_kwargs).frames

    base = generate()
    seen = []
    handle = diffattn.apply(pipe, SlidingWindow((1, 3, 3)), dense_steps=3)
    state = handle.states["transformer"]
    spy = transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append((state.step, state.num_steps, state.layout)))
    assert torch.equal(generate(), base)  # every step dense
    spy.remove()
    layout = TokenLayout((3, 4, 4), text_len=5)  # 9 frames -> 3 latent frames; 64 px / 8 / 2 = 4 tokens
    assert seen == [(0, 3, layout), (1, 3, layout), (2, 3, layout)]
    diffattn.apply(pipe, SlidingWindow((1, 3, 3)), dense_steps=1)
    sparse = generate()
    diffattn.remove(pipe)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, base)
    assert torch.equal(generate(), base)
