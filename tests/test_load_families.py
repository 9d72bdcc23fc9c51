"""Loading the newer families' pipelines from local folders, with and without their presets.

- Wan VACE and SkyReels-V2 diffusion forcing: whole tiny pipelines (random weights, the MiniLM
  tokenizer with a tiny random BERT as text encoder) saved with ``save_pretrained`` and run by
  ``diffattn generate --model FOLDER``.
- The others need tokenizers / text encoders from the hub (Qwen2.5-VL, Gemma 3, Mistral, ...):
  their folders hold ``model_index.json`` and a tiny random transformer, and ``load_pipeline``
  builds the real pipeline class with the other components left out (``text_encoder=None`` ...),
  then installs the family's preset.

No network: only local folders.
"""

import inspect
import json

import pytest
import torch

import diffattn
from diffattn.cli import main
from diffattn.pipelines import TRANSFORMER_FAMILIES, family_of, load_pipeline
from diffattn.presets import load_preset

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
           freq_dim=8, ffn_dim=16, num_layers=2, rope_max_seq_len=32)
SMALL = ["--steps", "1", "--size", "64x64", "--frames", "5", "--no-progress"]  # token grid 2x4x4

# pipeline class -> (transformer class, tiny constructor arguments, family, preset)
INDEX_ONLY = {
    "WanAnimatePipeline": ("WanAnimateTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=None, latent_channels=4,
        out_channels=4, text_dim=8, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=12,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2,
        inject_face_latents_blocks=1, motion_encoder_batch_size=4), "wan_animate", "wan_animate-window"),
    "HunyuanVideo15Pipeline": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(4, 6, 6)), "hunyuan_video15", "hunyuan_video15-window"),
    "LTX2Pipeline": ("LTX2VideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16, base_height=256,
        base_width=256), "ltx2", "ltx2-window"),
    "Kandinsky5T2VPipeline": ("Kandinsky5Transformer3DModel", dict(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)), "kandinsky5",
        "kandinsky5-window"),
    "MotifVideoPipeline": ("MotifVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=2,
        mlp_ratio=2.0, patch_size=2, text_embed_dim=16, image_embed_dim=12, rope_axes_dim=(4, 6, 6)), "motif_video",
        "motif_video-window"),
    "QwenImagePipeline": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6)), "qwen_image", "qwen_image-window"),
    "Flux2Pipeline": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)), "flux2", "flux2-window"),
}
# other pipelines of the same transformers
INDEX_ONLY["QwenImageEditPipeline"] = INDEX_ONLY["QwenImagePipeline"]
INDEX_ONLY["Kandinsky5T2IPipeline"] = INDEX_ONLY["Kandinsky5T2VPipeline"][:3] + (None,)


def _text_parts():
    from transformers import AutoTokenizer, BertConfig, BertModel

    from diffattn.pipelines.embedded import minilm_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    return tokenizer, BertModel(config).eval()


def _wan_pipeline(name: str, folder):
    """A tiny random-weight WanVACEPipeline / SkyReelsV2DiffusionForcingPipeline saved to ``folder``."""
    import diffusers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    from diffattn.pipelines.embedded import EMBEDDED_SCHEDULER_CONFIG

    torch.manual_seed(0)
    tokenizer, text_encoder = _text_parts()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    if name == "WanVACEPipeline":  # control input: the video and its reactive part (2 x 4) and the 8x8 mask (64)
        transformer = diffusers.WanVACETransformer3DModel(**WAN, vace_layers=[0], vace_in_channels=2 * 4 + 64)
    else:
        transformer = diffusers.SkyReelsV2Transformer3DModel(**WAN)
    pipe = getattr(diffusers, name)(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(),
                                    scheduler=UniPCMultistepScheduler(**dict(EMBEDDED_SCHEDULER_CONFIG)),
                                    transformer=transformer.eval())
    pipe.save_pretrained(str(folder))
    return folder


