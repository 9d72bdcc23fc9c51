"""diffattn under diffusers' Ulysses context parallelism: two Gloo ranks on CPU running diffusers'
own context-parallel code (``enable_parallelism``), compared with one process.

The two ranks are subprocesses running this file (``python tests/test_context_parallel.py
worker RANK WORLD PORT OUT``); each builds the same tiny random-weight Wan and Flux transformers
(fixed seeds), runs every scenario and saves its outputs; rank 0 also runs each scenario in a
single process (no parallelism) as the reference. The tests below compare the saved outputs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffattn import TokenLayout
from diffattn.integration.parallel import (
    gathered_order,
    split_sizes,
    ulysses_bytes_per_layer,
    ulysses_shard,
)

WORLD = 2
ATOL = 1e-4
WAN = dict(patch_size=(1, 2, 2), attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8, freq_dim=8,
           ffn_dim=32, num_layers=2, rope_max_seq_len=32)
FLUX = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
TIMESTEPS = (900, 700, 500, 300)  # one generation of four steps (the step index counts timestep changes)


# --- the worker (runs in the two subprocesses) -------------------------------------------


def _patterns():
    from diffattn import BlockTopK, Radial, SlidingWindow, StepCache

    return {
        "window": (SlidingWindow((3, 3, 3)), SlidingWindow((3, 3)), {}),
        "radial": (Radial(0.2, block=16), None, {}),  # Radial decays across frames: video only
        "topk": (BlockTopK(density=0.5, block=16), BlockTopK(density=0.5, block=16), {}),
        # a dense warm-up step, then the cache: refreshed at the end of the warm-up and at step 3,
        # reused at steps 1 and 2
        "cache": (SlidingWindow((1, 3, 3)), SlidingWindow((3, 3)), dict(dense_steps=1, cache=StepCache(refresh_every=3))),
    }


def _wan(heads: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=heads, **WAN).eval()


def _flux(heads: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(num_attention_heads=heads, **FLUX).eval()


def _wan_inputs(frames: int, height: int, width: int):
    gen = torch.Generator().manual_seed(1)
    x, enc = torch.randn(1, 4, frames, height, width, generator=gen), torch.randn(1, 5, 8, generator=gen)
    return lambda model, t: model(x, torch.tensor([t]), enc, return_dict=False)[0]  # as pipelines call it


def _flux_inputs(rows: int, cols: int, text: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1], ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    kwargs = dict(hidden_states=torch.randn(1, rows * cols, 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, text, 32, generator=gen),
                  pooled_projections=torch.randn(1, 32, generator=gen), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(text, 3))
    return lambda model, t: model(timestep=torch.tensor([t / 1000]), return_dict=False, **kwargs)[0]


@torch.no_grad()
def _steps(model, call) -> torch.Tensor:
    return torch.stack([call(model, t) for t in TIMESTEPS])


def _scenarios():
    """name -> (model builder, inputs, pattern, apply kwargs, ContextParallelConfig kwargs)."""
    from diffattn import StepCache

    scenarios = {}
    for name, (wan_pattern, flux_pattern, kwargs) in _patterns().items():
        # Wan: 3 x 4 x 5 = 60 tokens (Radial: 6 x 4 x 8, enough frames to decay); Flux: [4 text;
        # 4 x 6 image], text and image split separately
        wan_inputs = _wan_inputs(6, 8, 16) if name == "radial" else _wan_inputs(3, 8, 10)
        scenarios[f"wan-{name}"] = (lambda: _wan(2), wan_inputs, wan_pattern, kwargs, {})
        if flux_pattern is not None:
            scenarios[f"flux-{name}"] = (lambda: _flux(2), _flux_inputs(4, 6, 4), flux_pattern, kwargs, {})
    # ulysses_anything: 3 heads over 2 ranks (rank 1 holds global head 2). diffusers' own final
    # all-gather of uneven token counts needs NCCL (Gloo gathers equal sizes only), so uneven
    # token splits are covered at the attention level (_uneven_tokens) instead.
    window, flux_window, _ = _patterns()["window"]
    anything = dict(ulysses_anything=True)
    scenarios["wan-heads3"] = (lambda: _wan(3), _wan_inputs(3, 8, 10), window, {}, anything)
    scenarios["flux-heads3"] = (lambda: _flux(3), _flux_inputs(4, 6, 4), flux_window, {}, anything)
    # the cache with per-head refreshes by the cosine gate (each rank gates its own heads)
    gated = dict(dense_steps=1, cache=StepCache(refresh_every=3, cosine_gate=0.999))  # flags at step 1, refreshes heads at 2
    scenarios["wan-gated"] = (lambda: _wan(2), _wan_inputs(3, 8, 10), window, gated, {})
    return scenarios


def _run_parallel(build, call, pattern, kwargs, cp_kwargs, *, apply_first: bool):
    import diffattn
    from diffusers import ContextParallelConfig

    from diffattn.integration.parallel import enable_ulysses

    model = build()
    if apply_first:  # enable_ulysses moves diffattn's hook in front of diffusers' input split
        handle = diffattn.apply(model, pattern, **kwargs)
        info = enable_ulysses(model, WORLD, anything=bool(cp_kwargs.get("ulysses_anything")))
        assert info.world_size == WORLD
    else:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD, **cp_kwargs))
        handle = diffattn.apply(model, pattern, **kwargs)
    out = _steps(model, call)
    state = handle.states["transformer"]
    cached_heads = sorted({entry.heads for entry in state.cache.values()})
    return {"parallel": out, "cached_heads": cached_heads, "head_refreshes": state.head_refreshes}


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return ""


def _refusals() -> dict:
    """Ring attention, and diffattn applied before a direct enable_parallelism, fail clearly."""
    import diffattn
    from diffattn import SlidingWindow
    from diffusers import ContextParallelConfig

    call = _flux_inputs(4, 6, 4)
    ring = _flux(2)
    ring.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD))
    diffattn.apply(ring, SlidingWindow((3, 3)))
    late = _flux(2)
    diffattn.apply(late, SlidingWindow((3, 3)))
    late.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    with torch.no_grad():
        return {"ring": _error_of(lambda: call(ring, 900)), "order": _error_of(lambda: call(late, 900))}


def _uneven_tokens(rank: int, world: int) -> dict:
    """SparseAttentionCore.attend under ulysses_anything with token counts that do not divide by
    the world size, against one process: ``{name: (parallel, single, dense)}`` (this rank's
    tokens, three steps; step 0 is dense)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from diffattn import BlockTopK, SlidingWindow, StepCache
    from diffattn.integration import GenerationState, Schedule, SparseAttentionCore

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=world, ulysses_anything=True))
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    config.setup(rank, world, torch.device("cpu"), mesh=mesh)
    cases = {
        "flux-like": (TokenLayout((3, 5), text_len=5), SlidingWindow((3, 3)), None),
        "wan-like": (TokenLayout((3, 3, 5)), SlidingWindow((3, 3, 3)), None),
        "wan-like-topk": (TokenLayout((3, 3, 5)), BlockTopK(density=0.5, block=16), None),
        "flux-like-cache": (TokenLayout((3, 5), text_len=5), SlidingWindow((3, 3)), StepCache(refresh_every=2)),
    }
    results = {}
    for name, (layout, pattern, cache) in cases.items():
        states = [GenerationState(layout=layout), GenerationState(layout=layout)]
        schedule = Schedule(dense_steps=1)
        parallel, single = (SparseAttentionCore(pattern, schedule, 0, state, "reference", cache) for state in states)
        gen = torch.Generator().manual_seed(2)
        outs = ([], [], [])
        for step in range(3):
            q, k, v = (torch.randn(1, layout.seq_len, 3, 16, generator=gen) for _ in range(3))
            segments = [(layout.text_start, layout.text_len), (layout.visual_start, layout.num_visual)]
            mine = torch.cat([torch.arange(start, start + n).tensor_split(world)[rank] for start, n in segments if n])
            for state in states:
                state.step = step
            outs[0].append(parallel.attend(q[:, mine], k[:, mine], v[:, mine], parallel_config=config))
            outs[1].append(single.attend(q, k, v)[:, mine])
            dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
            outs[2].append(dense.transpose(1, 2)[:, mine])
        results[name] = tuple(torch.stack(o) for o in outs)
    return results


