"""Quadrilaterals: point order, perspective rectification and reading order.

A quad is a float ``(4, 2)`` array of photo pixels, clockwise from the top-left corner of
the text as it reads: ``q[0] -> q[1]`` runs along the text's top edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: a rectified crop this many times taller than wide is read turned by 90 degrees
VERTICAL_RATIO = 1.5


def order_quad(points: np.ndarray) -> np.ndarray:
    """Four points in reading order: clockwise (image coordinates, y down), starting with the
    corner whose following edge points most to the right (the top edge of horizontal text)."""
    pts = np.asarray(points, dtype=np.float64).reshape(4, 2)
    centre = pts.mean(0)
    pts = pts[np.argsort(np.arctan2(pts[:, 1] - centre[1], pts[:, 0] - centre[0]))]
    edges = np.roll(pts, -1, axis=0) - pts  # edge k runs from pts[k] to pts[k + 1]
    lengths = np.maximum(np.hypot(edges[:, 0], edges[:, 1]), 1e-9)
    start = int(np.argmax(edges[:, 0] / lengths + 1e-6 * lengths))
    return np.roll(pts, -start, axis=0)


def quad_size(quad: np.ndarray) -> tuple[float, float]:
    """(width, height): the longer of the top and bottom edges, of the left and right ones."""
    q = np.asarray(quad, dtype=np.float64)
    width = max(np.linalg.norm(q[1] - q[0]), np.linalg.norm(q[2] - q[3]))
    height = max(np.linalg.norm(q[3] - q[0]), np.linalg.norm(q[2] - q[1]))
    return float(width), float(height)


def rectify(photo: np.ndarray, quad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quad's content warped to an upright rectangle (its :func:`quad_size`) and the
    3x3 matrix mapping the rectangle's pixels back to the photo's."""
    width, height = quad_size(quad)
    w, h = max(1, int(round(width))), max(1, int(round(height)))
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    forward = cv2.getPerspectiveTransform(np.asarray(quad, dtype=np.float32), target)
    crop = cv2.warpPerspective(photo, forward, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return crop, np.linalg.inv(forward)


def map_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points ``(N, 2)`` through a 3x3 perspective matrix."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mapped = np.c_[pts, np.ones(len(pts))] @ np.asarray(matrix, dtype=np.float64).T
    return mapped[:, :2] / mapped[:, 2:3]


def sub_quad(back: np.ndarray, x0: float, x1: float, height: float) -> np.ndarray:
    """The photo quad of the columns ``x0..x1`` of a rectified crop of ``height`` rows."""
    return map_points(back, np.array([[x0, 0.0], [x1, 0.0], [x1, height], [x0, height]]))


def reading_order(quads: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of ``quads`` grouped into rows (quads whose vertical extents overlap by at
    least half the smaller height), rows top to bottom, each row left to right."""
    if not quads:
        return []
    boxes = [(float(q[:, 1].min()), float(q[:, 1].max()), float(q[:, 0].min())) for q in quads]
    rows: list[list[int]] = []
    for i in sorted(range(len(quads)), key=lambda k: (boxes[k][0] + boxes[k][1]) / 2):
        top, bottom, _ = boxes[i]
        for row in rows:
            last = row[-1]
            overlap = min(bottom, boxes[last][1]) - max(top, boxes[last][0])
            if overlap >= 0.5 * min(bottom - top, boxes[last][1] - boxes[last][0]):
                row.append(i)
                break
        else:
            rows.append([i])
    return [sorted(row, key=lambda k: boxes[k][2]) for row in rows]


def polygon_list(quad: np.ndarray) -> list[list[float]]:
    """A quad as JSON-friendly ``[[x, y], ...]`` rounded to 0.1 pixel."""
    return [[round(float(x), 1), round(float(y), 1)] for x, y in np.asarray(quad).reshape(4, 2)]
