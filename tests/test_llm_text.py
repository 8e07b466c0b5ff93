"""Pure text logic of the LLM correction: candidates, case, prompts, GBNF grammars."""

from __future__ import annotations

import itertools
import math
import string

import pytest

from runtime.charset import CHARSET_36, CHARSET_94
from runtime.correction.candidates import rescore_candidates, restore_case, word_case
from runtime.correction.fill import fill_answer, fill_grammar, fill_prompt
from runtime.correction.settings import FILL_TEMPLATE
from runtime.decoding import Prediction


def prediction(text: str, probs: list[float], topk: dict[int, list[tuple[str, float]]]) -> Prediction:
    """A prediction whose unlisted positions have their own character as the only top-k entry."""
    top = [topk.get(i, [(c, p)]) for i, (c, p) in enumerate(zip(text, probs))]
    return Prediction(text, probs, top)


def brute_force(pred: Prediction, masked: tuple[int, ...], k: int) -> list[tuple[float, str]]:
    """Every candidate of the product with its visual log-probability (original case)."""
    base = sum(math.log(p) for i, p in enumerate(pred.char_probs) if i not in masked)
    out = []
    for combo in itertools.product(*(pred.topk[i][:k] for i in masked)):
        letters = list(pred.text)
        for i, (c, _) in zip(masked, combo):
            letters[i] = c
        out.append((base + sum(math.log(p) for _, p in combo), "".join(letters)))
    return sorted(out, reverse=True)


def test_candidates_are_the_best_of_the_product() -> None:
    pred = prediction(
        "h0use1",
        [0.9, 0.4, 0.95, 0.5, 0.99, 0.3],
        {
            1: [("0", 0.4), ("o", 0.35), ("O", 0.1), ("Q", 0.05)],
            3: [("s", 0.5), ("5", 0.3), ("S", 0.15)],
            5: [("1", 0.3), ("l", 0.28), ("I", 0.2), ("i", 0.1)],
        },
    )
    masked = (1, 3, 5)
    exact = brute_force(pred, masked, 3)
    for cap in (1, 5, 12, 27, 100):
        got = rescore_candidates(pred, masked, CHARSET_94, k=3, max_candidates=cap, lower=False)
        assert len(got) == min(cap, 27)
        assert [round(c.visual_logprob, 9) for c in got] == [round(s, 9) for s, _ in exact[:cap]]
        assert {c.text for c in got} <= {t for _, t in exact}
    everything = rescore_candidates(pred, masked, CHARSET_94, k=3, max_candidates=100, lower=False)
    assert {c.text for c in everything} == {t for _, t in exact}


def test_candidates_keep_trusted_characters_and_the_charset() -> None:
    pred = prediction(
        "c0ffee", [0.99, 0.5, 0.99, 0.6, 0.99, 0.99],
        {1: [("0", 0.5), ("O", 0.3), ("o", 0.1), ("@", 0.05)], 3: [("f", 0.6), ("F", 0.2), ("t", 0.1)]},
    )
    for charset in (CHARSET_36, CHARSET_94):
        for lower in (True, False):
            got = rescore_candidates(pred, (1, 3), charset, k=4, max_candidates=50, lower=lower)
            assert got, (charset, lower)
            for c in got:
                assert all(ch in charset for ch in c.text)
                assert len(c.text) == 6 and c.text[0] == "c" and c.text[2] == "f" and c.text[4:] == "ee"
            assert "c0ffee" in {c.text for c in got}  # the vision answer is a candidate
            assert len({c.text for c in got}) == len(got)


def test_case_variants_merge_when_the_llm_sees_lower_case() -> None:
    pred = prediction("Rescue", [0.99, 0.99, 0.99, 0.4, 0.99, 0.99],
                      {3: [("c", 0.4), ("C", 0.35), ("o", 0.2)]})
    got = rescore_candidates(pred, (3,), CHARSET_94, k=3, max_candidates=10, lower=True)
    assert [c.text for c in got] == ["Rescue", "Resoue"]  # c + C merged (0.75) beats o
    assert [c.llm_text for c in got] == ["rescue", "resoue"]
    assert got[0].visual_logprob == pytest.approx(5 * math.log(0.99) + math.log(0.75))
    separate = rescore_candidates(pred, (3,), CHARSET_94, k=3, max_candidates=10, lower=False)
    assert [c.text for c in separate] == ["Rescue", "ResCue", "Resoue"]


