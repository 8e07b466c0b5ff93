"""benchmarks.peers --isolated (each reader in its own process, timed there) and
benchmarks.latency's thread-count list, on the tiny random bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import labelled_folder

from benchmarks import latency, peers


def test_isolated_reader_runs_in_its_own_process(tiny_bundle: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = labelled_folder(tmp_path / "s")
    status = peers.main([str(root), "--readers", "project", "--engine", str(tiny_bundle), "--threads", "1",
                         "--warmup", "1", "--isolated", "--json"])
    out = capsys.readouterr().out
    assert status == 0
    document = json.loads(out.strip().splitlines()[-1])
    row = document["readers"][0]
    assert row["status"] == "ok" and row["info"]["process"] == "own" and "[own process]" in row["name"]
    assert row["total"]["n"] == 3 and row["total"]["errors"] == 0 and row["total"]["median_ms"] > 0
    assert document["settings"]["isolated"] is True


def test_isolated_reader_that_cannot_load_is_missing(tmp_path: Path) -> None:
    from benchmarks.isolated import load_isolated

    args = argparse.Namespace(engine=str(tmp_path / "no_bundle"), llm="default", llm_mode="rescore", threads=1,
                              backend="auto", precision=None, other_engine=None)
    readers, missing = load_isolated(["project"], args)
    assert readers == [] and "no bundle" in missing["project"]


def test_parse_threads() -> None:
    assert latency.parse_threads("default,1,2,1") == [None, 1, 2]
    assert latency.parse_threads("0") == [None]
    for bad in ("", "a", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            latency.parse_threads(bad)
