"""Shared test fixtures.

* ``tiny_checkpoint`` / ``tiny_bundle`` (session): a random ``clip4str-tiny`` checkpoint and
  the bundle ``export.onnx.export_bundle`` makes of it (skipped while the exporter is absent).
* ``fake_bundle`` and ``FakeBackend``: a schema-1 bundle whose graphs are stand-ins and a
  numpy backend that reads "barcode" images, so runtime logic (batching, bad input, gate,
  LLM bookkeeping, CLI, evaluation) is tested fast and with known answers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# -- the real tiny bundle ---------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ``clip4str-tiny`` checkpoint (seed 0)."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.config import model_config
    from training.model.clip4str import CLIP4STR

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return save_checkpoint(CLIP4STR(model_config("clip4str-tiny")).eval(),
                           tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 bundle of ``tiny_checkpoint`` made by the exporter."""
    try:
        from export.onnx import export_bundle
    except ImportError as exc:
        pytest.skip(f"export.onnx.export_bundle is not available yet ({exc})")
    return Path(export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("tiny_bundle") / "bundle",
                              precisions=("fp32",)))


# -- fakes --------------------------------------------------------------------------------

FAKE_CHARSET = "0123456789abcdefghijklmnopqrstuvwxyz"
FAKE_STEPS = 26
BAND = 4  # pixels per character band
LEVEL = 6  # grey levels between two class ids
FAKE_HEIGHT, FAKE_WIDTH = 8, FAKE_STEPS * BAND


def bpe_file() -> Path:
    """CLIP's merges file as open_clip ships it (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def barcode(text: str, blur: dict[int, float] | None = None) -> Image.Image:
    """An image the fake backend reads as ``text``: band t has grey level LEVEL * id.

    ``blur`` moves band t by that many class steps (0.5: halfway to the next character,
    so the fake is unsure there).
    """
    ids = [FAKE_CHARSET.index(c) + 1 for c in text] + [0] * (FAKE_STEPS - len(text))
    levels = np.array(ids, dtype=np.float64)
    for t, shift in (blur or {}).items():
        levels[t] += shift
    row = np.repeat(np.round(levels * LEVEL), BAND).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.tile(row, (FAKE_HEIGHT, 1))).convert("RGB")


class FakeBackend:
    """Numpy stand-in for the four graphs, reading :func:`barcode` images."""

    name = "fake"
    precision = "fp32"

    def __init__(self, sharpness: float = 4.0, fail_on: str | None = None) -> None:
        self.sharpness = sharpness
        self.fail_on = fail_on
        self.calls: list[tuple[str, dict[str, tuple[int, ...]]]] = []

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append((graph, {k: v.shape for k, v in feeds.items()}))
        if graph == self.fail_on:
            raise RuntimeError(f"fake failure in {graph}")
        if graph == "image_encoder":
            x = feeds["images"]
            assert x.dtype == np.float32 and x.shape[1:] == (3, FAKE_HEIGHT, FAKE_WIDTH)
            bands = x[:, 0].mean(1).reshape(len(x), FAKE_STEPS, BAND).mean(-1)
            cls = bands.mean(1, keepdims=True)
            feats = np.concatenate([cls, bands], 1)[..., None]
            return {"image_features": np.repeat(feats, 2, -1).astype(np.float32)}
        if graph == "visual_decoder":
            logits = self._logits(feeds["image_features"])
            return {"ar_logits": logits, "refined_logits": logits.copy()}
        if graph == "text_encoder":
            ids = feeds["text_ids"]
            assert ids.dtype == np.int64 and ids.shape[1] == 16
            return {"text_features": np.stack([ids, ids], -1).astype(np.float32) / 50000}
        if graph == "cross_decoder":
            n = len(feeds["image_features"])
            assert feeds["text_features_ar"].shape[:2] == (n, 16) == feeds["text_features_refined"].shape[:2]
            logits = self._logits(feeds["image_features"])
            return {"ar_logits": logits, "refined_logits": logits.copy()}
        raise KeyError(graph)

    def _logits(self, feats: np.ndarray) -> np.ndarray:
        position = feats[:, 1:, 0] * 255.0 / LEVEL  # (B, T) fractional class id
        classes = np.arange(len(FAKE_CHARSET) + 1, dtype=np.float32)
        return (-self.sharpness * (position[..., None] - classes) ** 2).astype(np.float32)

    def close(self) -> None:
        pass


def _tensor(name: str, shape: list[Any], dtype: str = "float32") -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype}


def write_manifest(root: Path, manifest: dict[str, Any], files: list[str]) -> None:
    """Write ``manifest.json`` with the sha256 of ``files``."""
    manifest["files"] = {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def make_fake_bundle(root: Path) -> Path:
    """A schema-1 bundle around stand-in graph files, for the fake backend and bundle checks."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(bpe_file(), root / "bpe_simple_vocab_16e6.txt.gz")
    (root / "fp32").mkdir(exist_ok=True)
    c1, d, p = len(FAKE_CHARSET) + 1, 2, 1 + FAKE_STEPS
    io = {
        "image_encoder": ([_tensor("images", ["batch", 3, FAKE_HEIGHT, FAKE_WIDTH])],
                          [_tensor("image_features", ["batch", p, d])]),
        "visual_decoder": ([_tensor("image_features", ["batch", p, d])],
                           [_tensor("ar_logits", ["batch", FAKE_STEPS, c1]),
                            _tensor("refined_logits", ["batch", FAKE_STEPS, c1])]),
        "text_encoder": ([_tensor("text_ids", ["batch", 16], "int64")], [_tensor("text_features", ["batch", 16, d])]),
        "cross_decoder": ([_tensor("image_features", ["batch", p, d]), _tensor("text_features_ar", ["batch", 16, d]),
                           _tensor("text_features_refined", ["batch", 16, d])],
                          [_tensor("ar_logits", ["batch", FAKE_STEPS, c1]),
                           _tensor("refined_logits", ["batch", FAKE_STEPS, c1])]),
    }
    graphs = {}
    for name, (inputs, outputs) in io.items():
        (root / "fp32" / f"{name}.onnx").write_bytes(f"stand-in for {name}".encode())
        graphs[name] = {"file": f"fp32/{name}.onnx", "inputs": inputs, "outputs": outputs}
    manifest = {
        "schema_version": 1,
        "model": {"name": "fake"},
        "charset": FAKE_CHARSET,
        "test_charset": FAKE_CHARSET,
        "preprocessing": {"height": FAKE_HEIGHT, "width": FAKE_WIDTH, "mean": [0, 0, 0], "std": [1, 1, 1],
                          "interpolation": "bicubic"},
        "decode": {"num_steps": FAKE_STEPS, "refine_iters": 1, "fast": False, "eos_id": 0,
                   "bos_id": c1, "pad_id": c1 + 1, "text_context_length": 16, "topk": 3},
        "threshold": 0.8,
        "tokenizer": {"type": "clip-bpe", "file": "bpe_simple_vocab_16e6.txt.gz"},
        "graphs": {"fp32": graphs},
        "engines": [],
        "created": {"tool": "tests", "version": "0", "time": "2000-01-01T00:00:00Z"},
    }
    files = ["bpe_simple_vocab_16e6.txt.gz"] + [g["file"] for g in graphs.values()]
    write_manifest(root, manifest, files)
    return root