def _pipeline(apply_first: bool) -> dict:
    """The embedded tiny WanPipeline (CFG, scheduler steps, diffattn applied to the pipeline) with
    a window and the step cache: frames from two ranks and, on rank 0, from one process."""
    import diffattn
    from diffattn import SlidingWindow, StepCache
    from diffattn.integration.parallel import enable_ulysses
    from diffattn.pipelines import build_embedded_wan_pipeline

    settings = dict(height=64, width=96, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                    max_sequence_length=16, output_type="np")
    kwargs = dict(dense_steps=1, cache=StepCache(refresh_every=2))

    def frames(pipe):
        return torch.from_numpy(pipe("a fox", generator=torch.Generator().manual_seed(0), **settings).frames[0])

    pipe = build_embedded_wan_pipeline(seed=0)
    result = {}
    if torch.distributed.get_rank() == 0:
        result["dense"] = frames(pipe)
        diffattn.apply(pipe, SlidingWindow((1, 3, 3)), **kwargs)
        result["single"] = frames(pipe)
        diffattn.remove(pipe)
    if apply_first:
        diffattn.apply(pipe, SlidingWindow((1, 3, 3)), **kwargs)
        enable_ulysses(pipe, WORLD)
    else:
        enable_ulysses(pipe, WORLD)
        diffattn.apply(pipe, SlidingWindow((1, 3, 3)), **kwargs)
    result["parallel"] = frames(pipe)
    diffattn.remove(pipe)  # diffusers' processors come back with the parallel config
    result["removed"] = frames(pipe)
    return result


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import diffattn

    # Test-only shim (allowed for this test, in the worker processes only): diffusers' context
    # parallelism places each rank on `rank % torch.accelerator.device_count()`, which is 0 on a
    # machine without an accelerator. One "device" lets its real code run on CPU over Gloo.
    torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for index, (name, (build, call, pattern, kwargs, cp_kwargs)) in enumerate(_scenarios().items()):
        entry = _run_parallel(build, call, pattern, kwargs, cp_kwargs, apply_first=index % 2 == 1)
        if rank == 0:
            single = build()
            entry["dense"] = _steps(single, call)
            diffattn.apply(single, pattern, **kwargs)
            entry["single"] = _steps(single, call)
        results[name] = entry
    results["pipeline"] = _pipeline(apply_first=True)
    results["errors"] = _refusals()
    results["uneven"] = _uneven_tokens(rank, world)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    _cli(rank, Path(out))  # last: the command ends the process group


