"""Loading the newer families' pipelines from local folders, with and without their presets.

- Wan VACE, SkyReels-V2 diffusion forcing, Mochi and Z-Image: whole tiny pipelines (random weights,
  the MiniLM tokenizer with a tiny random BERT as text encoder) saved with ``save_pretrained`` and
  run by ``diffattn generate --model FOLDER``.
- The others need tokenizers / text encoders from the hub (Qwen2.5-VL, Gemma 3, Mistral, ...):
  their folders hold ``model_index.json`` and a tiny random transformer, and ``load_pipeline``
  builds the real pipeline class with the other components left out (``text_encoder=None`` ...),
  then installs the family's preset. Cosmos pipelines get a stand-in safety checker (diffusers
  builds ``cosmos_guardrail``'s when none is given).
- MiniMax-H3 ships as a modular pipeline: ``load_pipeline`` refuses it with directions, and
  ``diffattn.apply`` works on the modular pipeline itself.

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
COSMOS = ("CosmosTransformer3DModel", dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2.0,
    text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), concat_padding_mask=False),
    "cosmos", "cosmos-window")
INDEX_ONLY["Cosmos2VideoToWorldPipeline"] = COSMOS
# other pipelines of the same transformers
INDEX_ONLY["QwenImageEditPipeline"] = INDEX_ONLY["QwenImagePipeline"]
INDEX_ONLY["Kandinsky5T2IPipeline"] = INDEX_ONLY["Kandinsky5T2VPipeline"][:3] + (None,)
INDEX_ONLY["Cosmos2_5_PredictBasePipeline"] = COSMOS
INDEX_ONLY["CosmosTextToWorldPipeline"] = COSMOS  # Cosmos 1.0: the preset's window fits its 8x-temporal grid too
INDEX_ONLY["Cosmos2TextToImagePipeline"] = COSMOS[:3] + (None,)
INDEX_ONLY["ZImageOmniPipeline"] = ("ZImageTransformer2DModel", dict(
    in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, siglip_feat_dim=8,
    axes_dims=[4, 6, 6], axes_lens=[256, 32, 32]), "z_image", "z_image-window")


def _text_parts():
    from transformers import AutoTokenizer, BertConfig, BertModel

    from diffattn.pipelines.embedded import minilm_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    return tokenizer, BertModel(config).eval()


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def _wan_pipeline(name: str, folder):
    """A tiny random-weight WanVACEPipeline / SkyReelsV2DiffusionForcingPipeline saved to ``folder``."""
    import diffusers
    from diffusers import UniPCMultistepScheduler

    from diffattn.pipelines.embedded import EMBEDDED_SCHEDULER_CONFIG

    torch.manual_seed(0)
    tokenizer, text_encoder = _text_parts()
    vae = _wan_vae()
    if name == "WanVACEPipeline":  # control input: the video and its reactive part (2 x 4) and the 8x8 mask (64)
        transformer = diffusers.WanVACETransformer3DModel(**WAN, vace_layers=[0], vace_in_channels=2 * 4 + 64)
    else:
        transformer = diffusers.SkyReelsV2Transformer3DModel(**WAN)
    pipe = getattr(diffusers, name)(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
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


def _mochi_pipeline(folder):
    """A tiny random-weight MochiPipeline saved to ``folder`` (Mochi's VAE has 12 latent channels)."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(0)
    tokenizer, text_encoder = _text_parts()
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             layers_per_block=(1,) * 5, latents_mean=(0.0,) * 12, latents_std=(1.0,) * 12)
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                          pooled_projection_dim=16, in_channels=12, text_embed_dim=16, time_embed_dim=8)
    MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                  tokenizer=tokenizer, transformer=transformer.eval()).save_pretrained(str(folder))
    return folder


