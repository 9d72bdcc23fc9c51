"""Public API: diffattn.attention's validation and impl choice, TokenLayout, parse_pattern, CLI."""

import logging

import pytest
import torch

import diffattn
from diffattn import Dense, Radial, SlidingWindow, TokenLayout, choose_impl, parse_pattern
from diffattn.cli import main as cli_main

LAYOUT = TokenLayout((2, 4, 4), text_len=3)  # 35 tokens


def qkv(s=LAYOUT.seq_len, dtype=torch.float32, d=16, b=1, h=2):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, s, h, d, generator=gen).to(dtype) for _ in range(3)]


def call(q, k, v, pattern=None, layout=LAYOUT, **kwargs):
    kwargs.setdefault("impl", "reference")
    return diffattn.attention(q, k, v, pattern or SlidingWindow(2), layout=layout, **kwargs)


# --- attention(): inputs ---------------------------------------------------------------


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0], ids=["None", "list", "float"])
def test_non_tensor_inputs(which, bad):
    args = qkv()
    args[which] = bad
    with pytest.raises(TypeError, match="qkv"[which] + " must be a torch.Tensor"):
        call(*args)


@pytest.mark.parametrize("shape", [(35, 2, 16), (1, 1, 35, 2, 16), (35, 16)])
def test_wrong_rank(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        call(torch.randn(shape), k, v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype_is_named(dtype):
    q, k, v = qkv()
    bad = torch.zeros(q.shape, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).replace(".", r"\.")):
        call(bad, bad, bad)
    with pytest.raises(TypeError, match=str(dtype).replace(".", r"\.")):
        call(q, k, bad)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="one dtype"):
        call(q, k.half(), v)
    with pytest.raises(TypeError, match="bfloat16"):
        call(q, k, v.bfloat16())


def test_mismatched_head_dims():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="D=16.*D=8|head dim"):
        call(q, k[..., :8], v)
    with pytest.raises(ValueError, match="head dim"):
        call(q, k, v[..., :8])


def test_mismatched_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same"):
        call(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="same"):
        call(q, torch.cat([k, k]), v)


def test_sequence_length_must_match_layout():
    q, k, v = qkv(s=40)
    with pytest.raises(ValueError) as info:
        call(q, k, v)
    message = str(info.value)
    assert "40" in message and "35" in message


def test_head_dim_limit():
    q, k, v = qkv(d=264, h=1)
    with pytest.raises(ValueError, match="264.*256"):
        call(q, k, v)
    out = call(*qkv(d=256, h=1))  # 256 itself is fine
    assert out.shape[-1] == 256


def test_pattern_and_layout_types():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="pattern"):
        diffattn.attention(q, k, v, "window:3", layout=LAYOUT)
    with pytest.raises(TypeError, match="layout"):
        diffattn.attention(q, k, v, Dense(), layout=(2, 4, 4))
    with pytest.raises(TypeError, match="return_lse"):
        call(q, k, v, return_lse=1)


# --- attention(): implementation choice ------------------------------------------------


def test_unknown_impl_lists_allowed():
    q, k, v = qkv()
    with pytest.raises(ValueError) as info:
        call(q, k, v, impl="cuda")
    message = str(info.value)
    assert "'cuda'" in message
    for name in ("auto", "triton", "reference"):
        assert name in message


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        call(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="CUDA"):
        choose_impl("triton", torch.device("cpu"))


def test_triton_on_cpu_with_interpreter_is_chosen(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_impl("triton", "cpu")[0] == "triton"


def test_auto_on_cpu_picks_reference(monkeypatch, caplog):
    for env in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", env)
        impl, why = choose_impl("auto", torch.device("cpu"))
        assert impl == "reference" and why
    assert choose_impl("reference", "cpu")[0] == "reference"
    q, k, v = qkv()
    with caplog.at_level(logging.DEBUG, logger="diffattn"):
        out = diffattn.attention(q, k, v, SlidingWindow(2), layout=LAYOUT)
    assert any("reference" in r.getMessage() for r in caplog.records)
    ref = call(q, k, v)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [Dense(), SlidingWindow((2, 3, 3)), Radial(0.2, block=16)], ids=["dense", "window", "radial"])