CLI_ARGS = ["generate", "--method", "window:1x3x3", "--steps", "3", "--size", "64x64", "--frames", "5", "--seed", "3",
            "--no-progress"]


def _cli(rank: int, out: Path) -> None:
    """``diffattn generate --ulysses 2`` on both ranks (each writes to its own folder: only rank 0
    may write), then, on rank 0, the same command in one process."""
    from diffattn.cli import main

    assert main([*CLI_ARGS, "--ulysses", str(WORLD), "--out", str(out / f"cli-rank{rank}" / "fox.png")]) == 0
    if rank == 0:
        assert main([*CLI_ARGS, "--out", str(out / "cli-single" / "fox.png")]) == 0


# --- the tests (pytest process) -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(r), str(WORLD), str(port), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for r in range(WORLD)]
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out


@pytest.fixture(scope="module")
def ranks(run):
    return run[0]


SCENARIOS = ["wan-window", "flux-window", "wan-radial", "wan-topk", "flux-topk", "wan-cache", "flux-cache",
             "wan-heads3", "flux-heads3"]


def test_cli_generate_ulysses_writes_once_and_equals_one_process(run):
    import json

    import numpy as np
    from PIL import Image

    out = run[1]
    assert not (out / "cli-rank1").exists() or not any((out / "cli-rank1").iterdir())  # rank 1 writes nothing
    parallel, single = (out / "cli-rank0", out / "cli-single")
    record = json.loads((parallel / "fox.json").read_text())
    assert record["parallel"]["ulysses"] == WORLD and record["parallel"]["world_size"] == WORLD
    assert record["parallel"]["all_to_all_per_layer"]["per_rank_sent_bytes"] > 0
    assert json.loads((single / "fox.json").read_text())["parallel"] is None
    a, b = (np.asarray(Image.open(folder / "fox.png"), dtype=np.int16) for folder in (parallel, single))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # equal frames (up to 8-bit rounding)


@pytest.mark.parametrize("name", SCENARIOS + ["wan-gated"])
def test_two_ranks_equal_one_process(ranks, name):
    first, second = ranks[0][name], ranks[1][name]
    torch.testing.assert_close(first["parallel"], first["single"], atol=ATOL, rtol=0)
    torch.testing.assert_close(second["parallel"], first["parallel"], atol=ATOL, rtol=0)
    if name in SCENARIOS:  # not vacuous: the sparse pattern (or the reused cache) changes the output
        assert (first["single"] - first["dense"]).abs().max() > 1e-3


def test_wan_pipeline_with_cfg_and_cache(ranks):
    first, second = ranks[0]["pipeline"], ranks[1]["pipeline"]
    torch.testing.assert_close(first["parallel"], first["single"], atol=ATOL, rtol=0)
    torch.testing.assert_close(second["parallel"], first["parallel"], atol=ATOL, rtol=0)
    assert (first["single"] - first["dense"]).abs().max() > 1e-3
    for rank in ranks:  # after diffattn.remove: diffusers' dense Ulysses attention
        torch.testing.assert_close(rank["pipeline"]["removed"], first["dense"], atol=ATOL, rtol=0)


