"""``--precision int8+fp32``: int8 graphs first, the crops whose int8 CTC reading is unsure
encoded again in fp32; the threshold comes from the manifest (``export.recheck`` chooses it
on validation sets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from export import recheck
from runtime import backends
from runtime.backends import RECHECKED, RecheckedBackend, recheck_threshold, select_backend
from runtime.bundle import DEFAULT_BUNDLE, BundleError, load_bundle
from runtime.recognizer import Recognizer

SAMPLES = Path(DEFAULT_BUNDLE).parent / "samples"


def _crops() -> list[Image.Image]:
    """The samples as they are, blurred and cut: words read with every kind of confidence."""
    out = []
    for path in sorted(SAMPLES.glob("*.png")):
        sharp = Image.open(path).convert("RGB")
        width, height = sharp.size
        out += [sharp, sharp.filter(ImageFilter.GaussianBlur(2)), sharp.crop((0, height // 4, width, height)),
                sharp.crop((0, 0, width * 3 // 4, height))]
    return out


def _reader(below: float | None, precision: str) -> Recognizer:
    bundle = load_bundle(DEFAULT_BUNDLE)
    backend = select_backend(bundle, "ort-cpu", precision, threads=1)
    if below is not None:
        backend.below_confidence = below  # 1.01: every crop, whatever its confidence
    # one view: the extra views of doubtful crops are encoded in fp32 under int8+fp32 whatever the
    # threshold, so with them "nothing read again" is not the int8 reading (on a CPU with VNNI
    # a blurred "Coffee" reads "Coftee" in int8 and "Cottee" from its fp32 views)
    return Recognizer(bundle, backend, views="off")


@pytest.fixture(scope="module")
def readings() -> dict[str, list]:
    crops = _crops()
    out = {}
    for key, below, precision in (("fp32", None, "fp32"), ("int8", None, "int8"),
                                  ("all", 1.01, RECHECKED), ("none", 0.0, RECHECKED), ("half", 0.9, RECHECKED)):
        with _reader(below, precision) as reader:
            out[key] = reader.read(crops)
    with _reader(None, "int8") as reader:
        reader.decode = "ctc"
        out["int8_ctc"] = reader.read(crops)
    return out


def test_threshold_bounds_give_the_pure_precisions(readings: dict[str, list]) -> None:
    """Everything read again is the fp32 reading; nothing read again (but empty words) the int8 one."""
    assert [r.text for r in readings["all"]] == [r.text for r in readings["fp32"]]
    expected = [f.text if not c.text else i.text
                for f, i, c in zip(readings["fp32"], readings["int8"], readings["int8_ctc"])]
    assert [r.text for r in readings["none"]] == expected
    assert all(r.timings_ms["image_encoder_recheck"] > 0 for r in readings["all"])
    assert readings["all"][0].ok and all(r.ok for r in readings["half"])


def test_unsure_crops_take_the_fp32_reading(readings: dict[str, list]) -> None:
    again = [not c.text or c.confidence < 0.9 for c in readings["int8_ctc"]]
    assert any(again) and not all(again), "the crops should hold both sure and unsure words"
    for i, redo in enumerate(again):
        source = readings["fp32"] if redo else readings["int8"]
        assert readings["half"][i].text == source[i].text, i
        assert readings["half"][i].confidence == pytest.approx(source[i].confidence, abs=1e-5), i


def test_the_threshold_is_the_manifests(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: False)  # as on the CPU the graph was chosen on
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert backends.cpu_precision(bundle) == RECHECKED  # the embedded bundle's CPU default
    assert 0.0 < recheck_threshold(bundle) < 1.0
    chosen = select_backend(bundle, "auto", None, threads=1)
    assert isinstance(chosen, RecheckedBackend) and chosen.precision == RECHECKED
    chosen.close()
    del bundle.manifest["defaults"]["int8_recheck"]
    with pytest.raises(BundleError, match="int8_recheck"):
        recheck_threshold(bundle)
    assert backends.cpu_precision(bundle) == "fp32"  # no threshold: not the default
    bundle.manifest["defaults"]["int8_recheck"] = {"below_confidence": 1.5}
    with pytest.raises(BundleError, match="below_confidence"):
        recheck_threshold(bundle)
    with pytest.raises(BundleError, match="int8 and fp32"):
        recheck_threshold(load_bundle(fake_bundle))
    bundle.manifest["defaults"]["int8_recheck"] = {"below_confidence": 0.5}
    with pytest.raises(backends.BackendError, match="CPU provider"):
        select_backend(bundle, "ort-cuda", RECHECKED)


def _readings(name: str, fp32: list[str], int8: list[str], conf: list[float]) -> recheck.SetReadings:
    return recheck.SetReadings(name, list(fp32), fp32, int8, conf, [False] * len(conf))


def test_the_smallest_threshold_that_holds_is_chosen() -> None:
    # fp32 reads all four; int8 misses the crops its CTC head was 0.55 and 0.92 sure of
    a = _readings("a", ["w", "x", "y", "z"], ["w", "q", "y", "q"], [0.99, 0.55, 0.97, 0.92])
    choice = recheck.choose_threshold([a], tolerance=0.0, grid=(0.5, 0.6, 0.93, 0.98))
    assert choice["below_confidence"] == 0.93
    assert choice["sets"]["a"]["int8+fp32"] == 100.0 and choice["sets"]["a"]["read_again_pct"] == 50.0
    assert [t["holds"] for t in choice["tried"]] == [False, False, True]
    loose = recheck.choose_threshold([a], tolerance=30.0, grid=(0.5, 0.6, 0.93))
    assert loose["below_confidence"] == 0.6  # one miss of four (25 points) is tolerated
    with pytest.raises(recheck.RecheckError, match="no threshold"):
        recheck.choose_threshold([a], tolerance=0.0, grid=(0.5, 0.6))


def test_int8_fp32_becomes_the_default_only_when_it_is_expected_to_be_faster(tmp_path: Path) -> None:
    sets = {"a": {"n": 300, "read_again_pct": 60.0}, "b": {"n": 100, "read_again_pct": 20.0}}
    choice = {"below_confidence": 0.97, "tolerance": 0.2, "sets": sets}
    cost = recheck.expected_cost(choice, 0.69)
    assert cost["read_again"] == 0.5 and cost["int8+fp32_encoding_vs_fp32"] == 1.19  # pooled over the crops
    assert not recheck.pays(cost, 1.0) and recheck.pays(recheck.expected_cost(choice, 0.4), 1.0)
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    assert json.loads((bundle / "manifest.json").read_text())["defaults"]["cpu_precision"] == RECHECKED
    written = recheck.write_recheck(bundle, choice, ["a", "b"], default=True, cost=cost)["defaults"]
    assert "cpu_precision" not in written  # an int8+fp32 that does not pay is no longer the CPU default
    assert backends.cpu_precision(load_bundle(bundle)) == "fp32"
    key = backends.RECHECK_KEYS[backends.int8_variant(load_bundle(bundle))]
    assert written[key]["expected_cost"] == cost and written[key]["below_confidence"] == 0.97
    cheap = recheck.expected_cost(choice, 0.3)
    assert recheck.write_recheck(bundle, choice, ["a", "b"], default=True, cost=cheap)["defaults"]["cpu_precision"] \
        == RECHECKED


def test_command_line_writes_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(recheck, "encoder_time_ratio", lambda *a, **k: 0.6)  # timings are not asserted
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["defaults"].pop("int8_recheck")
    manifest["defaults"].pop("int8_no_vnni_recheck")
    manifest["defaults"].pop("cpu_precision")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    words = tmp_path / "val"
    (words / "images").mkdir(parents=True)
    for path in sorted(SAMPLES.glob("*.png")):
        shutil.copy(path, words / "images" / path.name)
    (words / "labels.tsv").write_text("".join(f"{p.name}\t{p.stem}\n" for p in sorted(SAMPLES.glob("*.png"))))
    assert recheck.main([str(bundle), "--validation", str(words), "--threads", "1", "--json"]) == 0
    written = load_bundle(bundle)  # the files' hashes still match
    defaults = written.manifest["defaults"]
    assert defaults["cpu_precision"] == RECHECKED
    key = backends.RECHECK_KEYS[backends.int8_variant(written)]  # the int8 graph this CPU reads
    assert defaults[key]["below_confidence"] in recheck.GRID
    assert defaults[key]["sets"]["val"]["int8+fp32"] == 100.0
    assert defaults[key]["cpu_saturates"] is backends.int8_dot_saturates()
    assert defaults[key]["expected_cost"]["int8_encoder_vs_fp32"] == 0.6
    assert recheck.main([str(bundle), "--validation", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    # the same threshold, but int8+fp32 must be expected to encode in half fp32's time: it is not
    assert recheck.main([str(bundle), "--validation", str(words), "--threads", "1", "--json", "--max-time", "0.5"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cpu_default"] is False and "not made the CPU default" in captured.err
    assert "cpu_precision" not in load_bundle(bundle).manifest["defaults"]
    assert recheck.main([str(bundle), "--validation", str(words), "--max-time", "0"]) == 2


def test_the_threshold_goes_to_the_graph_this_cpu_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU whose int8 products saturate, with an int8 encoder made for such CPUs in the
    bundle, the threshold is that graph's (``int8_no_vnni_recheck``); the other one stays."""
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["graphs"][backends.INT8_NO_VNNI] = {"image_encoder": manifest["graphs"]["int8"]["image_encoder"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    kept = manifest["defaults"]["int8_recheck"]
    choice = {"below_confidence": 0.8, "tolerance": 0.2, "sets": {"val": {"n": 1}}}
    for saturates, key in ((True, "int8_no_vnni_recheck"), (False, "int8_recheck")):
        monkeypatch.setattr(backends, "int8_dot_saturates", lambda saturates=saturates: saturates)
        written = recheck.write_recheck(bundle, choice, ["val"], default=False)["defaults"]
        assert written[key]["below_confidence"] == 0.8 and written[key]["cpu_saturates"] is saturates
        if saturates:
            assert written["int8_recheck"] == kept
            assert recheck_threshold(load_bundle(bundle)) == 0.8
