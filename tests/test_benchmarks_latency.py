"""benchmarks.latency on the tiny random bundle: engines, interleaving, ratios, stages,
host share, the LLM step (a stand-in corrector), JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeCorrector, labelled_folder
from PIL import Image

from benchmarks import latency
from benchmarks.common import load_set
from benchmarks.engines import BatchTiming


def test_batch_timing_host_share() -> None:
    timing = BatchTiming(100.0, {"preprocess": 5, "image_encoder": 40, "cross_decoder": 30, "llm": 20})
    assert timing.graph_ms == 70 and timing.host_ms == 10


def test_parse_batches() -> None:
    assert latency.parse_batches("8, 1,8") == [1, 8]
    for bad in ("", "0", "a,b"):
        with pytest.raises(ValueError):
            latency.parse_batches(bad)


def test_main_without_bundle_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert latency.main(["--engine", str(tmp_path)]) == 2
    assert "no bundle at" in capsys.readouterr().err


def test_latency_tiny_bundle_against_pytorch(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "latency.png"
    status = latency.main(["--engine", str(tiny_bundle), "--ckpt", str(tiny_checkpoint), "--batches", "1,2",
                           "--repeats", "2", "--threads", "1", "--no-llm", "--json", "--plot", str(png)])
    out = capsys.readouterr().out
    assert status == 0
    document = json.loads(out.strip().splitlines()[-1])
    assert document["baseline"] == "pytorch" and document["batches"] == [1, 2]
    rows = {(r["engine"], r["batch"]): r for r in document["rows"]}
    assert set(rows) == {("pytorch", 1), ("pytorch", 2), ("ort-cpu/fp32", 1), ("ort-cpu/fp32", 2)}
    assert rows[("ort-cpu/fp32", 1)]["image_encoder"] == "fp32/image_encoder.onnx"
    assert rows[("pytorch", 1)]["image_encoder"] is None and rows[("pytorch", 1)]["warnings"] == []
    assert "Image encoder graphs: ort-cpu fp32: fp32/image_encoder.onnx" in out
    for (engine, _batch), row in rows.items():
        assert row["repeats"] == 2 and row["errors"] == 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["throughput"] > 0
        assert 0.0 <= row["host_share"] < 1.0
        assert row["ratio_to_baseline"] > 0
        if engine == "pytorch":
            assert row["ratio_to_baseline"] == 1.0 and "forward" in row["stages_p50_ms"]
        else:
            assert {"image_encoder", "visual_decoder", "text_encoder", "cross_decoder", "tokenize"} <= set(
                row["stages_p50_ms"])
            stage_sum = sum(row["stages_p50_ms"].values())
            assert stage_sum <= row["p95_ms"] * 1.5  # stages are parts of the whole
    assert "| PyTorch eager cpu fp32 | 1 |" in out and "Stage p50" in out
    with Image.open(png) as image:
        assert image.size[0] > 600 and image.size[1] > 300


def test_llm_step_with_stand_in_corrector(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.llm import Corrector

    made: list[tuple[Any, str]] = []

    def fake_from_spec(spec: Any, mode: str = "rescore", threshold: float = 0.8, **_: Any) -> FakeCorrector:
        made.append((spec, mode))
        corrector = FakeCorrector()
        corrector.mode = mode
        return corrector

    monkeypatch.setattr(Corrector, "from_spec", staticmethod(fake_from_spec))
    data = load_set(labelled_folder(tmp_path / "s", 5))
    report = latency.measure_llm(tiny_bundle, data.images, ["default"], threads=1, max_words=100, batch=2)
    assert made == [("default", "rescore"), ("default", "fill")]
    assert report["images"] == 5 and 0 <= report["gated"] <= 5
    assert report["gate_rate"] == pytest.approx(100.0 * report["gated"] / 5)
    for variant in report["variants"]:
        assert variant["gated_words"] == report["gated"]
        if report["gated"]:  # the stand-in reports 2 ms per word
            assert variant["ms_per_word_p50"] == pytest.approx(2.0)
            assert variant["added_ms_per_image"] == pytest.approx(2.0 * report["gated"] / 5)


def test_llm_step_reports_a_missing_model(tiny_bundle: Path, tmp_path: Path) -> None:
    data = load_set(labelled_folder(tmp_path / "s", 2))
    report = latency.measure_llm(tiny_bundle, data.images, [str(tmp_path / "none.gguf")], threads=1, max_words=1)
    assert report["variants"] == []
    assert set(report["missing"]) == {f"{tmp_path / 'none.gguf'}/rescore", f"{tmp_path / 'none.gguf'}/fill"}
    text = latency.tables([], report, None)
    assert "missing" in text and "gate rate" in text
