"""The lexicon: its (length, position, character) index answers as a scan of the list would."""

from __future__ import annotations

import gzip
import random
import string
from pathlib import Path

import pytest

from runtime.correction.lexicon import DEFAULT_LEXICON, USER_LOGPROB, Lexicon, load_lexicons, zipf_to_logprob


def random_lexicon(rng: random.Random, n: int = 3000) -> Lexicon:
    alphabet = "abcde" + "0"  # a small alphabet, so patterns match many words
    words = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(n)}
    return Lexicon(sorted(words), [-float(i) for i in range(len(words))])


@pytest.mark.parametrize("seed", range(5))
def test_index_matches_a_brute_force_scan(seed: int) -> None:
    rng = random.Random(seed)
    lexicon = random_lexicon(rng)
    for _ in range(200):
        length = rng.randint(1, 8)
        pattern = [rng.choice("abcdeABX0") if rng.random() < 0.4 else None for _ in range(length)]
        found = lexicon.match(pattern)
        assert found.words == lexicon.scan(pattern)  # same words, same (list) order
        assert found.codes.shape == (len(found), length)
        assert list(found.logprobs) == [lexicon.logprob(w) for w in found.words]


def test_matching_folds_case_and_keeps_the_written_form() -> None:
    lexicon = Lexicon(["iPhone", "phone", "Coffee"])
    assert lexicon.match(list("IPHONE")).words == ["iPhone"]
    assert lexicon.match(["c", None, "F", None, None, "e"]).words == ["Coffee"]
    assert lexicon.match([None] * 5).words == ["phone"]
    assert lexicon.match([None] * 9).words == [] and "PHONE" in lexicon and "phones" not in lexicon


def test_file_formats_and_errors(tmp_path: Path) -> None:
    plain = tmp_path / "words.txt"
    plain.write_text("# product names\nZyloTab\n\nwidgetron\t3.5\n", encoding="utf-8")
    lexicon = Lexicon.from_file(plain)
    assert len(lexicon) == 2 and lexicon.logprob("zylotab") == USER_LOGPROB
    assert lexicon.logprob("WIDGETRON") == pytest.approx(zipf_to_logprob(3.5))
    packed = tmp_path / "words.txt.gz"
    packed.write_bytes(gzip.compress(b"alpha\nbeta\n"))
    assert Lexicon.from_file(packed).match([None] * 4).words == ["beta"]
    bad = tmp_path / "bad.txt"
    bad.write_text("word\tnot-a-number\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1"):
        Lexicon.from_file(bad)
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no words"):
        Lexicon.from_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not found"):
        Lexicon.from_file(tmp_path / "missing.txt")


def test_shipped_list_is_frequency_ranked_and_alphanumeric() -> None:
    assert DEFAULT_LEXICON.is_file() and DEFAULT_LEXICON.stat().st_size < 600_000
    lexicon = Lexicon.default()
    assert len(lexicon) > 50_000
    assert lexicon.logprob("the") > lexicon.logprob("coffee") > lexicon.logprob("kodama")
    assert set("".join(list(lexicon.entries)[:5000])) <= set(string.ascii_lowercase + string.digits)
    assert lexicon.match(list("c") + [None] + list("ffee")).words == ["coffee"]


def test_load_lexicons_puts_the_users_first(tmp_path: Path) -> None:
    user = tmp_path / "mine.txt"
    user.write_text("Zylotab\n", encoding="utf-8")
    stack = load_lexicons(user)
    assert [lex.name for lex in stack] == ["mine.txt", DEFAULT_LEXICON.name]
    assert load_lexicons("none") == [] and [lex.name for lex in load_lexicons("default")] == [DEFAULT_LEXICON.name]
