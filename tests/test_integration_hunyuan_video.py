"""diffattn on a tiny random-weight HunyuanVideo transformer: joint attention, text last, padding."""

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

import diffattn
from diffattn import Dense, SlidingWindow

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
              pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hunyuan") / "transformer"
    HunyuanVideoTransformer3DModel(**CONFIG).save_pretrained(path)
    return HunyuanVideoTransformer3DModel.from_pretrained(path).eval()


def make_inputs(text_valid=(7, 3)):
    gen = torch.Generator().manual_seed(1)
    batch = len(text_valid)
    mask = torch.zeros(batch, 7, dtype=torch.long)
    for b, n in enumerate(text_valid):
        mask[b, :n] = 1
    return dict(
        hidden_states=torch.randn(batch, 4, 3, 8, 12, generator=gen),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 7, 16, generator=gen),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=gen),
        guidance=torch.tensor([3000.0] * batch),
    )


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).sample


@torch.no_grad()
def test_dense_exact_window_covering_grid_close_remove_exact(model):
    inputs = make_inputs()
    base = run(model, inputs)
    handle = diffattn.apply(model, Dense())
    assert handle.family == "hunyuan_video" and len(handle.replaced["transformer"]) == 4
    assert "token_refiner" not in " ".join(handle.replaced["transformer"])
    assert torch.equal(run(model, inputs), base)
    diffattn.apply(model, SlidingWindow((3, 4, 6)))  # the whole (3, 4, 6) grid; text padding honoured
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    small = run(model, inputs)
    assert torch.isfinite(small).all() and (small - base).abs().max() > 1e-3
    diffattn.remove(model)
    assert torch.equal(run(model, inputs), base)


@torch.no_grad()
def test_padded_text_is_never_attended(model):
    """Changing the padded prompt embeddings must not change the output (sparse path)."""
    diffattn.apply(model, SlidingWindow((1, 3, 3)))
    a = make_inputs((7, 3))
    b = dict(a)
    noisy = a["encoder_hidden_states"].clone()
    noisy[1, 3:] += 10.0  # padding of batch row 1
    b["encoder_hidden_states"] = noisy
    out_a, out_b = run(model, a), run(model, b)
    diffattn.remove(model)
    torch.testing.assert_close(out_a[1], out_b[1], atol=1e-5, rtol=1e-5)


def test_layout_text_last(model):
    handle = diffattn.apply(model, SlidingWindow((1, 3, 3)))
    seen = []
    hook = model._diffusers_hook.get_hook("diffattn.generation_state")
    with torch.no_grad():
        run(model, make_inputs())
    seen.append(handle.states["transformer"].layout)
    diffattn.remove(model)
    layout = seen[0]
    assert layout.grid == (3, 4, 6) and layout.text_len == 7 and layout.text_first is False
    assert hook is not None


def test_real_shapes_on_meta():
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(num_layers=1, num_single_layers=1, num_refiner_layers=1)
    handle = diffattn.apply(model, SlidingWindow((3, 9, 9)))
    assert handle.replaced["transformer"] == ["transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"]
    diffattn.remove(model)
