"""training.bundle_settings: a fine-tune's bundle keeps the views it started with only when no
set reads worse with them, and says why in its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.views import ViewSettings
from training import bundle_settings

SETS = {"val": [(None, "open"), (None, "exit")], "keep:synthetic": [(None, "word"), (None, "2026")]}
ONE_VIEW = {"val": ["opon", "exit"], "keep:synthetic": ["word", "2026"]}


def _bundle(tmp_path: Path) -> Path:
    (tmp_path / "manifest.json").write_text(json.dumps({"defaults": {"decode": "cascade"}}))
    return tmp_path


@pytest.mark.parametrize("with_views, kept", [
    ({"val": ["open", "exit"], "keep:synthetic": ["word", "2026"]}, True),  # one word fixed, none broken
    ({"val": ["open", "exit"], "keep:synthetic": ["ward", "2026"]}, False),  # a keep word broken
])
def test_the_source_views_are_kept_when_no_set_reads_worse(tmp_path: Path, monkeypatch, with_views, kept) -> None:
    bundle = _bundle(tmp_path)
    settings = ViewSettings((1.1, 1.2), 0.7)
    asked = []

    def read(path, sets, decode=None, views=None):
        asked.append(views)
        return with_views

    monkeypatch.setattr(bundle_settings, "runtime_texts", read)
    chosen, texts, figures = bundle_settings.keep_views(bundle, settings, SETS, ONE_VIEW, None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert asked == [settings]  # one reading, with the source's views
    if kept:
        assert chosen == settings.to_dict() and texts == with_views
        assert ViewSettings.from_manifest(manifest) == settings
        section = manifest["defaults"]["views"]
        assert section["gain"] == 1 and section["sets"]["val"] == {"n": 2, "fixed": 1, "broken": 0}
    else:
        assert chosen is None and texts == ONE_VIEW and ViewSettings.from_manifest(manifest) is None
        assert figures["keep:synthetic"] == {"n": 2, "fixed": 0, "broken": 1}  # why, for finetune.json
    assert manifest["defaults"]["decode"] == "cascade"


def test_no_source_views_reads_nothing_again(tmp_path: Path, monkeypatch) -> None:
    bundle = _bundle(tmp_path)
    monkeypatch.setattr(bundle_settings, "runtime_texts", lambda *a, **k: pytest.fail("read again"))
    assert bundle_settings.keep_views(bundle, None, SETS, ONE_VIEW, None) == (None, ONE_VIEW, None)
    assert bundle_settings.source_views(tmp_path / "no-such-bundle") is None
    assert bundle_settings.source_views(None) is not None  # the embedded default has views


def test_large_keep_sets_are_sampled_for_these_choices() -> None:
    pairs = [(None, f"w{i}") for i in range(1200)]
    sample = bundle_settings.sampled(pairs)
    assert len(sample) == bundle_settings.KEEP_SAMPLE and sample == sorted(sample, key=lambda p: int(p[1][1:]))
    assert sample == bundle_settings.sampled(pairs)  # seeded
    assert bundle_settings.sampled(pairs[:40]) == pairs[:40]


def test_synthetic_keep_words_do_not_judge_the_views(tmp_path: Path, monkeypatch) -> None:
    """The views were fitted on real crops: a tower-only keep set (synthetic words) chooses the
    decode mode with the others but is neither read with the views nor able to drop them."""
    bundle = _bundle(tmp_path)
    settings = ViewSettings((1.1, 1.2), 0.7)
    read_with_views = []

    def read(path, sets, decode=None, views=None):
        if views not in (None, "off"):
            read_with_views.append(sorted(sets))
            return {"val": ["open", "exit"]}  # VAL gains a word with the views
        if path == bundle:  # one view, per decode mode: the synthetic set reads right
            return {"val": ["opon", "exit"], "keep:synthetic": ["word", "2026"]}
        return {"val": ["opon", "exit"]}  # the source bundle

    monkeypatch.setattr(bundle_settings, "runtime_texts", read)
    monkeypatch.setattr(bundle_settings, "source_views", lambda source: settings)
    pairs = {"synthetic": [(None, "word"), (None, "2026")]}
    result = bundle_settings.settle_bundle(bundle, None, SETS["val"], pairs, tower_only=("synthetic",))
    assert read_with_views == [["val"]]  # the synthetic words were not read with the views
    assert result["views"] == settings.to_dict() and result["val_after"] == 100.0
    assert set(result["decode_scores"]["cascade"]) == {"val", "keep"}  # they did weigh in the decode mode
