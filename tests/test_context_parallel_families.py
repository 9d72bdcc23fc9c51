"""Ulysses context parallelism for the families whose diffusers transformer has a ``_cp_plan``
besides Wan / Flux / LTX-Video (``tests/test_context_parallel.py``): Qwen-Image, FLUX.2, LTX-2,
MiniMax-H3. Two Gloo ranks on CPU run diffusers' own context-parallel code; rank 0 also runs each scenario in
one process, sparse and dense (diffusers' processors), as the references.

- plain calls (``[text; image]``, or the video grid alone) run sparse on every rank: two ranks
  equal one sparse process;
- calls whose dense tokens sit on both sides of the grid (Qwen-Image-Edit's condition images,
  FLUX.2's reference images: reordered by ``families/_packed.py``), LTX-2's tokens after the grid
  (keyframes), MiniMax-H3's packed [text | audio | video] sequence (split as one tensor), and calls
  with a key-padding mask cannot be laid out per rank: they run diffusers' dense Ulysses attention,
  as the adapters say -- two ranks equal one *dense* process, not a wrong sparse result.

The families without a ``_cp_plan`` (Wan VACE / Animate, SkyReels-V2, HunyuanVideo 1.5, Kandinsky 5,
Motif-Video) are refused by ``enable_ulysses`` by name (single-process test at the end).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
ATOL = 1e-4
TIMESTEPS = (0.9,)  # one transformer call per scenario (no dense warm-up: every call is sparse)
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
FLUX2 = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))
LTX2 = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
            cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
            audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16,
            base_height=256, base_width=256)
MINIMAX = dict(num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
               ffn_dim=64, in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
               time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2)
TEXT = 4  # text tokens (even: diffusers splits text and image separately, each over the 2 ranks)


# --- the worker (runs in the two subprocesses) -------------------------------------------


def _qwen_call(images, mask=None):
    gen = torch.Generator().manual_seed(1)
    tokens = sum(h * w for h, w in images)
    kwargs = dict(hidden_states=torch.randn(1, tokens, 16, generator=gen),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen),
                  encoder_hidden_states_mask=None if mask is None else torch.tensor([mask]),
                  img_shapes=[[(1, h, w) for h, w in images]])
    return lambda model, t: model(timestep=torch.tensor([t]), return_dict=False, **kwargs)[0]


def _flux2_ids(h, w, t=0):
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.tensor([0])).float()


def _flux2_call(refs=()):
    gen = torch.Generator().manual_seed(1)
    img_ids = torch.cat([_flux2_ids(4, 6)] + [_flux2_ids(h, w, t=10 * (i + 1)) for i, (h, w) in enumerate(refs)])
    kwargs = dict(hidden_states=torch.randn(1, img_ids.shape[0], 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen), img_ids=img_ids[None],
                  txt_ids=torch.zeros(1, TEXT, 4), guidance=torch.tensor([4.0]))
    return lambda model, t: model(timestep=torch.tensor([t]), return_dict=False, **kwargs)[0]


def _ltx2_call(extra=0):
    # diffusers 0.42.1's LTX-2 context parallelism itself fails (diffattn applied or not) with the
    # audio <-> video cross-attentions (its _cp_plan does not split their video RoPE) and with a
    # text mask (its Ulysses attention cannot broadcast LTX-2's [B, 1, S] bias): isolated
    # modalities and no mask run.
    gen = torch.Generator().manual_seed(1)
    f, h, w = 2, 4, 6
    kwargs = dict(hidden_states=torch.randn(1, f * h * w + extra, 8, generator=gen),
                  audio_hidden_states=torch.randn(1, 6, 4, generator=gen),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen),
                  audio_encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen),
                  encoder_attention_mask=None, num_frames=f, height=h, width=w, audio_num_frames=6,
                  isolate_modalities=True)

    def call(model, t):
        coords = model.rope.prepare_video_coords(1, f, h, w, device="cpu")
        if extra:  # appended keyframe tokens, positioned like the first grid tokens (as LTX2ConditionPipeline does)
            coords = torch.cat([coords, coords[:, :, :extra]], dim=2)
        return model(timestep=torch.tensor([1000 * t]), video_coords=coords, return_dict=False, **kwargs)[0]

    return call


def _minimax_call():
    """A text-to-video+audio packed sequence [text | audio | video] laid out by diffusers' own
    MiniMax-H3 layout steps (as tests/test_integration_minimax_h3.py builds it)."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (MiniMaxH3PrepareLayoutStep,
                                                                       MiniMaxH3SetTimestepsStep)

    gen = torch.Generator().manual_seed(1)
    layout = MiniMaxH3PrepareLayoutStep.build_packed_sequence(torch.ones(TEXT, dtype=torch.long), 3, 8, 10, 3,
                                                              (1, 2, 2), 2, 2, 0, ())
    positions, tags, video, audio, text, cond_video, cond_audio = layout  # 4 + 6 + 60 tokens
    kwargs = dict(hidden_states=torch.randn(1, video.numel(), 16, generator=gen),
                  audio_hidden_states=torch.randn(1, audio.numel(), 4, generator=gen),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen), token_tags=tags,
                  position_ids=positions, video_indices=video, audio_indices=audio, text_indices=text)

    def call(model, t):
        steps, indices = MiniMaxH3SetTimestepsStep.build_row_timesteps(video, audio, cond_video, cond_audio, TEXT,
                                                                        t, t, 0.9, 1.0)
        return model(timestep=steps, timestep_indices=indices, return_dict=False, **kwargs)[0]

    return call


