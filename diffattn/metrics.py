"""Quality measures: output level (PSNR, SSIM of frames) and attention level (relative L1, cosine).

Frames are arrays ``[F, H, W, 3]`` (or one image ``[H, W, 3]``): floats in [0, 1] or uint8
(divided by 255). Both arguments must have the same shape.

- :func:`psnr`: over the whole video (the mean squared error of every pixel of every frame),
  in dB, ``10 log10(1 / MSE)`` on [0, 1] data. Identical frames give ``math.inf``.
- :func:`ssim`: scikit-image's ``structural_similarity`` per frame (``channel_axis=-1``,
  ``data_range=1``, its default 7x7 uniform window, smaller for frames under 7 pixels),
  averaged over frames. Identical frames give 1.0.
- :func:`relative_l1`: ``||x - ref||_1 / ||ref||_1``, in float64.
- :func:`cosine`: cosine similarity of the flattened tensors, in float64.

>>> import numpy as np
>>> a = np.zeros((2, 8, 8, 3)); b = a.copy(); b[0, 0, 0, 0] = 0.5
>>> round(psnr(b, a), 2), psnr(a, a), ssim(a, a)
(31.86, inf, 1.0)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["attention_errors", "cosine", "frames_as_float", "psnr", "relative_l1", "ssim"]


def frames_as_float(frames) -> np.ndarray:
    """``[F, H, W, C]`` float64 in [0, 1] from floats in [0, 1] or uint8 frames (``[H, W, C]`` = one frame)."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().float().numpy()
    array = np.asarray(frames)
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    else:
        raise TypeError(f"frames must be float (in [0, 1]) or uint8, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"frames must be [F, H, W, C] or [H, W, C], got shape {array.shape}")
    return array


def _pair(x, ref) -> tuple[np.ndarray, np.ndarray]:
    a, b = frames_as_float(x), frames_as_float(ref)
    if a.shape != b.shape:
        raise ValueError(f"frames to compare must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(x, ref) -> float:
    """Peak signal-to-noise ratio of ``x`` against ``ref`` in dB (data range 1); ``inf`` when identical."""
    a, b = _pair(x, ref)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(1.0 / mse)


def ssim(x, ref) -> float:
    """Mean over frames of scikit-image's SSIM (``channel_axis=-1``, ``data_range=1``)."""
    from skimage.metrics import structural_similarity

    a, b = _pair(x, ref)
    side = min(a.shape[1], a.shape[2])
    if side < 3:
        raise ValueError(f"SSIM needs frames of at least 3x3 pixels, got {a.shape[2]}x{a.shape[1]}")
    win = min(7, side if side % 2 else side - 1)
    values = [1.0 if np.array_equal(fa, fb) else
              structural_similarity(fa, fb, channel_axis=-1, data_range=1.0, win_size=win) for fa, fb in zip(a, b)]
    return float(np.mean(values))


def relative_l1(x, ref) -> float:
    """``||x - ref||_1 / ||ref||_1`` (torch tensors or arrays), computed in float64."""
    a, b = _as_float64(x), _as_float64(ref)
    if a.shape != b.shape:
        raise ValueError(f"tensors to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    denominator = float(np.abs(b).sum()) if isinstance(b, np.ndarray) else float(b.abs().sum())
    numerator = float(np.abs(a - b).sum()) if isinstance(a, np.ndarray) else float((a - b).abs().sum())
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def cosine(x, ref) -> float:
    """Cosine similarity of the flattened ``x`` and ``ref``, in float64 (1.0 for two zero tensors)."""
    a, b = _as_float64(x), _as_float64(ref)
    if a.shape != b.shape:
        raise ValueError(f"tensors to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(a, np.ndarray):
        dot, na, nb = float((a * b).sum()), float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    else:
        dot, na, nb = float((a * b).sum()), float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / (na * nb)


def _as_float64(x):
    if hasattr(x, "detach"):
        return x.detach().double()
    return np.asarray(x, dtype=np.float64)


def attention_errors(out, ref) -> dict:
    """``{"rel_l1": ..., "cosine": ...}`` of an attention output against the dense one."""
    return {"rel_l1": relative_l1(out, ref), "cosine": cosine(out, ref)}
