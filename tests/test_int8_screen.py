"""benchmarks.int8_screen on the random clip4str-tiny bundle: a variant is quantized and
scored on the dev set, one JSON line is written, and a second run resumes (runs nothing);
the calibration cache key follows the calibration options only."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import int8_screen
from tests.test_static_int8 import _word_set


def test_cache_key_follows_calibration_options_only() -> None:
    base = int8_screen.Variant()
    assert base.cache_key() == int8_screen.Variant(options={"ActivationSymmetric": True}).cache_key()
    assert base.cache_key() == int8_screen.Variant(fp32_groups=("x",)).cache_key()
    assert base.cache_key() != int8_screen.Variant(crops=2000).cache_key()
    assert base.cache_key() != int8_screen.Variant(options={"CalibMovingAverage": True}).cache_key()
    assert int8_screen.Variant("percentile").cache_key() != base.cache_key()


def test_nodes_in_selects_groups_by_prefix() -> None:
    groups = {"a/b/c1": ["n1", "n2"], "a/b/c2": ["n3"], "d": ["n4"]}
    assert int8_screen.nodes_in(groups, ("a/b",)) == ["n1", "n2", "n3"]
    assert int8_screen.nodes_in(groups, ("a/b/c2", "d")) == ["n3", "n4"]
    assert int8_screen.nodes_in(groups, ()) == []


def test_screen_writes_one_line_per_variant_and_resumes(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    words = _word_set(tmp_path / "words")
    out = tmp_path / "screen"
    argv = [str(tiny_bundle), "--calibration", str(words), "--dev", str(words), "-o", str(out),
            "--variants", "entropy320", "entropy320_s8", "entropy320_a16"]
    assert int8_screen.main(argv) == 0
    rows = [json.loads(line) for line in (out / "screen.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["entropy320", "entropy320_s8", "entropy320_a16"]
    for row in rows:
        assert set(row["changed_strings"]) == {"words"} and row["feature_error"]["words"] >= 0
        assert row["ctc_accuracy_drop"] == {"words": None}  # the tiny encoder has no CTC head
        assert Path(row["file"]).is_file()
    assert rows[1]["options"] == {"activations": "int8", "ActivationSymmetric": True}
    assert len(list(out.glob("calibration.*.json"))) == 1  # the three share one calibration
    wide = __import__("onnx").load(rows[2]["file"])
    assert any(i.data_type == 4 for i in wide.graph.initializer if i.name.endswith("zero_point"))  # uint16
    capsys.readouterr()
    assert int8_screen.main(argv) == 0
    assert "already" in capsys.readouterr().out
    assert len((out / "screen.jsonl").read_text().splitlines()) == 3
