"""``clipllama-run``: inputs (files, folders, TSV and LMDB sets), output formats, --eval, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import FakeBackend, FakeCorrector, barcode
from shared_data import data_path, require

from runtime import cli
from runtime.bundle import load_bundle
from runtime.inputs import InputError, LmdbSamples, collect_inputs, open_input
from runtime.recognizer import Recognizer


def _png(word: str, blur: dict[int, float] | None = None) -> bytes:
    buffer = io.BytesIO()
    barcode(word, blur).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def run_cli(fake_bundle: Path, capsys: pytest.CaptureFixture):
    """Run ``main`` on the fake bundle and backend; returns (status, stdout lines, stderr)."""

    def run(*argv: str, corrector=None):
        def make(args, bundle):
            return Recognizer(load_bundle(fake_bundle), FakeBackend(), corrector, args.threshold, args.llm_mode)

        status = cli.main(["--engine", str(fake_bundle), *argv], make_recognizer=make)
        out, err = capsys.readouterr()
        return status, [_without_confidence(line) for line in out.splitlines()], err

    return run


def _without_confidence(line: str) -> str:
    """A plain output line less its confidence column (JSON lines unchanged)."""
    source, sep, rest = line.rpartition("\t")
    if sep and source.count("\t") == 1 and rest.replace(".", "", 1).isdigit():
        return source
    return line


@pytest.fixture
def folder_set(tmp_path: Path) -> Path:
    """A set folder: images/ + labels.tsv; 'coffee' is blurred (gated), 'toolong' over 25 chars."""
    root = tmp_path / "myset"
    (root / "images").mkdir(parents=True)
    rows = [("a.png", "hello", "hello", None), ("b.png", "World", "world", None),
            ("c.png", "coffee", "coffee", {1: 0.5}), ("d.png", "wrong", "right", None),
            ("e.png", "x" * 26, "x" * 26, None)]
    for name, word, _, blur in rows:
        (root / "images" / name).write_bytes(_png(word.lower(), blur))
    (root / "labels.tsv").write_text("".join(f"{name}\t{label}\n" for name, _, label, _ in rows))
    return root


def _write_lmdb(path: Path, items: list[tuple[bytes, str]]) -> None:
    lmdb = pytest.importorskip("lmdb", reason="the lmdb package is not installed")
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (image, label) in enumerate(items, 1):
            txn.put(b"image-%09d" % i, image)
            txn.put(b"label-%09d" % i, label.encode())
        txn.put(b"num-samples", str(len(items)).encode())
    env.close()


def test_plain_output_files_and_directory(run_cli, tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    for word in ("one", "two"):
        (tmp_path / "dir" / f"{word}.png").write_bytes(_png(word))
    (tmp_path / "dir" / "notes.txt").write_text("ignored: not an image name")
    single = tmp_path / "three.png"
    single.write_bytes(_png("three"))
    status, out, err = run_cli(str(single), str(tmp_path / "dir"))
    assert status == 0, err
    assert out == [f"{single}\tthree", f"{tmp_path / 'dir' / 'one.png'}\tone", f"{tmp_path / 'dir' / 'two.png'}\ttwo"]


def test_json_output_and_failed_inputs(run_cli, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(_png("good"))
    bad.write_bytes(b"not a png")
    status, out, err = run_cli("--json", str(good), str(bad), str(tmp_path / "missing.png"))
    assert status == 1
    records = [json.loads(line) for line in out]
    assert [r["source"] for r in records] == [str(good), str(bad)]
    assert records[0]["text"] == "good" and records[0]["error"] is None
    assert "timings_ms" in records[0] and "char_confidences" in records[0]
    assert "not an image" in records[1]["error"]
    assert f"error: {tmp_path / 'missing.png'}: no such file or folder" in err  # named when listed
    assert err.count("error:") == 2
    status, out, err = run_cli(str(good), str(bad))
    assert status == 1 and out == [f"{good}\tgood"] and "not an image" in err


def test_eval_summary_for_folder_tsv_and_lmdb(run_cli, folder_set: Path, tmp_path: Path) -> None:
    lmdb_dir = tmp_path / "lmdbset"
    _write_lmdb(lmdb_dir, [(_png("abc"), "ABC"), (_png("abd"), "abc"), (b"broken", "zzz")])
    tsv = tmp_path / "extra.tsv"
    (tmp_path / "pic.png").write_bytes(_png("pic"))
    tsv.write_text("pic.png\tpic\n")
    status, out, err = run_cli("--eval", str(folder_set), str(lmdb_dir), str(tsv), corrector=FakeCorrector())
    assert status == 1  # the broken LMDB image
    summary = json.loads(out[-1])["summary"]
    assert set(summary) == {"myset", "lmdbset", f"{tmp_path.name}/extra"}
    mine = summary["myset"]
    # the 26-character label is dropped by the protocol; 'wrong' vs 'right' is the one miss
    assert mine["n"] == 4 and mine["gate_rate"] == pytest.approx(25.0)
    assert mine["llm_changed"] == 1 and mine["llm_broke"] + mine["llm_fixed"] == 1
    # hello, World (case-insensitive protocol) right; coffee right only if the LLM fixed it
    assert mine["accuracy"] == pytest.approx(75.0 if mine["llm_fixed"] else 50.0)
    assert set(mine) >= {"n", "accuracy", "ned", "gate_rate", "llm_changed", "llm_fixed", "llm_broke"}
    lm = summary["lmdbset"]
    assert lm["n"] == 3 and lm["accuracy"] == pytest.approx(100 / 3) and lm["errors"] == 1
    assert summary[f"{tmp_path.name}/extra"]["accuracy"] == 100.0
    assert f"{lmdb_dir}#3" in err
    assert len(out) == 4 + 2 + 1 + 1  # read lines (broken one on stderr) + summary


def test_llm_fixed_and_broke_are_counted(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "images").mkdir(parents=True)
    # the decoder is unsure between 'o' and 'p' at position 1 of both words
    (root / "images" / "1.png").write_bytes(_png("coffee", {1: 0.5}))
    (root / "images" / "2.png").write_bytes(_png("cpffee", {1: -0.5}))
    (root / "labels.tsv").write_text("1.png\tcoffee\n2.png\tcpffee\n")
    plain = json.loads(run_cli("--eval", str(root))[1][-1])["summary"]["s"]
    assert plain["gate_rate"] == 100.0 and plain["llm_changed"] == 0
    status, out, _ = run_cli("--eval", "--json", str(root), corrector=FakeCorrector())
    summary = json.loads(out[-1])["summary"]["s"]
    records = [json.loads(line) for line in out[:-1]]
    assert status == 0 and all(r["set"] == "s" and r["label"] for r in records)
    assert summary["llm_changed"] == 2
    assert summary["llm_fixed"] == sum(r["vision_text"] != r["label"] and r["text"] == r["label"] for r in records)
    assert summary["llm_broke"] == sum(r["vision_text"] == r["label"] and r["text"] != r["label"] for r in records)
    assert summary["llm_fixed"] + summary["llm_broke"] == 2


def test_threshold_option_reaches_the_gate(run_cli, folder_set: Path) -> None:
    summary = json.loads(run_cli("--eval", "--threshold", "0.1", str(folder_set))[1][-1])["summary"]
    assert summary["myset"]["gate_rate"] == 0.0


def test_exit_code_2_cases(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "empty").mkdir()
    status, _, err = run_cli(str(tmp_path / "empty"))
    assert status == 2 and "no inputs" in err
    assert run_cli("--batch", "0", str(tmp_path))[0] == 2
    assert run_cli("--backend", "magic", str(tmp_path))[0] == 2
    assert cli.main([]) == 2
    monkeypatch.setattr(cli, "DEFAULT_BUNDLE", tmp_path / "no_bundle")
    image = tmp_path / "x.png"
    image.write_bytes(_png("x"))
    assert cli.main([str(image)]) == 2
    assert "no default bundle is installed" in capsys.readouterr().err
    assert cli.main(["--engine", str(tmp_path / "missing_bundle"), str(image)]) == 2
    assert "no such bundle" in capsys.readouterr().err
    bad = tmp_path / "bad_bundle"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"schema_version": 9}))
    assert cli.main(["--engine", str(bad), str(image)]) == 2
    assert "unknown schema version 9" in capsys.readouterr().err


def test_help_documents_exit_codes(capsys) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("exit status", "0  every input", "1  some inputs", "2  nothing could run", "--llm-mode",
                   "--backend", "--eval", "--json"):
        assert needle in text


def test_bad_label_file_is_reported_and_the_rest_read(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    good = tmp_path / "g.png"
    good.write_bytes(_png("g"))
    status, out, err = run_cli(str(bad), str(good))
    assert status == 1 and out == [f"{good}\tg"] and "expected 'filename<TAB>label'" in err


def test_progress_bar_only_for_long_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli._progress(cli.PROGRESS_FROM, True) is None
    assert cli._progress(1000, False) is None
    bar = cli._progress(1000, True)
    assert bar is not None
    bar.close()


# -- input listing --------------------------------------------------------------------------------


def test_lmdb_reader(tmp_path: Path) -> None:
    _write_lmdb(tmp_path / "db", [(b"img1", "first"), (b"img2", "second")])
    samples = LmdbSamples(tmp_path / "db")
    assert len(samples) == 2
    assert samples[0].label == "first" and samples[0].data == b"img1" and samples[-1].label == "second"
    assert [s.source for s in samples[0:2]] == [f"{tmp_path / 'db'}#1", f"{tmp_path / 'db'}#2"]
    with pytest.raises(IndexError):
        samples[2]
    opened = open_input(tmp_path / "db")
    assert opened.name == "db" and opened.labelled


def test_lmdb_without_count_is_an_input_error(tmp_path: Path) -> None:
    _write_lmdb(tmp_path / "db", [])
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(tmp_path / "db"))
    with env.begin(write=True) as txn:
        txn.delete(b"num-samples")
    env.close()
    with pytest.raises(InputError, match="num-samples"):
        LmdbSamples(tmp_path / "db")


def test_lmdb_missing_package_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(InputError, match="needs the lmdb package"):
        LmdbSamples(tmp_path)


def test_tsv_names_and_locations(tmp_path: Path) -> None:
    (tmp_path / "ic13" / "images").mkdir(parents=True)
    (tmp_path / "ic13" / "labels_857.tsv").write_text("word_1.png\tTiredness\n\nword_2.png\tkills\n")
    opened = open_input(tmp_path / "ic13" / "labels_857.tsv")
    assert opened.name == "ic13/labels_857" and opened.labelled
    assert [s.label for s in opened.samples] == ["Tiredness", "kills"]
    assert opened.samples[0].source == str(tmp_path / "ic13" / "images" / "word_1.png")
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(_png(name[0]))
    sets = collect_inputs([tmp_path / "a.png", tmp_path / "ic13" / "labels_857.tsv", tmp_path / "b.png"])
    assert [s.name for s in sets] == [None, "ic13/labels_857"] and len(sets[0].samples) == 2


def test_real_data_set_lists(tmp_path: Path) -> None:
    """The shared evaluation sets list as the CLI expects (labels only; no image is copied)."""
    require("eval", "ic13", "labels_857.tsv")
    root = data_path("eval")
    opened = open_input(root / "ic13" / "labels_857.tsv")
    assert len(opened.samples) == 857 and Path(opened.samples[0].source).is_file()
    assert len(open_input(root / "misc_real").samples) == 26


# -- issue 13: what a new user meets -------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (only the header is ever read)."""
    import struct
    import zlib

    data = bytearray(_png("x"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_one_pixel_limit_one_message(run_cli, tmp_path: Path) -> None:
    """Point 11: over the limit, over Pillow's warning level and over its error level: the
    same limit and the same message for all three."""
    paths = []
    for width, height in ((8000, 6000), (12000, 8000), (20000, 10000)):  # 48M, 96M, 200M pixels
        path = tmp_path / f"big_{width}.png"
        path.write_bytes(_png_claiming(width, height))
        paths.append(path)
    status, out, err = run_cli("--json", *map(str, paths))
    assert status == 1
    errors = [json.loads(line)["error"] for line in out]
    for (width, height), error in zip(((8000, 6000), (12000, 8000), (20000, 10000)), errors):
        assert error.endswith(f": {width * height} pixels, over the 40000000-pixel limit (40 megapixels)"), error


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_must_be_positive(run_cli, tmp_path: Path, threads: str) -> None:
    """Point 11: --threads 0 or negative is refused, not silently accepted."""
    image = tmp_path / "x.png"
    image.write_bytes(_png("x"))
    status, out, err = run_cli("--threads", threads, str(image))
    assert status == 2 and out == [] and "--threads must be at least 1" in err


def test_folder_says_what_it_skipped_and_recursive_reads_subfolders(run_cli, tmp_path: Path) -> None:
    """Point 11: files that are not images and subfolders are counted; --recursive reads them."""
    folder = tmp_path / "crops"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png("a"))
    (folder / "readme.txt").write_text("not an image")
    (folder / "sub" / "b.png").write_bytes(_png("b"))
    status, out, err = run_cli(str(folder))
    assert status == 0 and out == [f"{folder / 'a.png'}\ta"]
    assert f"note: {folder}: skipped 1 file with no image suffix and 1 subfolder (--recursive reads them)" in err
    status, out, err = run_cli("--recursive", str(folder))
    assert status == 0 and out == [f"{folder / 'a.png'}\ta", f"{folder / 'sub' / 'b.png'}\tb"]
    assert "skipped 1 file with no image suffix" in err and "subfolder" not in err


def test_engine_pointing_at_a_file(tmp_path: Path, capsys) -> None:
    """Point 12: --engine FILE says it wants the bundle's folder (not "no such bundle directory")."""
    image = tmp_path / "x.png"
    image.write_bytes(_png("x"))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    assert cli.main(["--engine", str(model), str(image)]) == 2
    err = capsys.readouterr().err
    assert "is a file; --engine takes a bundle directory" in err and "no such bundle" not in err


@pytest.mark.parametrize("kind", ["missing", "not_gguf"])
def test_unusable_llm_is_one_message(fake_bundle: Path, tmp_path: Path, capsys, caplog, kind: str) -> None:
    """Point 10: --llm naming a file that cannot be used is refused in one line (exit 2);
    runtime.llm's own "LLM correction disabled" line is not printed as well."""
    image = tmp_path / "x.png"
    image.write_bytes(_png("x"))
    model = tmp_path / "model.gguf"
    if kind == "not_gguf":
        model.write_bytes(b"this is not a GGUF file" * 10)
    assert cli.main(["--engine", str(fake_bundle), "--llm", str(model), str(image)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --llm {model}: "), lines
    assert ("no such GGUF file" if kind == "missing" else "not a GGUF file") in lines[0]
    assert "--llm none" in lines[0]
    assert not [r for r in caplog.records if "LLM correction disabled" in r.getMessage()]


def test_json_records_name_the_backend(run_cli, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(_png("x"))
    status, out, _ = run_cli("--json", str(image))
    assert status == 0 and json.loads(out[0])["backend"] == "fake fp32"


@pytest.mark.parametrize(("gpu_absent", "as_json", "shown"), [(False, False, True), (True, False, False),
                                                             (True, True, True)])
def test_backend_notes_on_stderr(fake_bundle: Path, tmp_path: Path, capsys, gpu_absent: bool, as_json: bool,
                                 shown: bool) -> None:
    """Points 2-4: why a faster backend was not used reaches the user, one line each (quiet on a
    machine with no NVIDIA GPU unless --json)."""
    image = tmp_path / "x.png"
    image.write_bytes(_png("x"))

    def make(args, bundle):
        backend = FakeBackend()
        backend.notes = ["onnxruntime could not start TensorrtExecutionProvider; running on ort-cuda",
                         "TensorRT engine trt/a.engine not usable here (the NVIDIA driver is too old)"]
        backend.gpu_absent = gpu_absent
        return Recognizer(load_bundle(fake_bundle), backend, None)

    argv = ["--engine", str(fake_bundle), *(["--json"] if as_json else []), str(image)]
    assert cli.main(argv, make_recognizer=make) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: backend fake:")]
    assert len(notes) == (2 if shown else 0)