def test_return_lse_shape_and_dtype(dtype, pattern):
    q, k, v = qkv(dtype=dtype, b=2, h=3)
    out = call(q, k, v, pattern)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == q.shape
    out2, lse = call(q, k, v, pattern, return_lse=True)
    assert torch.equal(out, out2)
    assert lse.shape == (2, LAYOUT.seq_len, 3) and lse.dtype == torch.float32
    assert torch.isfinite(lse).all()


def test_dense_reference_equals_sdpa():
    q, k, v = qkv(b=2, h=3)
    out = call(q, k, v, Dense())
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


# --- TokenLayout ------------------------------------------------------------------------


def test_token_layout_properties():
    layout = TokenLayout((21, 30, 52))
    assert layout.seq_len == 32760 and layout.num_visual == 32760 and layout.grid3 == (21, 30, 52)
    image = TokenLayout((64, 64), text_len=512)
    assert image.grid3 == (1, 64, 64) and image.visual_start == 512 and image.text_start == 0
    last = TokenLayout((4, 5), text_len=7, text_first=False)
    assert last.visual_start == 0 and last.text_start == 20 and last.seq_len == 27
    assert TokenLayout([2, 3, 4]).grid == (2, 3, 4)
    assert TokenLayout((2, 3)) == TokenLayout([2, 3])
    assert "text_len=7 last" in str(last)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(grid=5), ValueError, "grid"),
        (dict(grid=(5,)), ValueError, "grid"),
        (dict(grid=(1, 2, 3, 4)), ValueError, "grid"),
        (dict(grid=(4, 0)), ValueError, r"grid\[1\]"),
        (dict(grid=(4, -2, 3)), ValueError, r"grid\[1\]"),
        (dict(grid=(4, 2.0)), ValueError, r"grid\[1\]"),
        (dict(grid=(True, 4)), ValueError, r"grid\[0\]"),
        (dict(grid="4x4"), ValueError, "grid"),
        (dict(grid=(4, 4), text_len=-1), ValueError, "text_len"),
        (dict(grid=(4, 4), text_len=1.5), ValueError, "text_len"),
        (dict(grid=(4, 4), text_len=True), ValueError, "text_len"),
        (dict(grid=(4, 4), text_first=1), TypeError, "text_first"),
        (dict(grid=(4, 4), text_first="yes"), TypeError, "text_first"),
    ],
)
def test_token_layout_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TokenLayout(**kwargs)


# --- parse_pattern ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, want",
    [
        ("dense", Dense()),
        (" Dense ", Dense()),
        ("window:3x9x9", SlidingWindow((3, 9, 9))),
        ("window:5", SlidingWindow(5)),
        ("window:*x8x8,stride=1x2x2", SlidingWindow((None, 8, 8), stride=(1, 2, 2))),
        ("window:none x 8 x 8".replace(" ", ""), SlidingWindow((None, 8, 8))),
        ("window:3x5x5,stride=1x2x2,dilation=1x1x2", SlidingWindow((3, 5, 5), stride=(1, 2, 2), dilation=(1, 1, 2))),
        ("window:window=4x4", SlidingWindow((4, 4))),
        ("radial:0.2", Radial(0.2)),
        ("radial:decay=0.95,sink=false", Radial(0.95, sink=False)),
        ("radial:0.5,block=64,sink=on", Radial(0.5, block=64)),
    ],
)
def test_parse_pattern(spec, want):
    got = parse_pattern(spec)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    "pattern",
    [
        Dense(),
        SlidingWindow((3, 9, 9)),
        SlidingWindow((None, 8, 8), stride=(1, 2, 2), dilation=(1, 1, 2)),
        SlidingWindow(7, stride=2, dilation=3),
        Radial(0.2),
        Radial(0.95, sink=False, block=64),
    ],
)
def test_parse_pattern_round_trip(pattern):
    """A spec written from a pattern's fields parses back to an equal pattern."""

    def sizes(value):
        value = value if isinstance(value, tuple) else (value,)
        return "x".join("*" if v is None else str(v) for v in value)

    if isinstance(pattern, Dense):
        spec = "dense"
    elif isinstance(pattern, SlidingWindow):
        spec = f"window:{sizes(pattern.window)},stride={sizes(pattern.stride)},dilation={sizes(pattern.dilation)}"
    else:
        spec = f"radial:{pattern.decay},sink={str(pattern.sink).lower()},block={pattern.block}"
    assert parse_pattern(spec) == pattern


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "non-empty"),
        (None, "non-empty"),
        ("sparse:3", "unknown pattern 'sparse'.*dense.*window.*radial"),
        ("dense:3", "dense"),
        ("window", "window size"),
        ("window:3x?x9", "sizes"),
        ("window:3,size=4", "no option 'size'"),
        ("window:3,5", "at most one value"),
        ("window:0", r"window\[0\]"),
        ("window:3,stride=5", None),  # valid pattern; invalid only on a grid (stride > window)
        ("radial", "decay"),
        ("radial:fast", "decay"),
        ("radial:0.2,sink=maybe", "sink"),
        ("radial:0.2,width=3", "no option 'width'"),
        ("radial:-1", "decay"),
        ("radial:0.2,block=48", "block"),
    ],
)
def test_parse_pattern_errors(spec, match):
    if match is None:
        pattern = parse_pattern(spec)
        with pytest.raises(ValueError, match="stride"):
            pattern.validate((8, 8))
        return
    with pytest.raises(ValueError, match=match):
        parse_pattern(spec)


