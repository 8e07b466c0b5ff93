"""clipllama-batch on a local Ray (2 CPUs): equal to clipllama-run (records and --eval
summary), resumable after a hard interruption with each id exactly once, bad inputs as
error records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shared_data import data_path, require

ray = pytest.importorskip("ray", reason="the serve extra is not installed (pip install 'clipllama[serve]')")

from runtime import cli  # noqa: E402
from serving import batch  # noqa: E402
from serving.parts import part_files, read_records  # noqa: E402
from serving.samples import word_images  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
IC13 = data_path("eval", "ic13", "labels_857.tsv")
#: IC13-857 images compared in CI (0: all 857)
EVAL_COUNT = int(os.environ.get("CLIPLLAMA_BATCH_EVAL_N", "96"))


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _run_records(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, list[dict[str, Any]]]:
    """clipllama-run --json's exit status and lines (timings dropped)."""
    capsys.readouterr()
    status = cli.main([*argv, "--json", "--no-progress"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    return status, [{k: v for k, v in r.items() if k != "timings_ms"} for r in lines]


def _batch_records(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "timings_ms"} for r in read_records(out)]


def _by_id(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    ids = [(r.get("set"), r["source"]) for r in records]
    assert len(set(ids)) == len(ids), "an id is written twice"
    return dict(zip(ids, records))


def _assert_same(got: dict[tuple[str, str], dict[str, Any]], want: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Same ids, same records; the message names the first differing fields."""
    assert set(got) == set(want)
    diffs = {k: {f: (got[k].get(f), v) for f, v in want[k].items() if got[k].get(f) != v}
             for k in want if got[k] != want[k]}
    assert not diffs, f"{len(diffs)} records differ, e.g. {list(diffs.items())[:2]}"


def _words(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i, (_, data) in enumerate(word_images(count, seed=7)):
        (folder / f"w{i:04d}.png").write_bytes(data)
    return folder


def test_ic13_equals_clipllama_run_eval(address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require("eval", "ic13", "labels_857.tsv")
    lines = IC13.read_text(encoding="utf-8").splitlines()[: EVAL_COUNT or None]
    subset = tmp_path / "ic13_857" / "labels.tsv"
    subset.parent.mkdir()
    subset.write_text("".join(f"{IC13.parent / 'images' / line}\n" for line in lines), encoding="utf-8")
    status, want = _run_records(capsys, [str(subset), "--eval"])
    assert status == 0
    out = tmp_path / "out"
    assert batch.main([str(subset), "-o", str(out), "--eval", "--format", "jsonl"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["summary"] == want[-1]["summary"] and summary["summary"]["ic13_857"]["n"] == len(lines)
    got = _by_id(_batch_records(out))
    _assert_same(got, _by_id(want[:-1]))


def test_interrupted_run_resumes_each_id_once(address: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = _words(tmp_path / "words", 240)
    options = ["--batch", "8", "--llm", "none"]
    _, want = _run_records(capsys, [str(folder), *options])
    out = tmp_path / "out"
    argv = [str(folder), "-o", str(out), *options, "--part-size", "16"]
    process = subprocess.Popen([sys.executable, "-m", "serving.batch", *argv, "--address", address],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while len(part_files(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert len(part_files(out)) >= 2, "no part was written in 240 s"
        process.send_signal(signal.SIGKILL)  # a hard stop: no cleanup runs
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    first = _batch_records(out)
    assert 0 < len(first) < len(want)
    assert batch.main(argv) == 0
    assert "already in" in capsys.readouterr().err
    got = _by_id(_batch_records(out))
    assert len(got) == len(want) == 240
    _assert_same(got, _by_id(want))
    assert batch.main(argv) == 0  # a third run finds nothing to do and writes nothing
    assert len(_batch_records(out)) == 240


def test_bad_inputs_are_error_records(address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _words(tmp_path / "imgs", 6)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "empty.jpg").write_bytes(b"")
    listing = tmp_path / "paths.txt"
    listing.write_text("imgs/w0001.png\nimgs/missing.png\n\nimgs/w0004.png\n", encoding="utf-8")
    inputs = [str(folder)]
    lmdb = _lmdb(tmp_path / "lmdb_set")
    if lmdb is not None:
        inputs.append(str(lmdb))
    status, want = _run_records(capsys, [*inputs, "--llm", "none"])
    assert status == 1
    out = tmp_path / "out"
    assert batch.main([*inputs, str(listing), "-o", str(out), "--llm", "none"]) == 1
    got = _by_id(_batch_records(out))
    errors = Counter(r["source"].rsplit("/", 1)[-1] for r in got.values() if r["error"])
    expected = {"broken.png", "empty.jpg", "missing.png"} | ({"lmdb_set#3"} if lmdb else set())
    assert set(errors) == expected and set(errors.values()) == {1}
    listed = str(tmp_path / "imgs" / "missing.png")
    assert "no such file" in got[(None, listed)]["error"]
    _assert_same({k: v for k, v in got.items() if k != (None, listed)}, _by_id(want))


def _lmdb(root: Path) -> Path | None:
    """A 4-sample LMDB set (the third image empty), or None without the lmdb package."""
    try:
        import lmdb
    except ImportError:
        return None
    env = lmdb.open(str(root), map_size=1 << 24)
    images = word_images(4, seed=3)
    with env.begin(write=True) as txn:
        txn.put(b"num-samples", b"4")
        for i, (word, data) in enumerate(images, 1):
            txn.put(b"image-%09d" % i, b"" if i == 3 else data)
            txn.put(b"label-%09d" % i, word.encode())
    env.close()
    return root


def test_fuzz_corpus_one_record_per_file(address: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The bad-input corpus (tests/fuzz_corpus.py) with the default bundle: one record per
    file, an error exactly for each bad one, every good one read; each failure named on stderr."""
    from fuzz_corpus import make_corpus

    corpus = make_corpus(tmp_path / "fuzz")
    out = tmp_path / "out"
    capsys.readouterr()
    status = batch.main([str(tmp_path / "fuzz"), "-o", str(out), "--llm", "none", "--address", address])
    err = capsys.readouterr().err
    assert status == 1
    got = {r["source"]: r for r in _batch_records(out)}
    assert len(got) == len(corpus)
    for entry in corpus:
        assert (got[str(entry.path)]["error"] is None) == entry.readable, (entry.kind, got[str(entry.path)]["error"])
    bad = sorted(str(e.path) for e in corpus if not e.readable)
    assert sorted(line.split(": ")[1] for line in err.splitlines() if line.startswith("error: ")) == bad
    assert f"{len(bad)} input(s) could not be read" in err


def test_options_are_checked_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 points 2 and 4: a bad threshold, a missing GGUF file, a missing input: one line
    each, exit 2, and Ray is never started."""
    monkeypatch.setattr(batch, "_run_on_ray", lambda *a: pytest.fail("Ray was started"))
    words = _words(tmp_path / "w", 2)
    for argv, message in ((["--threshold", "2"], "argument --threshold: 2 is not within [0, 1]"),
                          (["--llm", "/nonexistent.gguf"], "--llm /nonexistent.gguf: no such GGUF file"),
                          (["--threads", "0"], "--threads must be at least 1")):
        assert batch.main([str(words), "-o", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert batch.main([str(tmp_path / "missing.png"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {tmp_path / 'missing.png'}: no such file or folder", "error: no inputs to read"]


def test_rerun_with_nothing_left_starts_no_ray(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 point 6: every id already written: the rerun says so and exits 0 without Ray."""
    from serving.parts import PartWriter

    words = _words(tmp_path / "w", 3)
    out = tmp_path / "out"
    PartWriter(out, "jsonl").write([{"source": str(p), "text": "x", "error": None} for p in sorted(words.iterdir())])
    monkeypatch.setattr(batch, "_run_on_ray", lambda *a: pytest.fail("Ray was started"))
    assert batch.main([str(words), "-o", str(out)]) == 0
    assert "0 to read, 3 already in" in capsys.readouterr().err


def test_a_failure_inside_ray_is_one_line(address: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 25: an error raised in the recognizer actors (here the CUDA backend asked for on a
    machine without a GPU, which only building the recognizer finds) reaches the user as one
    line, exit 2; a bundle whose files changed is refused before Ray starts."""
    import shutil

    from runtime.backends import gpu_status
    from runtime.bundle import DEFAULT_BUNDLE

    words = _words(tmp_path / "w", 2)
    if gpu_status().compute_capability is None:
        capsys.readouterr()
        status = batch.main([str(words), "-o", str(tmp_path / "o"), "--backend", "ort-cuda", "--llm", "none",
                             "--address", address])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert status == 2 and len(err) == 1 and "Traceback" not in err[0], err
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    with (bundle / "bpe_simple_vocab_16e6.txt.gz").open("ab") as handle:
        handle.write(b"changed")
    assert batch.main([str(words), "-o", str(tmp_path / "o2"), "--engine", str(bundle), "--llm", "none"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "corrupt or modified" in err[0]
