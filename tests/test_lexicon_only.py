"""``--llm lexicon``: the correction step without a language model (no llama.cpp needed), and
the default falling back to it when the LLM cannot run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from runtime.charset import CHARSET_94
from runtime.correction.lexicon import Lexicon
from runtime.decoding import Gap, Prediction
from runtime.llm import Corrector, CorrectorSettings
from runtime.options import OptionError, RecognizerConfig, llm_problem
from runtime.recognizer import make_corrector

#: confident, one letter skipped where the CTC frames show a gap
RESUE = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"], gaps=[Gap(3, 1, 2.1)])
WORDS = [Lexicon(["rescue", "house"], [-9.0, -8.0])]


def test_the_lexicon_alone_restores_a_skipped_character() -> None:
    alone = Corrector(None, CorrectorSettings(), lexicons=WORDS, without_llm=True)
    got = alone.correct_one(RESUE, CHARSET_94)
    assert got.gated and got.text == "Rescue" and got.inserted == 1
    assert got.mode == "lexicon" and not got.llm_called and got.skipped is None and got.warnings == []
    assert alone.corrects and not alone.enabled
    # the same corrector without the flag is the old "no model": the vision answer stands
    off = Corrector(None, CorrectorSettings(), lexicons=WORDS).correct_one(RESUE, CHARSET_94)
    assert off.text == "Resue" and off.skipped is not None and off.mode == "none"
    assert alone.with_settings(threshold=0.5).without_llm


def test_from_spec_lexicon_uses_the_shipped_list_and_refuses_what_needs_a_model() -> None:
    alone = Corrector.from_spec("lexicon")
    assert alone.without_llm and alone.backend is None and alone.lexicons
    assert alone.correct_one(RESUE, CHARSET_94).text == "Rescue"
    with pytest.raises(ValueError, match="--llm-mode fill needs one"):
        Corrector.from_spec("lexicon", mode="fill")
    with pytest.raises(ValueError, match="needs a lexicon"):
        Corrector.from_spec("lexicon", lexicon="none")
    with pytest.raises(ValueError, match="rescore mode"):
        Corrector(None, CorrectorSettings(mode="fill"), without_llm=True)


@pytest.fixture
def no_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-cpp-python looks uninstalled (the runtime-only install)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))


def test_the_default_ranks_without_the_llm_when_it_cannot_run(no_llama_cpp: None) -> None:
    with pytest.warns(RuntimeWarning, match="corrected without it"):
        fallback = make_corrector(None, "rescore", 0.8)
    assert fallback is not None and fallback.without_llm
    assert fallback.correct_one(RESUE, CHARSET_94).text == "Rescue"
    with pytest.warns(RuntimeWarning, match="no correction"):  # nothing to rank with
        assert make_corrector(None, "rescore", 0.8, lexicon="none") is None
    with pytest.warns(RuntimeWarning, match="no correction"):
        assert make_corrector(None, "fill", 0.8) is None
    assert make_corrector("none", "rescore", 0.8) is None
    assert make_corrector("lexicon", "rescore", 0.8).without_llm  # asked for: no warning needed


def test_options_refuse_lexicon_with_what_it_cannot_do(fake_bundle: Path, no_llama_cpp: None) -> None:
    good = RecognizerConfig(engine=str(fake_bundle), llm="lexicon")
    assert llm_problem("lexicon") is None  # no llama-cpp-python needed
    assert good.check()
    for change, message in (({"llm_mode": "fill"}, "--llm-mode fill needs one"),
                            ({"lexicon": "none"}, "--llm lexicon needs a lexicon")):
        with pytest.raises(OptionError, match=message) as info:
            RecognizerConfig(**{**good.to_dict(), **change}).check()
        assert "\n" not in str(info.value)


def test_serving_says_before_ray_starts_that_the_llm_cannot_run(fake_bundle: Path, no_llama_cpp: None) -> None:
    config = RecognizerConfig(engine=str(fake_bundle))
    bundle = config.check()
    (line,) = [w for w in config.warnings(bundle) if "LLM" in w]
    assert "llama-cpp-python is not installed" in line and "--llm lexicon" in line
    assert not [w for w in RecognizerConfig(engine=str(fake_bundle), llm="none").warnings(bundle) if "LLM" in w]
    assert not [w for w in RecognizerConfig(engine=str(fake_bundle), llm="lexicon").warnings(bundle) if "LLM" in w]


def test_the_peer_benchmark_has_a_lexicon_reader() -> None:
    from PIL import Image

    from benchmarks.readers import PROJECT, load_project

    assert "project+lexicon" in PROJECT
    reader = load_project(None, llm="lexicon", threads=1)
    try:
        assert reader.key == "project+lexicon" and "lexicon, no LLM" in reader.name and "llm" not in reader.info
        sample = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "samples" / "coffee.png"
        with Image.open(sample) as image:
            assert reader.read(image.convert("RGB")) == "Coffee"
    finally:
        reader.close()