def _generate(argv, capsys):
    code = main(["generate", *argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize("name, method", [
    ("WanVACEPipeline", ["--preset", "wan_vace-radial", "--dense-steps", "0", "--dense-layers", "0"]),
    ("SkyReelsV2DiffusionForcingPipeline", ["--method", "window:1x3x3"]),
])
def test_generate_model_folder(name, method, tmp_path, capsys):
    pytest.importorskip("ftfy")  # these pipelines clean prompts with ftfy unconditionally
    folder = _wan_pipeline(name, tmp_path / "model")
    out = tmp_path / "out" / "clip.mp4"
    code, captured = _generate([*SMALL, "--model", str(folder), *method, "--out", str(out)], capsys)
    assert code == 0, captured.err[-2000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["model"]["description"] == f"{name} from {folder}" and record["model"]["embedded"] is False
    assert record["token_grid"] == [2, 4, 4]
    if "--preset" in method:
        assert record["preset"] == "wan_vace-radial" and record["method"]["pattern"] == "radial:0.2"
        assert record["attended_fraction"] == 1.0  # 32 tokens: one block, Radial keeps it whole
    else:
        assert record["attended_fraction"] == 9 / 32  # 1x3x3 of the 2x4x4 grid
    # a preset of another family is refused before any weights load
    code, captured = _generate([*SMALL, "--model", str(folder), "--preset", "wan-window", "--out", str(tmp_path / "x.mp4")],
                               capsys)
    family = TRANSFORMER_FAMILIES[json.loads((folder / "model_index.json").read_text())["transformer"][1]]
    assert code == 2 and f"is a '{family}' pipeline but family='wan' was asked for" in captured.err


def _index_folder(tmp_path, pipeline: str):
    import diffusers

    transformer, config, _, _ = INDEX_ONLY[pipeline]
    folder = tmp_path / pipeline
    torch.manual_seed(0)
    getattr(diffusers, transformer)(**config).save_pretrained(folder / "transformer")
    components = [p for p in inspect.signature(getattr(diffusers, pipeline).__init__).parameters
                  if p not in ("self", "transformer")]
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
             **{c: [None, None] for c in components}, "transformer": ["diffusers", transformer]}
    (folder / "model_index.json").write_text(json.dumps(index))
    left_out = {c: None for c in components}
    if pipeline == "HunyuanVideo15Pipeline":  # its constructor reads the VAE's configuration
        left_out["vae"] = diffusers.AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5,
                                                                layers_per_block=1)
    return folder, left_out


@pytest.mark.parametrize("pipeline", [p for p in INDEX_ONLY if INDEX_ONLY[p][3] is not None])
def test_load_pipeline_with_the_family_preset(pipeline, tmp_path):
    _, _, family, preset_name = INDEX_ONLY[pipeline]
    folder, left_out = _index_folder(tmp_path, pipeline)
    preset = load_preset(preset_name)
    pipe, handle = load_pipeline(folder, preset_name, **left_out)
    assert type(pipe).__name__ == pipeline and family_of(pipe) == family == preset.family
    assert handle.pattern == preset.build_pattern() and handle.schedule == preset.schedule
    assert handle.replaced["transformer"]  # the family's sparse processors are installed
    diffattn.remove(pipe)
    # the family is checked from model_index.json: another family's preset is refused
    with pytest.raises(ValueError, match=f"is a '{family}' pipeline but preset 'wan-window' is for family 'wan'"):
        load_pipeline(folder, "wan-window", **left_out)


def test_preset_settings_the_pipeline_does_not_take_are_refused(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    folder, left_out = _index_folder(tmp_path, "Kandinsky5T2IPipeline")
    pipe, handle = load_pipeline(folder, **left_out)  # no preset: loads
    assert family_of(pipe) == "kandinsky5" and handle is None

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained must not run when the preset does not fit the pipeline")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="Kandinsky5T2IPipeline, which does not take the generation setting.s. "
                                         "num_frames of preset 'kandinsky5-window'.*Kandinsky5T2VPipeline checkpoints"):
        load_pipeline(folder, "kandinsky5-window", **left_out)