def test_output_keeps_the_decoders_case_pattern() -> None:
    caps = prediction("STATlON", [0.99] * 4 + [0.5] + [0.99] * 2, {4: [("l", 0.5), ("i", 0.3), ("1", 0.1)]})
    assert [c.text for c in rescore_candidates(caps, (4,), CHARSET_94, k=3)] == ["STATLON", "STATION", "STAT1ON"]
    assert [c.llm_text for c in rescore_candidates(caps, (4,), CHARSET_94, k=3)] == ["statlon", "station", "stat1on"]
    # a lower-case charset cannot hold the upper-case variant: the candidate stays in it
    small = Prediction("statlon", caps.char_probs, caps.topk)
    assert [c.text for c in rescore_candidates(small, (4,), CHARSET_36, k=3)] == ["statlon", "station", "stat1on"]


def test_word_case_and_restore_case() -> None:
    assert word_case("HOUSE", (1,)) == "upper"
    assert word_case("hoUse", (2,)) == "lower"
    assert word_case("House", ()) is None
    assert word_case("12_4", (2,)) is None
    charset = frozenset(CHARSET_94)
    assert restore_case("a", 2, "upper", {}, charset) == "A"
    assert restore_case("a", 2, "lower", {"A": 0.9}, charset) == "a"
    assert restore_case("a", 0, "lower", {"A": 0.9, "a": 0.1}, charset) == "A"  # a first letter follows the decoder
    assert restore_case("a", 3, None, {"A": 0.6, "a": 0.3}, charset) == "A"
    assert restore_case("7", 3, "upper", {}, charset) == "7"
    assert restore_case("a", 3, "upper", {}, frozenset(CHARSET_36)) == "a"
    assert restore_case("é", 3, None, {}, charset) is None


def test_missing_topk_keeps_the_decoders_character() -> None:
    pred = Prediction("ab", [0.5, 0.99], [])
    got = rescore_candidates(pred, (0,), CHARSET_36, k=5)
    assert [c.text for c in got] == ["ab"]


def test_candidate_settings_are_checked() -> None:
    pred = prediction("ab", [0.5, 0.99], {})
    with pytest.raises(ValueError):
        rescore_candidates(pred, (0,), CHARSET_36, k=0)
    with pytest.raises(ValueError):
        rescore_candidates(pred, (0,), CHARSET_36, max_candidates=0)


def test_fill_prompt_shows_the_pattern() -> None:
    prompt = fill_prompt("res_ue")
    assert prompt.endswith("res_ue ->") and prompt.startswith(FILL_TEMPLATE.split("\n")[0].format(mask="_"))


def test_fill_grammar_text() -> None:
    grammar = fill_grammar(["c", frozenset("ao"), "f", frozenset("ao"), frozenset("xy")], leading_space=False)
    assert grammar == 'root ::= "c" m0 "f" m0 m1\nm0 ::= [ao]\nm1 ::= [xy]\n'
    assert fill_grammar(["c", frozenset("ao")]) == 'root ::= " "? "c" m0\nm0 ::= [ao]\n'
    assert fill_answer(" coffee") == "coffee" and fill_answer("coffee") == "coffee"


def test_fill_grammar_escapes_every_special_character() -> None:
    grammar = fill_grammar(['"', "\\", "]", frozenset(string.punctuation)], leading_space=False)
    first = grammar.splitlines()[0]
    assert first == 'root ::= "\\x22" "\\x5C" "\\x5D" m0'
    body = grammar.splitlines()[1]
    assert body.startswith("m0 ::= [") and body.endswith("]")
    inner = body[len("m0 ::= ["):-1]
    assert all(part.startswith("x") and len(part) == 3 for part in inner.split("\\")[1:])
    assert inner.count("\\x") == len(string.punctuation)


def test_fill_grammar_refuses_bad_slots() -> None:
    with pytest.raises(ValueError):
        fill_grammar([])
    with pytest.raises(ValueError):
        fill_grammar(["ab"])
    with pytest.raises(ValueError):
        fill_grammar([frozenset()])