class FakeCorrector:
    """A :class:`runtime.correction.contract.Corrector` that gates at 0.8 and replaces each
    masked character by the decoder's second choice (or gives a fixed answer)."""

    mode = "rescore"
    enabled = True

    def __init__(self, answer: str | None = None, fail: bool = False) -> None:
        self.answer, self.fail, self.seen = answer, fail, []

    def correct(self, predictions: list[Any], charset: str) -> list[Any]:
        from runtime.correction.contract import Candidate, Correction, Reason, Skip

        if self.fail:
            raise RuntimeError("model crashed")
        out = []
        for p in predictions:
            masked = [i for i, q in enumerate(p.char_probs) if q < 0.8]
            if not masked:
                out.append(Correction(p.text, p.text, False, False, self.mode, skipped=Skip.NOT_REVIEWED))
                continue
            self.seen.append(p.text)
            text = self.answer
            if text is None:
                text = "".join(p.topk[i][1][0] if i in masked else c for i, c in enumerate(p.text))
            out.append(Correction(text, p.text, text != p.text, True, self.mode, masked=masked,
                                  candidates=[Candidate(text, text, -1.0, score=-1.0)], time_s=0.002,
                                  low_confidence=masked, reasons=[Reason.LOW_CONFIDENCE]))
        return out


@pytest.fixture
def fake_bundle(tmp_path: Path) -> Path:
    return make_fake_bundle(tmp_path / "fake_bundle")


@pytest.fixture
def fake_recognizer(fake_bundle: Path) -> Callable[..., Any]:
    """Factory: a Recognizer on the fake bundle with a :class:`FakeBackend`."""
    from runtime.bundle import load_bundle
    from runtime.recognizer import Recognizer

    def make(corrector: Any = None, threshold: float | None = None, **backend: Any) -> Recognizer:
        return Recognizer(load_bundle(fake_bundle), FakeBackend(**backend), corrector, threshold)

    return make


def labelled_folder(root: Path, n: int = 3) -> Path:
    """A folder set of ``n`` flat images of growing width, labelled ``word0``, ``word1``, ..."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (60 + 10 * i, 20), (30 * i % 255, 120, 200)).save(root / "images" / f"{i}.png")
        lines.append(f"{i}.png\tword{i}\n")
    (root / "labels.tsv").write_text("".join(lines))
    return root
