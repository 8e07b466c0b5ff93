"""Image loading and preprocessing: the one implementation.

Training, evaluation, export parity checks and the runtime all turn a picture into the
model's input with :func:`preprocess`, so the pixels a model sees never depend on who
calls it. Images are scaled to [0, 1] and normalised with the checkpoint's mean and std
after one of two resizes, as the checkpoint's :class:`Preprocessing` says:

* ``keep_aspect=False`` (CLIP towers): the model size *without* keeping the aspect ratio;
* ``keep_aspect=True`` (text-recognition towers such as PP-OCR's): the model height, the
  width that keeps the aspect ratio (at most ``width``, at least ``width_multiple``), then
  right-padding with zeros (after normalisation) to the widest image of the batch rounded
  up to ``width_multiple``, and at least to ``pad_width``.
"""

from __future__ import annotations

import io
import math
import os
import re
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


class ImageTooLarge(ImageError):
    """An image over the pixel limit (found from its header, before it is decoded)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: size, normalisation, interpolation and aspect policy.

    With ``keep_aspect`` the input width is dynamic: ``width`` is the largest, and every
    batch width is a multiple of ``width_multiple``.
    """

    height: int
    width: int
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    keep_aspect: bool = False
    width_multiple: int = 8
    #: ``keep_aspect`` only: every batch is right-padded to at least this width (0: to its
    #: widest image). PP-OCR's recognizers are trained on crops padded to 320 pixels and
    #: read narrow crops best with that padding, whose tokens their global mixing sees.
    pad_width: int = 0

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0 or self.width_multiple <= 0:
            raise ValueError(f"bad preprocessing size {self.height}x{self.width} (multiple {self.width_multiple})")
        if self.keep_aspect and self.width % self.width_multiple:
            raise ValueError(f"width {self.width} is not a multiple of {self.width_multiple}")
        if self.pad_width < 0 or self.pad_width > self.width or self.pad_width % self.width_multiple:
            raise ValueError(f"pad_width {self.pad_width} must be a multiple of {self.width_multiple} "
                             f"between 0 and {self.width}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; known: {sorted(_INTERPOLATION)}")

    @property
    def min_width(self) -> int:
        """The narrowest input the model sees (``width`` for a fixed size)."""
        return max(self.width_multiple, self.pad_width) if self.keep_aspect else self.width

    @property
    def typical_width(self) -> int:
        """A typical word's input width: half the widest (a multiple of ``width_multiple``)
        with a dynamic width, else the width. Graphs are traced and TensorRT profiles
        optimised at it."""
        if not self.keep_aspect:
            return self.width
        m = self.width_multiple
        return max(self.min_width, self.width // 2 // m * m)

    def image_width(self, size: tuple[int, int]) -> int:
        """The resized width of an image of ``(width, height)`` pixels."""
        if not self.keep_aspect:
            return self.width
        w, h = size
        return min(self.width, max(self.width_multiple, math.ceil(self.height * w / h)))

    def batch_width(self, widths: Sequence[int]) -> int:
        """The padded width of a batch whose images resize to ``widths``."""
        if not self.keep_aspect:
            return self.width
        m = self.width_multiple
        return min(self.width, max(self.min_width, -(-max(widths) // m) * m))

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
            keep_aspect=bool(data.get("keep_aspect", False)),
            width_multiple=int(data.get("width_multiple", 8)),
            pad_width=int(data.get("pad_width", 0)),
        )


_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open ``source`` (path, encoded bytes or PIL image) as an RGB image.

    Raises :class:`ImageError` for a missing, empty, truncated, corrupt or oversized file
    (:class:`ImageTooLarge`) or for something that is not an image. 16-bit, CMYK, palette
    and grey images are converted to RGB; an animated image gives its first frame.
    ``name``: how messages call encoded bytes (default ``<bytes>``).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, bytes | bytearray):
        name = name or "<bytes>"
        if not source:
            raise ImageError(f"{name}: empty image data")
        stream: io.BytesIO | str = io.BytesIO(source)
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
            # one limit, MAX_PIXELS, below; Pillow's own (warning at 89M, error at 179M pixels)
            # would otherwise answer first for the largest images, in other words
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow's own warnings about a broken file (corrupt EXIF, truncated TIFF tags):
            # the file reads, or its one error says why
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLarge(_too_large(name, width * height, max_pixels))
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
        size = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's own limit, when it answers first
        raise ImageTooLarge(_too_large(name, int(size[1]) if size else None, max_pixels)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None


def _too_large(name: str, pixels: int | None, max_pixels: int) -> str:
    """The one message for an image over the pixel limit, whatever its size."""
    size = f"{pixels} pixels" if pixels else "too many pixels"
    return f"{name}: {size}, over the {max_pixels}-pixel limit ({max_pixels / 1e6:g} megapixels)"


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
    """Resize to the model height and :meth:`Preprocessing.image_width`."""
    return image.resize((spec.image_width(image.size), spec.height), _INTERPOLATION[spec.interpolation])


def preprocess(images: Sequence[Image.Image], spec: Preprocessing) -> np.ndarray:
    """RGB PIL images -> normalised float32 batch ``(B, 3, H, W)`` (W: the batch width)."""
    resized = [np.asarray(resize(_to_rgb(image) if image.mode != "RGB" else image, spec)) for image in images]
    if not spec.keep_aspect:
        return normalize(np.stack(resized) if resized else np.empty((0, spec.height, spec.width, 3), np.uint8), spec)
    return pad_batch([normalize(r[None], spec)[0] for r in resized], spec)


def width_groups(sizes: Sequence[tuple[int, int]], spec: Preprocessing, batch_size: int) -> list[list[int]]:
    """Indices of images of ``sizes`` (``(width, height)``) in batches of at most
    ``batch_size`` whose images all have the same padded width (:meth:`Preprocessing.batch_width`
    of the image alone): each is then padded exactly as when read alone, so a word's
    reading does not depend on the other images of its batch. Batches come in order of
    their first image; within one, indices keep their order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    groups: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(spec.batch_width([spec.image_width(size)]), []).append(i)
    batches = [members[k : k + batch_size] for members in groups.values()
               for k in range(0, len(members), batch_size)]
    return sorted(batches, key=lambda batch: batch[0])


def pad_batch(images: Sequence[np.ndarray], spec: Preprocessing) -> np.ndarray:
    """Normalised ``(3, H, w_i)`` arrays -> one ``(B, 3, H, W)`` batch, right-padded with
    zeros to :meth:`Preprocessing.batch_width`."""
    width = spec.batch_width([image.shape[-1] for image in images] or [spec.min_width])
    batch = np.zeros((len(images), 3, spec.height, width), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i, :, :, : image.shape[-1]] = image[..., :width]
    return batch


def normalize(batch_hwc_uint8: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)`` scaled and normalised."""
    scale = np.float32(1.0 / 255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)
    x = (batch_hwc_uint8.astype(np.float32) * scale - mean) * inv_std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
