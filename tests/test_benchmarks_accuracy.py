"""benchmarks.accuracy on the tiny random bundle: PyTorch and ONNX agree, LLM rows re-read
only gated words and count what the LLM changed, a missing LLM is reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FakeCorrector
from PIL import Image

from benchmarks import accuracy


def _labelled_by_pytorch(root: Path, ckpt: Path, n: int = 4) -> Path:
    """Random crops labelled with what the PyTorch model reads: its accuracy is 100%. The
    labels are in the protocol's form (a random model's 26 characters would be dropped)."""
    import torch

    from runtime.charset import eval_normalize, keep_for_eval
    from runtime.preprocess import preprocess
    from training.checkpoint import load_checkpoint

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images = [Image.fromarray(rng.integers(0, 256, (24, 30 + 20 * i, 3), dtype=np.uint8)) for i in range(n)]
    model = load_checkpoint(ckpt)
    texts = [eval_normalize(p.text) for p in model.read(torch.from_numpy(preprocess(images, model.cfg.image)))]
    assert all(keep_for_eval(t) for t in texts)
    for i, image in enumerate(images):
        image.save(root / "images" / f"{i}.png")
    (root / "labels.tsv").write_text("".join(f"{i}.png\t{t}\n" for i, t in enumerate(texts)))
    return root


def _last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def test_pytorch_and_onnx_rows_agree(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    words = _labelled_by_pytorch(tmp_path / "words", tiny_checkpoint)
    status = accuracy.main([str(words), "--engine", str(tiny_bundle), "--ckpt", str(tiny_checkpoint),
                            "--modes", "--threads", "1", "--json"])
    out = capsys.readouterr().out
    assert status == 0
    rows = _last_json(out)["rows"]
    assert [(r["engine"], r["llm"]) for r in rows] == [("PyTorch fp32", "none"), ("ort-cpu fp32", "none")]
    for row in rows:
        assert row["total"]["n"] == 4 and row["total"]["accuracy"] == 100.0
    assert rows[1]["total"]["errors"] == 0
    assert "| ort-cpu fp32 | none | 100.0 / 100.0 |" in out


def test_llm_rows_reread_only_gated_words(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.llm import Corrector

    seen: list[str] = []

    class Recording(FakeCorrector):
        def correct(self, predictions: list[Any], charset: str) -> list[Any]:
            seen.extend(p.text for p in predictions)
            return super().correct(predictions, charset)

    monkeypatch.setattr(Corrector, "from_spec", staticmethod(lambda spec, mode="rescore", **_: Recording()))
    words = _labelled_by_pytorch(tmp_path / "words", tiny_checkpoint)
    status = accuracy.main([str(words), "--engine", str(tiny_bundle), "--ckpt", str(tiny_checkpoint),
                            "--modes", "fill", "--threads", "1", "--json"])
    assert status == 0
    rows = {r["llm"]: r for r in _last_json(capsys.readouterr().out)["rows"] if r["engine"] != "PyTorch fp32"}
    gated = round(rows["none"]["total"]["gate_rate"] * 4 / 100)
    assert gated > 0 and len(seen) == gated  # a random model is unsure; only gated words went to the LLM
    fill = rows["fill"]["total"]
    assert fill["llm_fixed"] == 0  # every vision answer was right (labels are PyTorch's words)
    assert fill["llm_broke"] == fill["llm_changed"]
    assert fill["accuracy"] == pytest.approx(100.0 * (4 - fill["llm_broke"]) / 4)


def test_missing_llm_is_reported(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words = tmp_path / "w"
    (words / "images").mkdir(parents=True)
    Image.new("RGB", (40, 16), "white").save(words / "images" / "a.png")
    (words / "labels.tsv").write_text("a.png\tword\n")
    status = accuracy.main([str(words), "--engine", str(tiny_bundle), "--llm", str(tmp_path / "no.gguf"),
                            "--threads", "1", "--json"])
    out = capsys.readouterr().out
    assert status == 0
    rows = _last_json(out)["rows"]
    assert rows[0]["status"] == "missing"  # no checkpoint in this bundle and no --ckpt
    missing = [r for r in rows if r["status"] == "missing" and r["llm"] in ("rescore", "fill")]
    assert len(missing) == 2 and all("no.gguf" in r["reason"] or "not" in r["reason"] for r in missing)
    assert "missing" in out
