"""load_pipeline: a saved tiny Wan pipeline loaded from its folder with a preset, family checks,
and the embedded demo pipeline for model=None. No network: only local folders."""

import json
import logging

import numpy as np
import pytest
import torch

import diffattn
from diffattn import Radial, SlidingWindow, TokenLayout
from diffattn.integration.families.wan import WanSparseProcessor
from diffattn.pipelines import (
    EMBEDDED_DEFAULTS,
    GENERATION_KEYS,
    PIPELINE_CLASSES,
    family_of,
    is_embedded,
    load_pipeline,
    save_embedded_wan_pipeline,
)
from diffattn.pipelines import load as load_module
from diffattn.presets import FAMILIES, PresetError, load_preset

PROMPT = "a red fox in the snow"
TINY = dict(height=64, width=64, num_frames=9, num_inference_steps=2)  # token grid (3, 4, 4)
CALL = dict(max_sequence_length=16, output_type="np")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_embedded_wan_pipeline(tmp_path_factory.mktemp("wan") / "tiny-wan")


def sparse_names(pipe):
    return sorted(name for name, proc in pipe.transformer.attn_processors.items() if isinstance(proc, WanSparseProcessor))


def test_load_folder_with_the_radial_preset(folder):
    preset = load_preset("wan-radial")
    pipe, handle = load_pipeline(folder, "wan-radial")
    assert type(pipe).__name__ == "WanPipeline" and not is_embedded(pipe) and family_of(pipe) == "wan"
    assert handle.family == "wan" and handle.pattern == Radial(0.2, sink=True)
    assert handle.schedule == preset.schedule
    names = [f"blocks.{i}.attn1.processor" for i in range(4)]
    assert handle.replaced == {"transformer": names}
    assert sparse_names(pipe) == names  # the cross-attentions (attn2) keep diffusers' processor
    # On the tiny 3x4x4 grid (48 tokens, one 128-token block) Radial is fully dense.
    assert Radial(0.2).attended_fraction(TokenLayout((3, 4, 4))) == 1.0
    diffattn.remove(pipe)
    assert sparse_names(pipe) == []


def test_window_override_runs_sparse(folder):
    dense_pipe, none = load_pipeline(folder)
    assert none is None and sparse_names(dense_pipe) == []
    dense = dense_pipe(PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=5.0, **TINY, **CALL).frames[0]

    preset = load_preset("wan-window").override(pattern="window:1x3x3", schedule={"dense_steps": 0, "dense_layers": 0})
    pipe, handle = load_pipeline(folder, preset)
    assert handle.pattern == SlidingWindow((1, 3, 3)) and handle.schedule == diffattn.Schedule(0, 0, 0)
    assert len(sparse_names(pipe)) == 4
    kwargs = preset.call_kwargs(**TINY)  # checks the window fits the 3x4x4 grid
    sparse = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs, **CALL).frames[0]
    assert np.isfinite(sparse).all() and not np.allclose(sparse, dense, atol=1e-4)
    # The shipped window (9 frames) does not fit the tiny grid: an early, clear error.
    with pytest.raises(PresetError, match="does not fit the token grid 3x4x4"):
        load_preset("wan-window").call_kwargs(**TINY)


def test_preset_as_a_path_and_dtype_and_device(folder, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((load_preset("wan-radial").path).read_text().replace("decay: 0.2", "decay: 0.5"))
    pipe, handle = load_pipeline(folder, str(path), torch_dtype=torch.bfloat16, device="cpu")
    assert handle.pattern == Radial(0.5)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.device.type == "cpu"


def test_family_mismatch_is_caught_before_loading_weights(folder, monkeypatch):
    from diffusers import DiffusionPipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained must not run when the family is wrong")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=r"is a 'wan' pipeline but preset 'flux-window' is for family 'flux'.*"
                                         r"shipped: wan-radial, wan-window"):
        load_pipeline(folder, "flux-window")
    with pytest.raises(ValueError, match=r"is a 'wan' pipeline but family='cogvideox' was asked for"):
        load_pipeline(folder, family="cogvideox")
    with pytest.raises(ValueError, match="family='flux' contradicts preset 'wan-radial'"):
        load_pipeline(folder, "wan-radial", family="flux")
    with pytest.raises(ValueError, match="family must be one of wan, .*got 'wan3'"):
        load_pipeline(folder, family="wan3")


