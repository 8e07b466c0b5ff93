"""Image transforms: training augmentation and the model-input conversion.

* :class:`ToModelInput` turns a PIL image into the model's input tensor ``(3, H, W)``
  with :func:`runtime.preprocess.preprocess`, the single preprocessing implementation.
* :class:`STRRandAugment` is torchvision's ``RandAugment`` with CLIP4STR's op space:
  Sharpness removed (torchvision has no Invert; it is excluded too should it appear),
  3 ops per image at magnitude 5 (CLIP4STR/PARSeq's ``rand-m5-n3``).
* :func:`build_transform` chains them: augmentation on the PIL image first, then
  the rare extras PARSeq also uses (Gaussian blur, Gaussian noise), then preprocessing.
* :func:`worn_copy` makes a crop look as a cheap camera gives it (low resolution, blur, JPEG):
  ``training.finetune`` checks forgetting on synthetic words so worn.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from runtime.preprocess import Preprocessing, preprocess

#: ops never drawn (CLIP4STR: RandAugment "without sharpness and invert")
EXCLUDED_OPS = frozenset({"Sharpness", "Invert"})


class STRRandAugment(T.RandAugment):
    """RandAugment minus Sharpness and Invert; defaults: 3 ops, magnitude 5, bilinear."""

    def __init__(self, num_ops: int = 3, magnitude: int = 5, num_magnitude_bins: int = 31,
                 interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR, fill=None) -> None:
        super().__init__(num_ops, magnitude, num_magnitude_bins, interpolation, fill)

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict:
        space = super()._augmentation_space(num_bins, image_size)
        return {name: meta for name, meta in space.items() if name not in EXCLUDED_OPS}


class GaussianNoise:
    """Add N(0, sigma) noise to a PIL image, sigma drawn uniformly from ``sigma`` (0-255 scale)."""

    def __init__(self, sigma: tuple[float, float] = (2.0, 10.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        low, high = self.sigma
        sigma = low + (high - low) * float(torch.rand(()))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        array += torch.randn(array.shape) * sigma
        return Image.fromarray(array.clamp_(0, 255).to(torch.uint8).numpy())

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma})"


def camera_look(image: Image.Image, height: int, blur: float, quality: int) -> Image.Image:
    """``image`` as a cheap camera gives it: shrunk to ``height`` pixels high and back (bilinear),
    blurred (Gaussian, radius ``blur``) and saved as JPEG at ``quality``; same size, RGB."""
    image = image.convert("RGB")
    width, full = image.size
    small = image.resize((max(1, round(width * height / full)), height), Image.Resampling.BILINEAR)
    image = small.resize((width, full), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(blur))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def worn_copy(image: Image.Image, rng: random.Random) -> Image.Image:
    """:func:`camera_look` at a strength drawn from ``rng``: 12-22 pixels high (never taller than
    the crop), blur radius 0-1, JPEG quality 25-70. Deterministic for a seeded ``rng``."""
    height = min(rng.randint(12, 22), image.size[1])
    return camera_look(image, height, rng.uniform(0.0, 1.0), rng.randint(25, 70))


class ToModelInput:
    """PIL image -> float32 tensor ``(3, H, W)`` via :func:`runtime.preprocess.preprocess`."""

    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess([image], self.spec)[0])

    def __repr__(self) -> str:
        return f"ToModelInput({self.spec.height}x{self.spec.width})"


def augmentation(num_ops: int = 3, magnitude: int = 5, blur_p: float = 0.1, noise_p: float = 0.1) -> T.Compose:
    """The training augmentation on PIL images (CLIP4STR's RandAugment plus rare blur/noise)."""
    return T.Compose([
        STRRandAugment(num_ops, magnitude),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 1.2))], p=blur_p),
        T.RandomApply([GaussianNoise()], p=noise_p),
    ])


def build_transform(spec: Preprocessing, augment: bool = False) -> T.Compose | ToModelInput:
    """The dataset transform: optional augmentation, then :class:`ToModelInput`."""
    if not augment:
        return ToModelInput(spec)
    return T.Compose([augmentation(), ToModelInput(spec)])
