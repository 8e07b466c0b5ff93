"""The correction settings travel with a bundle: nested, typed, checked once; the manifest's
``correction`` section (schema 2) changes what a corrector decides; schema-1 bundles load
with the defaults; ``--correction-config`` puts a file's settings over the bundle's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FakeBackend
from test_llm_corrector import COTFEE, FakeLM

from runtime.bundle import DEFAULT_BUNDLE, BundleError, load_bundle
from runtime.charset import CHARSET_36
from runtime.correction.corrector import LLMCorrector
from runtime.correction.settings import FLAT_NAMES, CorrectionSettings, SettingsError
from runtime.options import OptionError, RecognizerConfig
from runtime.recognizer import Recognizer


def _schema2(root: Path, section: dict) -> Path:
    """Turn the fake bundle at ``root`` into a schema-2 bundle with ``section``."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(schema_version=2, correction=section)
    path.write_text(json.dumps(manifest))
    return root


def _llm_always(settings: CorrectionSettings) -> CorrectionSettings:
    """No lexicon; the LLM weighs every candidate whatever the cheap ranking says."""
    return settings.with_flat(llm_candidates=1000, llm_margin=1e9)


def test_old_schema_bundle_loads_with_the_defaults(fake_bundle: Path) -> None:
    bundle = load_bundle(fake_bundle)
    assert bundle.manifest["schema_version"] == 1 and "correction" not in bundle.manifest
    assert bundle.correction == CorrectionSettings(threshold=bundle.threshold)
    assert bundle.correction.gaps.char_widths == CorrectionSettings().gaps.char_widths != {}


def test_a_bundle_whose_section_changes_a_weight_reads_differently(fake_bundle: Path) -> None:
    default = LLMCorrector(FakeLM(), _llm_always(load_bundle(fake_bundle).correction))
    assert default.correct([COTFEE], CHARSET_36)[0].text == "coffee"  # the LLM prefers the word
    bundle = load_bundle(_schema2(fake_bundle, {"weights": {"llm": 0.0}, "provenance": {"date": "today"}}))
    assert bundle.correction.weights.llm == 0.0 and bundle.correction.weights.prior == 1.0
    changed = LLMCorrector(FakeLM(), _llm_always(bundle.correction))
    assert changed.correct([COTFEE], CHARSET_36)[0].text == "cotfee"  # the frames' answer stands
    # the recognizer takes the bundle's section (gap rule and joint weights too)
    recognizer = Recognizer(bundle, FakeBackend())
    assert recognizer.correction.weights.llm == 0.0


@pytest.mark.parametrize("section, problem", [
    ({"weights": {"llm": -1.0}}, "weights.llm"),
    ({"weights": {"nope": 1.0}}, "weights.nope"),
    ({"nope": {}}, "'nope'"),
    ({"candidates": {"insert_at": "middle"}}, "candidates.insert_at"),
    ({"threshold": 0.5}, "threshold"),
    ({"gaps": {"char_widths": {"ab": 1.0}}}, "gaps.char_widths"),
])
def test_a_bad_section_is_a_bundle_error_naming_the_setting(fake_bundle: Path, section: dict, problem: str) -> None:
    with pytest.raises(BundleError, match=problem):
        load_bundle(_schema2(fake_bundle, section))


def test_a_section_needs_schema_2(fake_bundle: Path) -> None:
    path = fake_bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["correction"] = {}
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 2"):
        load_bundle(fake_bundle)


def test_the_embedded_bundle_carries_the_section_with_todays_values() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE, verify=True)  # its files' sha256 list is right
    assert bundle.manifest["schema_version"] == 2
    section = bundle.manifest["correction"]
    assert {"provenance", "weights", "gaps", "margins", "llm", "lm_fill"} <= set(section)
    assert bundle.correction == CorrectionSettings(threshold=bundle.threshold)
    assert section["gaps"]["char_widths"] == CorrectionSettings().gaps.char_widths


def test_settings_round_trip_and_flat_names() -> None:
    settings = CorrectionSettings().with_flat(gap_credit=14.0, keep_margin=0.0, fill_slots="topk")
    assert settings.weights.gap == 14.0 and settings.margins.keep == 0.0 and settings.fill.slots == "topk"
    assert CorrectionSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    for flat, (section, key) in FLAT_NAMES.items():  # every flat name reaches a field
        assert hasattr(settings if section is None else getattr(settings, section), key), flat
    with pytest.raises(SettingsError, match="mode"):
        CorrectionSettings(mode="guess")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CorrectionSettings().with_flat(no_such_setting=1)


def test_correction_config_is_checked_before_anything_starts(fake_bundle: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"llm": {"time_budget_s": 5.0}, "margins": {"keep": 2.0}}))
    config = RecognizerConfig(engine=str(fake_bundle), llm="none", correction_config=str(good))
    bundle = config.check()
    merged = config.correction(bundle)
    assert merged.llm.time_budget_s == 5.0 and merged.margins.keep == 2.0 and merged.weights.gap == 12.0
    bad = tmp_path / "bad.json"
    for text, problem in (('{"llm": {"time_budget_s": -1}}', "llm.time_budget_s"), ("{not json", "JSON"),
                          ('{"weights": {"visual": "a lot"}}', "weights.visual")):
        bad.write_text(text)
        with pytest.raises(OptionError, match=problem) as caught:
            RecognizerConfig(engine=str(fake_bundle), llm="none", correction_config=str(bad)).check()
        assert "--correction-config" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(OptionError, match="cannot be read"):
        RecognizerConfig(engine=str(fake_bundle), llm="none", correction_config=str(tmp_path / "missing.json")).check()


def test_cli_refuses_a_bad_correction_config_in_one_line(fake_bundle: Path, tmp_path: Path, capsys) -> None:
    from runtime import cli

    image = tmp_path / "x.png"
    image.write_bytes(b"not read: the option is checked first")
    bad = tmp_path / "bad.json"
    bad.write_text('{"margins": {"keep": "wide"}}')
    assert cli.main(["--engine", str(fake_bundle), "--llm", "none", "--correction-config", str(bad), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--correction-config" in err[0] and "margins.keep" in err[0]
    assert cli.main(["--help"]) == 0 and "--correction-config" in capsys.readouterr().out
