"""--decode full|ctc|cascade: the tower's CTC head alone, and the cascade that sends only the
words the gate does not trust through the decoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import cli
from runtime.ctc_reading import ctc_prediction
from runtime.decoding import CharCodec
from runtime.options import OptionError, RecognizerConfig
from runtime.recognizer import Recognizer

SAMPLES = Path(cli.DEFAULT_BUNDLE).parent / "samples"


def test_ctc_prediction_reads_the_best_path() -> None:
    codec = CharCodec("abc")
    frames = np.full((7, 4), 0.01)
    for t, k in enumerate([1, 1, 0, 2, 0, 0, 3]):  # a a _ b _ _ c
        frames[t, k] = 0.97
    frames[1, 1] = 0.9  # the second frame of "a" is less sure: the best frame counts
    frames[1, 3] = 0.07
    prediction = ctc_prediction(codec, np.log(frames), topk=2)
    assert prediction.text == "abc"
    assert prediction.char_probs == pytest.approx([0.97, 0.97, 0.97])
    assert [t[0][0] for t in prediction.topk] == ["a", "b", "c"] and len(prediction.topk[0]) == 2
    assert prediction.char_frames == pytest.approx([0.5, 3.0, 6.0])
    empty = ctc_prediction(codec, np.log(np.full((3, 4), 0.25) + np.eye(3, 4)[:, :1]))
    assert empty.text == "" and empty.char_probs == [] and empty.confidence == 1.0


@pytest.fixture(scope="module")
def readers() -> dict[str, Recognizer]:
    return {mode: Recognizer.from_bundle(llm="none", decode=mode, threads=1) for mode in ("full", "ctc", "cascade")}


def test_modes_read_the_samples(readers: dict[str, Recognizer]) -> None:
    images = sorted(SAMPLES.glob("*.png"))
    for mode, reader in readers.items():
        results = reader.read(images)
        assert [r.text.lower() for r in results] == [p.stem for p in images], mode
        assert all(0.0 < r.confidence <= 1.0 for r in results)
    ctc_stages = readers["ctc"].read(images[:1])[0].timings_ms
    assert ctc_stages["cross_decoder"] == 0.0 and ctc_stages["image_encoder"] > 0.0


def test_cascade_takes_the_decoders_for_unsure_words(readers: dict[str, Recognizer]) -> None:
    """Words whose CTC reading the gate does not trust get the full method's reading."""
    from PIL import Image, ImageFilter

    images = []
    for path in sorted(SAMPLES.glob("*.png")):  # blurred and cut: some words the gate doubts
        sharp = Image.open(path).convert("RGB")
        width, height = sharp.size
        images += [sharp, sharp.filter(ImageFilter.GaussianBlur(3)), sharp.crop((0, height // 3, width, height)),
                   sharp.crop((0, 0, width * 2 // 3, height))]
    full, ctc, cascade = (readers[m].read(images) for m in ("full", "ctc", "cascade"))
    threshold = readers["cascade"].threshold
    unsure = [i for i, r in enumerate(ctc) if not r.text or min(r.char_confidences) < threshold]
    assert 0 < len(unsure) < len(images), "the probe set needs sure and unsure words"
    for i in range(len(images)):
        want = full[i] if i in unsure else ctc[i]
        assert cascade[i].text == want.text and cascade[i].confidence == pytest.approx(want.confidence, rel=1e-5)


def test_decode_needs_a_ctc_head(fake_bundle: Path) -> None:
    with pytest.raises(OptionError, match="--decode ctc needs a bundle whose image encoder has a CTC head"):
        RecognizerConfig(engine=str(fake_bundle), llm="none", decode="ctc").check()
    assert RecognizerConfig(engine=str(fake_bundle), llm="none", decode="full").check()
    with pytest.raises(OptionError, match="unknown decode mode"):
        RecognizerConfig(llm="none", decode="beam").check()


def test_the_decode_mode_defaults_to_the_bundles(fake_bundle: Path, tmp_path: Path) -> None:
    """No --decode: the manifest's ``defaults.decode`` (the embedded bundle's cascade), full
    for a bundle without one or one it cannot read with (no CTC head)."""
    import json
    import shutil

    from runtime.bundle import load_bundle
    from runtime.recognizer import bundle_decode

    assert bundle_decode(load_bundle(None)) == "cascade"
    assert bundle_decode(load_bundle(fake_bundle)) == "full"
    copy = tmp_path / "bundle"
    shutil.copytree(fake_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["defaults"] = {"decode": "ctc"}  # this bundle has no CTC head: ignored
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert bundle_decode(load_bundle(copy, verify=False)) == "full"
    assert RecognizerConfig(engine=str(copy), llm="none").check(verify=False)


def test_the_decode_modes_benchmark_scores_each_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import decode_modes

    labels = tmp_path / "labels.tsv"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")  # left out with a warning; the rest is scored
    labels.write_text("".join(f"{p}\t{p.stem}\n" for p in sorted(SAMPLES.glob("*.png"))) + f"{broken}\tword\n",
                      encoding="utf-8")
    assert decode_modes.main([str(labels), "--modes", "full,ctc"]) == 0
    table = capsys.readouterr().out
    assert "| full: accuracy / ms per crop / texts unlike full |" in table
    row = next(line for line in table.splitlines() if "labels.tsv (8)" in line)
    assert row.count("100.00 / ") == 2 and row.rstrip(" |").endswith("/ 0")
    assert decode_modes.main([str(SAMPLES), "--modes", "ctc"]) == 2
    assert decode_modes.main([str(labels), "--modes", "beam"]) == 2