def _z_image_pipeline(folder):
    """A tiny random-weight ZImagePipeline saved to ``folder`` (its prompt goes through a chat template)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    tokenizer, text_encoder = _text_parts()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    vae = AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=1.0, shift_factor=0.0)
    transformer = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                   tokenizer=tokenizer, transformer=transformer.eval()).save_pretrained(str(folder))
    return folder


@pytest.mark.filterwarnings("ignore:In CPU autocast")  # MochiRoPE's float32 autocast on CPU
@pytest.mark.parametrize("name, build, family, size, grid, window", [
    ("MochiPipeline", _mochi_pipeline, "mochi", ["--steps", "2", "--frames", "7"], [2, 4, 4], "window:1x3x3"),  # 2 steps at least
    ("ZImagePipeline", _z_image_pipeline, "z_image", ["--steps", "1"], [4, 4], "window:1x3"),
])
def test_generate_tiny_pipeline_with_its_preset(name, build, family, size, grid, window, tmp_path, capsys):
    """The family's preset (its generation settings and family check) with a window that fits the tiny grid."""
    folder = build(tmp_path / "model")
    out = tmp_path / "out" / ("clip.mp4" if len(grid) == 3 else "image.png")
    argv = ["--size", "64x64", *size, "--no-progress", "--model", str(folder), "--preset", f"{family}-window",
            "--method", window, "--dense-steps", "0", "--dense-layers", "0", "--out", str(out)]
    code, captured = _generate(argv, capsys)
    assert code == 0, captured.err[-2000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["model"]["description"] == f"{name} from {folder}" and record["preset"] == f"{family}-window"
    assert record["token_grid"] == grid and record["method"]["pattern"] == window
    assert record["timings_s"]["self_attention"] > 0  # diffattn's processors were timed
    preset = load_preset(f"{family}-window")
    assert record["settings"]["guidance_scale"] == preset.generation["guidance_scale"]
    code, captured = _generate([*argv[:-2], "--preset", "wan-window", "--out", str(tmp_path / "x.mp4")], capsys)
    assert code == 2 and f"is a '{family}' pipeline but family='wan' was asked for" in captured.err


class _StandInSafetyChecker(torch.nn.Module):
    """Cosmos pipelines build cosmos_guardrail's checker when given none; loading needs only something."""


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
    if pipeline == "Cosmos2_5_PredictBasePipeline":  # so does this one
        left_out["vae"] = _wan_vae()
    if "safety_checker" in left_out:
        left_out["safety_checker"] = _StandInSafetyChecker()
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


@pytest.mark.parametrize("pipeline, preset, video_pipeline", [
    ("Kandinsky5T2IPipeline", "kandinsky5-window", "Kandinsky5T2VPipeline"),
    ("Cosmos2TextToImagePipeline", "cosmos-window", "Cosmos2VideoToWorldPipeline"),
])
def test_preset_settings_the_pipeline_does_not_take_are_refused(pipeline, preset, video_pipeline, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    folder, left_out = _index_folder(tmp_path, pipeline)
    pipe, handle = load_pipeline(folder, **left_out)  # no preset: loads
    assert family_of(pipe) == INDEX_ONLY[pipeline][2] and handle is None

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained must not run when the preset does not fit the pipeline")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=f"{pipeline}, which does not take the generation setting.s. "
                                         f"num_frames of preset '{preset}'.*{video_pipeline} checkpoints"):
        load_pipeline(folder, preset, **left_out)


MINIMAX = dict(num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
               ffn_dim=64, in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
               time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2)


def test_minimax_h3_modular_pipeline(tmp_path, monkeypatch):
    """load_pipeline refuses MiniMax-H3 (a modular pipeline) with directions; diffattn.apply takes the
    modular pipeline itself, its transformer and its (video) scheduler."""
    import diffusers
    from diffusers import DiffusionPipeline, MiniMaxH3Blocks, MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel

    from diffattn.integration.apply import _installed_hook

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained must not run for a modular pipeline")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    modular = tmp_path / "modular"
    modular.mkdir()
    (modular / "modular_model_index.json").write_text(json.dumps({"_class_name": "MiniMaxH3ModularPipeline"}))
    with pytest.raises(ValueError, match=r"is a diffusers modular pipeline .*ModularPipeline.from_pretrained.*diffattn.apply"):
        load_pipeline(modular)
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    (indexed / "model_index.json").write_text(json.dumps({"_class_name": "MiniMaxH3ModularPipeline",
                                                          "transformer": ["diffusers", "MiniMaxH3Transformer3DModel"]}))
    with pytest.raises(ValueError, match=r"MiniMaxH3Transformer3DModel ships in a diffusers modular pipeline"):
        load_pipeline(indexed, family="minimax_h3")

    pipe = MiniMaxH3Blocks().init_pipeline()
    assert type(pipe).__name__ == "MiniMaxH3ModularPipeline" and not isinstance(pipe, diffusers.DiffusionPipeline)
    torch.manual_seed(0)
    pipe.update_components(transformer=MiniMaxH3Transformer3DModel(**MINIMAX).eval(), scheduler=MiniMaxH3Scheduler())
    handle = diffattn.apply(pipe, diffattn.SlidingWindow((1, 3, 3)), dense_steps=1, dense_layers=1, dense_last_steps=1)
    assert handle.replaced["transformer"] == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    assert _installed_hook(pipe.transformer).scheduler is pipe.scheduler  # steps from the video scheduler
    diffattn.remove(pipe)
    assert _installed_hook(pipe.transformer) is None