def _build(name: str):
    import diffusers

    cls, config = {"qwen": (diffusers.QwenImageTransformer2DModel, QWEN),
                   "flux2": (diffusers.Flux2Transformer2DModel, FLUX2),
                   "ltx2": (diffusers.LTX2VideoTransformer3DModel, LTX2),
                   "minimax": (diffusers.MiniMaxH3Transformer3DModel, MINIMAX)}[name]
    torch.manual_seed(0)
    return cls(**config).eval()


def _scenarios():
    """name -> (model, call, pattern); EXPECTED says what two ranks must equal."""
    from diffattn import SlidingWindow

    window2, window3 = SlidingWindow((3, 3)), SlidingWindow((1, 3, 3))
    return {
        "qwen-t2i": ("qwen", _qwen_call([(4, 6)]), window2),
        "qwen-edit": ("qwen", _qwen_call([(4, 6), (2, 3)]), window2),  # a condition image after the target
        "qwen-padded-text": ("qwen", _qwen_call([(4, 6)], mask=[1, 1, 1, 0]), window2),
        "flux2-t2i": ("flux2", _flux2_call(), window2),
        "flux2-reference": ("flux2", _flux2_call(refs=[(2, 3)]), window2),
        "ltx2-video": ("ltx2", _ltx2_call(), window3),
        "ltx2-keyframes": ("ltx2", _ltx2_call(extra=4), window3),  # tokens after the grid
        "minimax-t2va": ("minimax", _minimax_call(), window3),  # text and audio before the video in one sequence
    }


@torch.no_grad()
def _steps(model, call) -> torch.Tensor:
    return torch.stack([call(model, t) for t in TIMESTEPS])


def worker(rank: int, world: int, port: int, out: str) -> None:
    import logging

    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import diffattn

    # Test-only shim, as in tests/test_context_parallel.py: diffusers places each rank on
    # `rank % torch.accelerator.device_count()`; one "device" lets its real code run on CPU.
    torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffattn").addHandler(handler)
    results = {}
    for name, (family, call, pattern) in _scenarios().items():
        model = _build(family)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        diffattn.apply(model, pattern)
        entry = {"parallel": _steps(model, call)}
        if rank == 0:
            single = _build(family)
            entry["dense"] = _steps(single, call)
            diffattn.apply(single, pattern)
            entry["sparse"] = _steps(single, call)
        results[name] = entry
    results["log"] = messages
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# --- the tests (pytest process) -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(r), str(WORLD), str(port), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for r in range(WORLD)]
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' results, computed once per test session: under pytest-xdist the first worker
    to get here runs the ranks and the others wait for its files."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the xdist workers of this session
    out = base / "cp-families"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").is_file():
            out.mkdir(exist_ok=True)
            _run_ranks(out)
            (out / "done").touch()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# what two ranks must equal: one process running the pattern ("sparse") or diffusers' attention ("dense")