# --- CLI ----------------------------------------------------------------------------------


def test_cli_show_writes_png(tmp_path, capsys):
    out = tmp_path / "l.png"
    assert cli_main(["show", "window:3x5x5", "--grid", "4x8x8", "--block", "16x16", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "SlidingWindow" in printed and "BlockLayout" in printed and str(out) in printed


def test_cli_show_text_and_radial(capsys):
    assert cli_main(["show", "radial:0.2", "--grid", "6x16x16", "--text-len", "10"]) == 0
    printed = capsys.readouterr().out
    assert "Radial" in printed and "text_len=10" in printed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["show", "sparse:3", "--grid", "4x8x8"], ["unknown pattern"]),
        (["show", "window:9x5x5", "--grid", "4x8x8", "--block", "16x16"], ["window[0]=9"]),
        (["show", "window:3x5x5", "--grid", "4x8x8", "--block", "24x16"], ["block_q"]),
        (["show", "radial:0.2", "--grid", "4x8x8", "--text-len", "-3"], ["text_len"]),
    ],
)
def test_cli_user_errors_are_one_line(argv, words, capsys):
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert err.startswith("diffattn show: error:")
    for word in words:
        assert word in err


@pytest.mark.parametrize("argv", [["show", "dense", "--grid", "4x8x8x2"], ["show", "dense", "--grid", "axb"], ["show", "dense"], ["nope"]])
def test_cli_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_cli_env(capsys):
    assert cli_main(["env"]) == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "impl_auto" in printed
    assert cli_main(["env", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["diffattn"] == diffattn.__version__
    assert info["impl_auto"].startswith("triton" if torch.cuda.is_available() else "reference")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_bench_without_gpu(capsys):
    assert cli_main(["bench", "kernels"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err


def test_cli_runs_as_module():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "diffattn.cli", "show", "window:3x3", "--grid", "8x8", "--block", "16x16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "++..\n+++.\n.+++\n..++" in proc.stdout


def test_no_pattern_field_shadows_a_pattern_method():
    """A dataclass field named like a Pattern method replaces the method on instances
    (``BlockTopK(density=0.25).density(layout)`` once raised 'float' object is not callable)."""
    import dataclasses

    import diffattn.patterns as patterns

    base = {name for name in dir(patterns.Pattern) if not name.startswith("_")}
    classes = [c for c in vars(patterns).values()
               if isinstance(c, type) and issubclass(c, patterns.Pattern) and dataclasses.is_dataclass(c)]
    assert {"BlockTopK", "Piecewise", "Radial", "SlidingWindow", "Dense"} <= {c.__name__ for c in classes}
    for cls in classes:
        clash = {f.name for f in dataclasses.fields(cls)} & base
        assert not clash, f"{cls.__name__} fields {clash} shadow Pattern methods"
    layout = diffattn.TokenLayout((2, 4, 8))
    assert diffattn.BlockTopK(density=0.25).attended_fraction(layout) is None
    assert diffattn.Piecewise(0.25).attended_fraction(layout) is None
    assert diffattn.Dense().attended_fraction(layout) == 1.0
