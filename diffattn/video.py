"""Writing generated frames as MP4, GIF and PNG contact sheets (and reading videos back).

Frames may be given as

- a list of PIL images (``pipe(..., output_type="pil").frames[0]``),
- an array ``[F, H, W, 3]`` (or ``[F, H, W, 1]`` / ``[F, H, W]`` grey): floats in [0, 1]
  (``pipe(..., output_type="np").frames[0]``) or integers in [0, 255] (uint8),
- a list of such ``[H, W, 3]`` arrays, or a torch tensor shaped like the array.

>>> import numpy as np
>>> to_uint8_frames(np.full((2, 4, 6, 3), 0.5)).shape
(2, 4, 6, 3)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VIDEO_EXTENSIONS", "read_video", "to_uint8_frames", "write_png_grid", "write_video"]

#: File name endings :func:`write_video` and :func:`read_video` accept.
VIDEO_EXTENSIONS = (".mp4", ".gif")

# Float frames may overshoot [0, 1] by rounding; values further out mean the caller passed
# [-1, 1] or [0, 255] floats, which would be silently clipped into a wrong picture.
_FLOAT_TOLERANCE = 0.01


def _frame_to_array(frame: Any, index: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if hasattr(frame, "detach"):  # a torch tensor
        frame = frame.detach().cpu().numpy()
    if isinstance(frame, np.ndarray):
        return frame
    raise TypeError(f"frames[{index}] must be a PIL image or an array [H, W, 3], got {type(frame).__name__}")


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Frames (see the module docstring) as one uint8 array ``[F, H, W, 3]``.

    Floats must lie in [0, 1] (within 0.01; then clipped) and be finite; integers in [0, 255].
    """
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().cpu().float().numpy() if frames.is_floating_point() else frames.detach().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is empty: need at least one frame")
        arrays = [_frame_to_array(frame, i) for i, frame in enumerate(frames)]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"all frames must have the same size, got shapes {sorted(shapes)}")
        if len({a.dtype.kind for a in arrays}) != 1:
            raise ValueError("frames mix integer and float arrays; pass one kind")
        frames = np.stack(arrays)
    if not isinstance(frames, np.ndarray):
        raise TypeError(
            f"frames must be a list of PIL images, an array [F, H, W, 3] or a torch tensor, got {type(frames).__name__}"
        )
    if frames.ndim == 5:
        raise ValueError(
            f"frames has 5 dims {tuple(frames.shape)} (a batch [B, F, H, W, 3]): pass one video, e.g. output.frames[0]"
        )
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be shaped [F, H, W, 3] (or [F, H, W, 1] / [F, H, W]), got {tuple(frames.shape)}")
    if 0 in frames.shape:
        raise ValueError(f"frames is empty: shape {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)

    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if frames.dtype == np.bool_:
        return np.ascontiguousarray(frames.astype(np.uint8) * 255)
    if np.issubdtype(frames.dtype, np.integer):
        low, high = int(frames.min()), int(frames.max())
        if low < 0 or high > 255:
            raise ValueError(f"integer frames must lie in [0, 255], got values in [{low}, {high}]")
        return np.ascontiguousarray(frames.astype(np.uint8))
    if np.issubdtype(frames.dtype, np.floating):
        frames = frames.astype(np.float32)
        if not np.isfinite(frames).all():
            raise ValueError("float frames contain NaN or infinity")
        low, high = float(frames.min()), float(frames.max())
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"float frames must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                "(for [-1, 1] data pass (x + 1) / 2; for [0, 255] data pass uint8)"
            )
        return np.ascontiguousarray(np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8))
    raise TypeError(f"frames must be float, integer or bool, got dtype {frames.dtype}")


def _video_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        raise ValueError(
            f"unsupported video file extension {path.suffix or '(none)'!r} in {str(path)!r}; "
            f"use one of {', '.join(VIDEO_EXTENSIONS)}"
        )
    return suffix


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad height and width to even sizes (yuv420p needs them) by repeating the last row/column."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_video(frames: Any, path: str | os.PathLike, fps: float = 8) -> Path:
    """Write ``frames`` as a video; the format follows the extension of ``path``.

    - ``.mp4``: H.264 (libx264, yuv420p, crf 10) through imageio-ffmpeg (its bundled ffmpeg).
      yuv420p needs even sizes: an odd height or width is padded by one pixel, repeating the
      last row or column, so such a video reads back one pixel larger.
    - ``.gif``: Pillow, looping forever; the delay is ``1000 / fps`` ms, rounded to GIF's
      10 ms steps by players. Pillow merges consecutive identical frames into one longer
      frame, so a GIF of a still scene reads back with fewer frames.

    The parent folder is created if needed. Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    suffix = _video_suffix(path)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    array = to_uint8_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        import imageio.v2 as imageio

        array = _pad_to_even(array)
        writer = imageio.get_writer(
            str(path),
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=8,
            macro_block_size=1,  # we padded to even sizes; no rescaling to multiples of 16
            ffmpeg_log_level="error",
        )
        try:
            for frame in array:
                writer.append_data(frame)
        finally:
            writer.close()
    else:  # .gif
        from PIL import Image

        images = [Image.fromarray(frame) for frame in array]
        images[0].save(
            str(path),
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(1, round(1000.0 / fps)),
            loop=0,
            optimize=False,
        )
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read an MP4 or GIF back as a uint8 array ``[F, H, W, 3]`` (every frame, full RGB)."""
    path = Path(path)
    suffix = _video_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {str(path)!r}")
    if suffix == ".mp4":
        import imageio.v2 as imageio

        reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            frames = [np.asarray(frame)[..., :3] for frame in reader]
        finally:
            reader.close()
    else:  # .gif
        from PIL import Image, ImageSequence

        with Image.open(path) as image:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    if not frames:
        raise ValueError(f"{str(path)!r} holds no frames")
    return np.stack(frames).astype(np.uint8, copy=False)


def write_png_grid(
    frames: Any,
    path: str | os.PathLike,
    columns: int | None = None,
    *,
    padding: int = 2,
    background: int = 255,
) -> Path:
    """Write ``frames`` side by side as one PNG contact sheet (row-major, ``columns`` per row).

    Args:
        frames: see the module docstring.
        path: a ``.png`` file; its parent folder is created if needed.
        columns: frames per row; default ``ceil(sqrt(F))``, so the sheet is roughly square.
            More columns than frames are reduced to the number of frames.
        padding: pixels between frames and around the sheet.
        background: grey level (0-255) of the padding.

    Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"unsupported image file extension {path.suffix or '(none)'!r} in {str(path)!r}; use .png")
    array = to_uint8_frames(frames)
    count, height, width, _ = array.shape
    if columns is None:
        columns = math.ceil(math.sqrt(count))
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if isinstance(background, bool) or not isinstance(background, int) or not 0 <= background <= 255:
        raise ValueError(f"background must be an int in [0, 255], got {background!r}")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    sheet = np.full(
        (rows * height + (rows + 1) * padding, columns * width + (columns + 1) * padding, 3), background, dtype=np.uint8
    )
    for index, frame in enumerate(array):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        sheet[top : top + height, left : left + width] = frame

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(str(path), format="PNG")
    return path
