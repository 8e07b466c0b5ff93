"""benchmarks.common and benchmarks.peers: set reading, statistics, interleaving, tables,
the installed peers on a few IC13 crops, and this project's row on the tiny bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from shared_data import data_path, require

from benchmarks import peers
from benchmarks.common import load_set, markdown_table, paired_ratio, percentile, rotate, set_name
from benchmarks.readers import LOADERS, Missing, Reader, find_tessdata
from runtime.inputs import InputError

IC13 = data_path("eval", "ic13", "labels_857.tsv")


def _write_set(root: Path, labels: dict[str, str], broken: tuple[str, ...] = ()) -> Path:
    (root / "images").mkdir(parents=True)
    for name in labels:
        if name in broken:
            (root / "images" / name).write_bytes(b"not a png")
        else:
            Image.new("RGB", (40, 12), (200, 200, 200)).save(root / "images" / name)
    (root / "labels.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in labels.items()))
    return root


def test_load_set_applies_protocol_and_reports_unreadable(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "words", {"a.png": "Hello", "b.png": "x" * 26, "c.png": "bad", "d.png": "ok"},
                      broken=("c.png",))
    data = load_set(root)
    assert data.name == "words"
    assert data.labels == ["Hello", "ok"] and len(data.images) == 2
    assert data.dropped == 1 and len(data.unreadable or []) == 1
    assert len(load_set(root, limit=1)) == 1


def test_load_set_refuses_unlabelled_input(tmp_path: Path) -> None:
    (tmp_path / "loose").mkdir()
    with pytest.raises(InputError, match="not a labelled set"):
        load_set(tmp_path / "loose")


def test_set_names() -> None:
    assert set_name("/d/eval/ic13/labels_857.tsv") == "ic13_857"
    assert set_name("/d/eval/svt_test_647/labels.tsv") == "svt_test_647"
    assert set_name("/d/eval/misc_real") == "misc_real"


def test_statistics() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0, 10], 95) == pytest.approx(9.5)
    assert math.isnan(percentile([], 50))
    assert paired_ratio([2, 4, 30], [1, 2, 3]) == 2.0  # median of 2, 2, 10
    assert rotate([1, 2, 3], 4) == [2, 3, 1]


def test_markdown_table_aligns_numbers() -> None:
    text = markdown_table(["name", "acc"], [["a", "1.5"], ["b", "-"]])
    assert text.splitlines()[1] == "| --- | ---: |"


def _fake(key: str, log: list[str], answer: str | None = None, fail_on: int | None = None) -> Reader:
    calls = {"n": 0}

    def read(image: Image.Image) -> str:
        calls["n"] += 1
        log.append(key)
        if fail_on is not None and calls["n"] == fail_on:
            raise RuntimeError("boom")
        return answer if answer is not None else image.info.get("label", "")

    return Reader(key, key.upper(), read, "0")


def _eval_set(tmp_path: Path, labels: list[str]) -> peers.EvalSet:
    root = _write_set(tmp_path / "s", {f"{i}.png": label for i, label in enumerate(labels)})
    data = load_set(root)
    for image, label in zip(data.images, data.labels):
        image.info["label"] = label
    return data


def test_run_set_interleaves_and_counts_failures(tmp_path: Path) -> None:
    data = _eval_set(tmp_path, ["one", "two", "three"])
    log: list[str] = []
    readers = [_fake("good", log), _fake("bad", log, answer="x", fail_on=2)]
    run = peers.run_set(readers, data, warmup=0)
    assert log == ["good", "bad", "bad", "good", "good", "bad"]  # the order rotates per image
    assert run["good"]["texts"] == ["one", "two", "three"]
    assert run["bad"]["errors"] == 1 and math.isnan(run["bad"]["ms"][1])
    summary = peers.summarise(readers, {"gone": "not installed"}, [data], [run], "good")
    rows = {r["key"]: r for r in summary["readers"]}
    assert rows["good"]["total"]["accuracy"] == 100.0
    assert rows["bad"]["total"]["accuracy"] == 0.0 and rows["bad"]["total"]["errors"] == 1
    assert rows["good"]["total"]["ratio_to_baseline"] == 1.0
    assert rows["gone"]["status"] == "missing" and "total" not in rows["gone"]
    text = peers.table(summary, [data])
    assert "| gone | missing | - |" in text and "gone: missing: not installed" in text
    assert "0.0" not in text.split("| gone |")[1].splitlines()[0]  # missing is not scored as zero


def test_main_reports_missing_project_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write_set(tmp_path / "s", {"a.png": "a"})
    status = peers.main([str(root), "--readers", "project", "--engine", str(tmp_path / "nowhere"), "--json"])
    out = capsys.readouterr()
    assert status == 2 and "no bundle at" in out.err
    document = json.loads(out.out.strip().splitlines()[-1])
    assert document["readers"][0]["status"] == "missing"


def test_main_bad_set_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert peers.main([str(tmp_path / "missing.tsv"), "--readers", "tesseract"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("key", sorted(LOADERS))
def test_installed_peer_reads_ic13(key: str) -> None:
    require("eval", "ic13", "labels_857.tsv")
    try:
        reader = LOADERS[key](threads=1)
    except Missing as exc:
        pytest.skip(f"{key} is not installed here: {exc}")
    data = load_set(IC13, limit=8)
    run = peers.run_set([reader], data, warmup=1)
    reader.close()
    summary = peers.summarise([reader], {}, [data], [run], None)
    total = summary["readers"][0]["total"]
    assert total["n"] == 8 and total["errors"] == 0
    # the first crops are large, clean words: every peer reads some (Tiredness, kills, ...)
    assert total["accuracy"] >= 25.0 and total["median_ms"] > 0


def test_find_tessdata_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "eng.traineddata").write_bytes(b"")
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))
    assert find_tessdata() == str(tmp_path) + "/"


def test_project_row_on_tiny_bundle(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write_set(tmp_path / "s", {"a.png": "word", "b.png": "text"})
    status = peers.main([str(root), "--readers", "project", "--engine", str(tiny_bundle), "--threads", "1",
                         "--warmup", "1", "--json"])
    out = capsys.readouterr().out
    assert status == 0
    document = json.loads(out.strip().splitlines()[-1])
    row = document["readers"][0]
    assert row["status"] == "ok" and row["total"]["n"] == 2 and row["total"]["errors"] == 0
    assert row["total"]["ratio_to_baseline"] == 1.0 and document["baseline"] == "project"
    assert "this project (ort-cpu fp32, no LLM)" in out