EXPECTED = {"qwen-t2i": "sparse", "qwen-edit": "dense", "qwen-padded-text": "dense", "flux2-t2i": "sparse",
            "flux2-reference": "dense", "ltx2-video": "sparse", "ltx2-keyframes": "dense", "minimax-t2va": "dense"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_two_ranks_equal_one_process(ranks, name):
    expected = EXPECTED[name]
    first, second = ranks[0][name], ranks[1][name]
    torch.testing.assert_close(second["parallel"], first["parallel"], atol=ATOL, rtol=0)
    torch.testing.assert_close(first["parallel"], first[expected], atol=ATOL, rtol=0)
    # not vacuous: in one process the pattern changes the output, so "dense" above is not "sparse"
    assert (first["sparse"] - first["dense"]).abs().max() > 1e-3


def test_the_dense_fallbacks_say_why(ranks):
    log = "\n".join(ranks[0]["log"])
    assert ("dense tokens sit on both sides of the grid (model order: text 4, grid 24, dense 6), which cannot be "
            "reordered under context parallelism" in log)
    assert "LTX-2 tokens after the grid" in log and "under context parallelism" in log
    assert "an attention mask under context parallelism; this call runs dense" in log
    assert "MiniMax-H3's packed sequence is split as one tensor under context parallelism" in log


# --- single-process pieces ------------------------------------------------------------------


NO_PLAN = {
    "WanVACETransformer3DModel": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                      out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1,
                                      vace_layers=[0], vace_in_channels=8),
    "WanAnimateTransformer3DModel": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                         in_channels=None, latent_channels=4, out_channels=4, text_dim=8, freq_dim=8,
                                         ffn_dim=32, num_layers=1, rope_max_seq_len=32, image_dim=12,
                                         motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16,
                                         motion_style_dim=8, motion_dim=4, motion_encoder_dim=8,
                                         face_encoder_hidden_dim=8, face_encoder_num_heads=2,
                                         inject_face_latents_blocks=1, motion_encoder_batch_size=4),
    "SkyReelsV2Transformer3DModel": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                         in_channels=4, out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16,
                                         num_layers=1),
    "HunyuanVideo15Transformer3DModel": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                             num_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16,
                                             text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6)),
    "Kandinsky5Transformer3DModel": dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                         model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=1,
                                         axes_dims=(4, 6, 6)),
    "MotifVideoTransformer3DModel": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=1, num_single_layers=1, mlp_ratio=2.0, text_embed_dim=16,
                                         image_embed_dim=12, rope_axes_dim=(4, 6, 6)),
}


@pytest.mark.parametrize("name", list(NO_PLAN))
def test_transformers_without_a_cp_plan_are_refused_by_name(name):
    import diffusers

    import diffattn
    from diffattn import SlidingWindow
    from diffattn.integration.parallel import enable_ulysses

    cls = getattr(diffusers, name)
    assert getattr(cls, "_cp_plan", None) is None  # diffusers 0.42 has none: update this test when it gets one
    model = cls(**NO_PLAN[name])
    assert diffattn.apply(model, SlidingWindow((1, 3, 3))).replaced
    with pytest.raises(ValueError, match=rf"transformer \({name}\) has no context-parallel plan \(_cp_plan\) in "
                                         "diffusers, so it cannot run under Ulysses"):
        enable_ulysses(model, 2)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
