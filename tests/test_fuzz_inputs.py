"""The bad-input corpus (tests/fuzz_corpus.py: a few hundred files of 27 kinds, made from a
seed) through :meth:`Recognizer.read` and ``clipllama-run``: no crash, no hang, exactly one
error record per bad file, every good file of the same run read. ``clipllama-batch`` and
``POST /read`` read the same corpus in tests/test_batch.py and tests/test_serve.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fuzz_corpus import Entry, make_corpus

from runtime import cli
from runtime.bundle import load_bundle
from runtime.recognizer import Recognizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Entry]:
    return make_corpus(tmp_path_factory.mktemp("fuzz"))


def test_the_corpus_is_what_it_says(corpus: list[Entry]) -> None:
    kinds = {e.kind for e in corpus}
    assert len(corpus) >= 250 and len(kinds) >= 25
    assert {e.kind for e in corpus if not e.readable} >= {"random_bytes", "truncated_png", "truncated_jpeg",
                                                          "truncated_webp", "truncated_tiff", "truncated_gif",
                                                          "zero_size_png", "huge_header_png", "decompression_bomb"}
    assert {e.kind for e in corpus if e.readable} >= {"cmyk_jpeg", "png16", "palette_png", "animated_gif",
                                                      "exif_rotated_jpeg", "one_by_n", "n_by_one"}
    assert make_corpus(corpus[0].path.parent.parent / "again")[5].path.read_bytes() == corpus[5].path.read_bytes()


def _check(results: list, corpus: list[Entry], names: list[str]) -> None:
    assert [r.source for r in results] == names
    for result, entry, name in zip(results, corpus, names):
        if entry.readable:
            assert result.ok, (entry.kind, result.error)
            assert isinstance(result.text, str) and result.confidence is not None
            if entry.word is not None:
                assert result.text == entry.word
        else:
            assert not result.ok and result.text is None, entry.kind
            assert name in result.error, (name, result.error)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_recognizer_reads_paths(fake_recognizer, corpus: list[Entry], batch_size: int) -> None:
    results = fake_recognizer().read([e.path for e in corpus], batch_size=batch_size)
    _check(results, corpus, [str(e.path) for e in corpus])


def test_recognizer_reads_bytes(fake_recognizer, corpus: list[Entry]) -> None:
    results = fake_recognizer().read([e.path.read_bytes() for e in corpus])
    _check(results, corpus, [f"<bytes {i}>" for i in range(len(corpus))])


def _run(fake_bundle: Path, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str], list[str]]:
    from conftest import FakeBackend

    def make(args, bundle):
        return Recognizer(load_bundle(fake_bundle), FakeBackend(), None, args.threshold, args.llm_mode)

    status = cli.main(["--engine", str(fake_bundle), "--no-progress", *argv], make_recognizer=make)
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def test_clipllama_run_json(fake_bundle: Path, corpus: list[Entry], capsys: pytest.CaptureFixture) -> None:
    status, out, err = _run(fake_bundle, capsys, "--json", str(corpus[0].path.parent))
    assert status == 1  # some inputs could not be read
    records = {r["source"]: r for r in map(json.loads, out)}
    assert len(out) == len(records) == len(corpus)
    for entry in corpus:
        record = records[str(entry.path)]
        assert (record["error"] is None) == entry.readable, (entry.kind, record["error"])
        if entry.word is not None:
            assert record["text"] == entry.word
    bad = [e for e in corpus if not e.readable]
    assert len([line for line in err if line.startswith("error: ")]) == len(bad)
    assert all(line.startswith(("error: ", "note: ")) for line in err), [x for x in err if "error" not in x][:3]


def test_clipllama_run_plain(fake_bundle: Path, corpus: list[Entry], capsys: pytest.CaptureFixture) -> None:
    status, out, err = _run(fake_bundle, capsys, *[str(e.path) for e in corpus])
    assert status == 1
    good = [e for e in corpus if e.readable]
    assert [line.split("\t")[0] for line in out] == [str(e.path) for e in good]
    assert all(len(line.split("\t")) == 3 for line in out)
    assert sorted(line.split(": ")[1] for line in err if line.startswith("error: ")) == sorted(
        str(e.path) for e in corpus if not e.readable)