def test_family_of_the_built_pipeline_is_checked_too(folder, monkeypatch):
    """model_index.json says wan; a transformer of another family after loading is still refused."""
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    real = DiffusionPipeline.from_pretrained.__func__

    def swapped(cls, *args, **kwargs):
        pipe = real(cls, *args, **kwargs)
        pipe.transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8,
                                                  num_attention_heads=2, joint_attention_dim=16,
                                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
        return pipe

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(swapped))
    with pytest.raises(ValueError, match="is a 'flux' pipeline but preset 'wan-radial' is for family 'wan'"):
        load_pipeline(folder, "wan-radial")


def test_model_none_gives_the_embedded_pipeline(caplog):
    with caplog.at_level(logging.WARNING, logger="diffattn"):
        pipe, handle = load_pipeline()
    assert handle is None and is_embedded(pipe) and type(pipe).__name__ == "WanPipeline"
    assert "EMBEDDED DEMO pipeline" in caplog.text and "coloured shapes" in caplog.text
    pipe, handle = load_pipeline(None, "wan-radial", torch_dtype=torch.bfloat16)
    assert is_embedded(pipe) and pipe.transformer.dtype == torch.bfloat16
    assert len(handle.replaced["transformer"]) == 4
    pipe, handle = load_pipeline(family="wan")
    assert is_embedded(pipe) and handle is None
    # The embedded pipeline runs with EMBEDDED_DEFAULTS-sized settings and a window that fits them.
    assert EMBEDDED_DEFAULTS.num_frames == 17
    with pytest.raises(TypeError, match="takes no from_pretrained arguments; got \\['revision'\\]"):
        load_pipeline(revision="main")


def test_model_none_for_other_families(monkeypatch):
    with pytest.raises(ValueError, match="embedded demo pipeline, which is a Wan pipeline; for family 'flux'"):
        load_pipeline(family="flux")
    seen = []

    def fake_index(model, hub_kwargs):
        seen.append((model, hub_kwargs))
        raise RuntimeError("stop before the network")

    monkeypatch.setattr(load_module, "_model_index", fake_index)
    with pytest.raises(RuntimeError, match="stop before the network"):
        load_pipeline(None, "flux-window", local_files_only=True)
    assert seen == [("black-forest-labs/FLUX.1-dev", {"local_files_only": True})]  # the preset's default checkpoint


def test_bad_models(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        load_pipeline(tmp_path / "missing", "wan-radial")
    with pytest.raises(ValueError, match="no such folder"):
        load_pipeline("./missing-folder", "wan-radial")
    with pytest.raises(ValueError, match="has no model_index.json"):
        load_pipeline(tmp_path, "wan-radial")
    unet = tmp_path / "unet-pipeline"
    unet.mkdir()
    (unet / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline pipeline without a transformer"):
        load_pipeline(unet)
    other = tmp_path / "other"  # a transformer class diffattn has no adapter for
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({
        "_class_name": "OtherPipeline", "transformer": ["diffusers", "OtherTransformer3DModel"]}))
    with pytest.raises(ValueError, match="no adapter for OtherTransformer3DModel"):
        load_pipeline(other)
    with pytest.raises(TypeError, match="preset must be"):
        load_pipeline(None, 3)
    with pytest.raises(PresetError, match="unknown preset 'wan-topk'"):
        load_pipeline(None, "wan-topk")
    with pytest.raises(TypeError, match="torch_dtype must be"):
        load_pipeline(torch_dtype="bf16")


def test_pipeline_classes_and_generation_keys():
    import inspect
    import typing

    import diffusers

    assert set(PIPELINE_CLASSES) == set(GENERATION_KEYS) == set(FAMILIES)
    for family, classes in PIPELINE_CLASSES.items():
        for name in classes:
            cls = getattr(diffusers, name)
            assert "num_inference_steps" in inspect.signature(cls.__call__).parameters, name
            # the transformer class the pipeline is built with maps to this family
            annotation = inspect.signature(cls.__init__).parameters["transformer"].annotation
            transformers = [a.__name__ for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type)
                            and a is not type(None)]
            assert [load_module._family_of_class(t) for t in transformers] == [family], (family, name, transformers)
        first = inspect.signature(getattr(diffusers, classes[0]).__call__).parameters
        assert set(GENERATION_KEYS[family]) <= set(first)
