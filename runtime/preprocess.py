"""Image loading and preprocessing: the one implementation.

Training, evaluation, export parity checks and the runtime all turn a picture into the
model's input with :func:`preprocess`, so the pixels a model sees never depend on who
calls it. Images are resized to the model size *without* keeping the aspect ratio
(bicubic), scaled to [0, 1] and normalised with the checkpoint's mean and std.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Largest image accepted, in pixels: word crops are small, anything beyond is refused
#: before it is decoded (a decompression bomb would otherwise take all memory).
MAX_PIXELS = 40_000_000

ImageSource = str | os.PathLike | bytes | Image.Image


class ImageError(ValueError):
    """An input that cannot be read as an image; the message says why."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: size, normalisation and interpolation."""

    height: int
    width: int
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data.get("interpolation", "bicubic")),
        )


_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``source`` (path, encoded bytes or PIL image) as an RGB image.

    Raises :class:`ImageError` for a missing, empty, truncated, corrupt or oversized file
    or for something that is not an image. 16-bit, CMYK, palette and grey images are
    converted to RGB; an animated image gives its first frame.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError("empty image data")
        stream: io.BytesIO | str = io.BytesIO(source)
        name = "<bytes>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
        stream = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{name}: {width}x{height} exceeds the {max_pixels}-pixel limit")
                if width == 0 or height == 0:
                    raise ImageError(f"{name}: image has no pixels")
                image.seek(0)
                image.load()
                return _to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float images are rescaled)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def resize(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """Resize to the model size, ignoring the aspect ratio."""
    return image.resize((spec.width, spec.height), _INTERPOLATION[spec.interpolation])


def preprocess(images: Sequence[Image.Image], spec: Preprocessing) -> np.ndarray:
    """RGB PIL images -> normalised float32 batch ``(B, 3, H, W)``."""
    batch = np.empty((len(images), spec.height, spec.width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = np.asarray(resize(_to_rgb(image) if image.mode != "RGB" else image, spec))
    return normalize(batch, spec)


def normalize(batch_hwc_uint8: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)`` scaled and normalised."""
    scale = np.float32(1.0 / 255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)
    x = (batch_hwc_uint8.astype(np.float32) * scale - mean) * inv_std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
