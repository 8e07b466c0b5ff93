"""The text-line detector: a DB (differentiable binarisation) graph and its post-processing.

The graph maps a photo to a text probability map of the same size. Post-processing, after
the DB paper (Liao et al., AAAI 2020): binarise the map, take each connected region's
minimum-area rectangle, keep regions whose mean probability is high enough, grow each
(the network predicts shrunk text kernels) by the offset ``area * ratio / perimeter``
(pyclipper) and take the grown region's rectangle as the line's quad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pyclipper

from runtime.detect.geometry import order_quad
from runtime.detect.settings import DetectorSettings, model_path


@dataclass
class Line:
    """One detected text line: its quad in photo pixels and the region's mean probability."""

    quad: np.ndarray
    score: float


def input_size(width: int, height: int, settings: DetectorSettings) -> tuple[int, int]:
    """The graph's input size (w, h) for a photo: the longest side at most ``max_side``, the
    shortest at least ``min_side`` when that keeps the longest within ``max_side``, both
    rounded to multiples of 32 (at least 32)."""
    scale = min(settings.max_side / max(width, height), max(1.0, settings.min_side / min(width, height)))
    return (max(32, int(round(width * scale / 32)) * 32), max(32, int(round(height * scale / 32)) * 32))


def region_score(prob: np.ndarray, contour: np.ndarray) -> float:
    """Mean probability inside the contour (computed over its bounding box only)."""
    x, y, w, h = cv2.boundingRect(contour)
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(mask, [contour.reshape(-1, 2) - np.array([x, y])], 1)
    return float(cv2.mean(prob[y:y + h, x:x + w], mask)[0])


def unclip(box: np.ndarray, ratio: float) -> np.ndarray | None:
    """The box grown by ``area * ratio / perimeter`` pixels (rounded joins); None when empty."""
    area, perimeter = cv2.contourArea(box.astype(np.float32)), cv2.arcLength(box.astype(np.float32), True)
    if perimeter <= 0:
        return None
    offset = pyclipper.PyclipperOffset()
    offset.AddPath([tuple(int(round(v)) for v in p) for p in box], pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    grown = offset.Execute(area * ratio / perimeter)
    if not grown:
        return None
    return np.array(max(grown, key=len), dtype=np.float32)


def lines_from_map(prob: np.ndarray, settings: DetectorSettings, scale_x: float, scale_y: float,
                   photo_size: tuple[int, int]) -> list[Line]:
    """Text lines of a probability map ``(H, W)``; quads scaled by ``1/scale`` into a photo
    of ``photo_size`` (w, h) and clipped to it."""
    bitmap = (prob > settings.threshold).astype(np.uint8)
    if settings.dilate:
        bitmap = cv2.dilate(bitmap, np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    width, height = photo_size
    lines = []
    for contour in contours[: settings.max_candidates]:
        rect = cv2.minAreaRect(contour)
        if min(rect[1]) < settings.min_size:
            continue
        score = region_score(prob, contour)
        if score < settings.box_threshold:
            continue
        grown = unclip(cv2.boxPoints(rect), settings.unclip_ratio)
        if grown is None:
            continue
        rect = cv2.minAreaRect(grown)
        if min(rect[1]) < settings.min_size + 2:
            continue
        quad = cv2.boxPoints(rect).astype(np.float64) / np.array([scale_x, scale_y])
        quad[:, 0] = quad[:, 0].clip(0, width)
        quad[:, 1] = quad[:, 1].clip(0, height)
        lines.append(Line(order_quad(quad), score))
    return lines


class Detector:
    """The detector graph in an onnxruntime session."""

    def __init__(self, settings: DetectorSettings, bundle_root: Path | None = None, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        self.settings = settings
        self.path = model_path(settings, bundle_root)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
        self.input_name = self.session.get_inputs()[0].name

    def probability_map(self, photo: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The probability map of an RGB uint8 photo ``(H, W, 3)`` and the x and y scales
        from photo pixels to map pixels."""
        s = self.settings
        height, width = photo.shape[:2]
        w, h = input_size(width, height, s)
        resized = cv2.resize(photo, (w, h), interpolation=cv2.INTER_LINEAR)
        if s.bgr:
            resized = resized[:, :, ::-1]
        x = (resized.astype(np.float32) / 255.0 - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0]
        return out.reshape(out.shape[-2:]), w / width, h / height

    def __call__(self, photo: np.ndarray) -> list[Line]:
        """The text lines of an RGB uint8 photo."""
        prob, sx, sy = self.probability_map(photo)
        return lines_from_map(prob, self.settings, sx, sy, (photo.shape[1], photo.shape[0]))