def test_each_rank_caches_its_own_heads(ranks):
    assert [rank["wan-gated"]["cached_heads"] for rank in ranks] == [[(0, 1)], [(1, 2)]]
    assert all(rank["wan-gated"]["head_refreshes"] > 0 for rank in ranks)  # the gate refreshed single heads
    assert [rank["wan-cache"]["cached_heads"] for rank in ranks] == [[(0, 1)], [(1, 2)]]


@pytest.mark.parametrize("name", ["flux-like", "wan-like", "wan-like-topk", "flux-like-cache"])
def test_uneven_token_split(ranks, name):
    for rank in ranks:  # 20 Flux-like tokens: rank 0 holds 3 text + 8 image, rank 1 2 + 7
        parallel, single, dense = rank["uneven"][name]
        torch.testing.assert_close(parallel, single, atol=ATOL, rtol=0)
        assert (single[1:] - dense[1:]).abs().max() > 1e-3


def test_ring_attention_is_refused_with_the_supported_mode(ranks):
    error = ranks[0]["errors"]["ring"]
    assert error.startswith("NotImplementedError") and "Ulysses" in error and "ring_degree=2" in error


def test_apply_before_enable_parallelism_is_a_clear_error(ranks):
    error = ranks[0]["errors"]["order"]
    assert error.startswith("RuntimeError") and "enable_parallelism" in error and "enable_ulysses" in error


# --- single-process pieces ------------------------------------------------------------------


def test_split_sizes_follow_diffusers():
    assert split_sizes(8, 2, False) == [4, 4]
    assert split_sizes(9, 4, True) == [len(c) for c in torch.arange(9).tensor_split(4)]
    with pytest.raises(ValueError, match="ulysses_anything"):
        split_sizes(9, 2, False)


@pytest.mark.parametrize("text,grid,world,uneven", [(4, (4, 6), 2, False), (5, (3, 3), 2, True), (7, (2, 5), 3, True)])
def test_gathered_order_undoes_the_per_segment_split(text, grid, world, uneven):
    layout = TokenLayout(grid, text_len=text)
    tokens = torch.arange(layout.seq_len)
    txt, img = tokens[:text], tokens[text:]
    split = (lambda t: t.tensor_split(world)) if uneven else (lambda t: t.chunk(world))
    gathered = torch.cat([torch.cat([a, b]) for a, b in zip(split(txt), split(img))])  # [t_r; i_r] per rank
    layout_of_gathered, gathered_of_layout = gathered_order(layout, world, uneven)
    assert torch.equal(gathered, layout_of_gathered)
    assert torch.equal(gathered[gathered_of_layout], tokens)


def test_visual_only_layout_needs_no_reordering():
    assert gathered_order(TokenLayout((3, 4, 5)), 2) is None
    assert gathered_order(TokenLayout((3, 4, 5), text_len=0), 4, True) is None


def test_ring_config_is_refused_without_running():
    from diffusers import ContextParallelConfig

    q = torch.zeros(1, 12, 2, 8)
    with pytest.raises(NotImplementedError, match="Ulysses"):
        ulysses_shard(ContextParallelConfig(ring_degree=2), TokenLayout((4, 6)), q)
    assert ulysses_shard(None, TokenLayout((4, 6)), q) is None


def test_bytes_per_layer():
    t = ulysses_bytes_per_layer(seq_len=32760, heads=40, head_dim=128, degree=4)
    assert t.tensor_bytes == 32760 * 40 * 128 * 2
    assert t.per_rank_sent == 4 * t.tensor_bytes * 3 // 16 and t.total == 4 * t.per_rank_sent
    assert ulysses_bytes_per_layer(seq_len=10, heads=2, head_dim=8, degree=1).total == 0
    with pytest.raises(ValueError, match="degree"):
        ulysses_bytes_per_layer(seq_len=10, heads=2, head_dim=8, degree=0)


def test_enable_ulysses_checks_its_arguments(monkeypatch):
    from diffusers import WanTransformer3DModel

    from diffattn.integration.parallel import enable_ulysses

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=3, **WAN)
    assert enable_ulysses(model, 1).world_size == 1
    with pytest.raises(ValueError, match="degree"):
        enable_ulysses(model, 0)
    with pytest.raises(ValueError, match="3 attention heads"):
        enable_ulysses(model, 2)
    with pytest.raises(ValueError, match="cannot pad"):
        enable_ulysses(model, 5, anything=True)  # 2 padding heads, 1 head per rank
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        enable_ulysses(model, 3)


def test_docstring_examples():
    import doctest

    import diffattn.integration.parallel as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
