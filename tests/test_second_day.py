"""Issue 25, what a new user meets on the second day: options refused in one line before
anything starts, exit codes, blank images, the export commands without their extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import FakeBackend, barcode

from runtime import cli
from runtime.bundle import load_bundle
from runtime.options import OptionError, RecognizerConfig, llm_problem
from runtime.recognizer import Recognizer


def _png(path: Path, word: str = "word") -> Path:
    barcode(word).save(path)
    return path


def test_config_check_names_the_option(tmp_path: Path, fake_bundle: Path) -> None:
    good = RecognizerConfig(engine=str(fake_bundle), llm="none")
    assert good.check().charset
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    bad_list = tmp_path / "words_dir"
    bad_list.mkdir()
    cases = {"--threshold 2": {"threshold": 2.0}, "--min-confidence 1.5": {"min_confidence": 1.5},
             "--threads must be at least 1": {"threads": 0}, "--llm-mode magic": {"llm_mode": "magic"},
             "--backend magic": {"backend": "magic"}, "--precision int4": {"precision": "int4"},
             f"--llm {tmp_path / 'no.gguf'}: no such GGUF file": {"llm": str(tmp_path / "no.gguf")},
             "not a GGUF file": {"llm": str(fake_bundle / "manifest.json")},
             "no such bundle": {"engine": str(tmp_path / "nothing")}}
    for message, change in cases.items():
        with pytest.raises(OptionError, match=message.replace("-", r"\-").replace(".", r"\.")) as info:
            RecognizerConfig(**{**good.to_dict(), **change}).check()
        assert "\n" not in str(info.value)
    if llm_problem(str(gguf)) is None:  # llama-cpp-python installed: a GGUF file passes the check
        assert RecognizerConfig(**{**good.to_dict(), "llm": str(gguf), "lexicon": "none"}).check()
    with pytest.raises(OptionError):
        RecognizerConfig(**{**good.to_dict(), "llm": str(gguf), "lexicon": str(bad_list)}).check()


def test_config_round_trips_through_args_and_dicts(fake_bundle: Path) -> None:
    args = cli.build_parser().parse_args(["x.png", "--engine", str(fake_bundle), "--threshold", "0.5",
                                          "--min-confidence", "0.2", "--threads", "3", "--llm", "none"])
    config = RecognizerConfig.from_args(args)
    assert (config.threshold, config.min_confidence, config.threads, config.llm) == (0.5, 0.2, 3, "none")
    assert RecognizerConfig.from_dict({**config.to_dict(), "unknown": 1}) == config


def test_bad_threshold_is_an_argparse_error(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["x.png", "--threshold", "2"]) == 2
    assert "argument --threshold: 2 is not within [0, 1]" in capsys.readouterr().err


def test_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "batch size (default: 32)" in text and "LLM correction mode (default: rescore)" in text
    assert "INPUT<TAB>TEXT<TAB>CONFIDENCE" in text and "--min-confidence" in text


def _run(fake_bundle: Path, capsys: pytest.CaptureFixture, *argv: str, corrector=None) -> tuple[int, str, str]:
    def make(args, bundle):
        return Recognizer(load_bundle(fake_bundle), FakeBackend(), corrector, args.threshold, args.llm_mode,
                          args.min_confidence)

    status = cli.main(["--engine", str(fake_bundle), "--no-progress", *argv], make_recognizer=make)
    out, err = capsys.readouterr()
    return status, out, err


def test_every_input_missing_is_exit_2(fake_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, out, err = _run(fake_bundle, capsys, str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert status == 2 and out == ""
    assert err.splitlines() == [f"error: {tmp_path / 'a.png'}: no such file or folder",
                                f"error: {tmp_path / 'b.png'}: no such file or folder", "error: no inputs to read"]


def test_eval_without_labelled_sets_says_so(fake_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, out, err = _run(fake_bundle, capsys, "--eval", str(_png(tmp_path / "a.png")))
    assert status == 0 and json.loads(out.splitlines()[-1])["summary"] == {}
    assert "no labelled set among the inputs" in err


def test_plain_output_carries_the_confidence(fake_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = _png(tmp_path / "a.png", "abc")
    status, out, _ = _run(fake_bundle, capsys, str(image))
    source, text, confidence = out.strip().split("\t")
    assert status == 0 and (source, text) == (str(image), "abc") and 0.0 < float(confidence) <= 1.0


def test_min_confidence_empties_low_confidence_words(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Blank images read, with the embedded default, as low-confidence guesses (a 1x1 white
    image as 'o'); --min-confidence turns them into empty text flagged low_confidence (the
    guess stays in vision_text); a sure word is untouched."""
    from PIL import Image

    blank, dot = tmp_path / "blank.png", tmp_path / "dot.png"
    Image.new("RGB", (400, 48), "white").save(blank)
    Image.new("RGB", (1, 1), "white").save(dot)
    word = Path(cli.DEFAULT_BUNDLE).parent / "samples" / "open.png"
    inputs = [str(blank), str(dot), str(word)]

    def run(*argv: str) -> dict:
        assert cli.main(["--llm", "none", "--json", "--no-progress", *argv, *inputs]) == 0
        return {r["source"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}

    plain = run()
    assert plain[str(word)]["text"] == "OPEN" and plain[str(word)]["confidence"] > 0.9
    assert max(plain[str(blank)]["confidence"], plain[str(dot)]["confidence"]) < 0.5
    assert not any(r["low_confidence"] for r in plain.values())
    cut = run("--min-confidence", "0.5")
    for path in (blank, dot):
        assert cut[str(path)]["text"] == "" and cut[str(path)]["low_confidence"]
        assert cut[str(path)]["vision_text"] == plain[str(path)]["vision_text"]
    assert cut[str(word)]["text"] == "OPEN" and not cut[str(word)]["low_confidence"]
    assert cli.main(["--llm", "none", "--min-confidence", "0.5", str(dot)]) == 0
    assert capsys.readouterr().out.split("\t")[1] == ""


def test_llm_decision_is_not_an_error(fake_recognizer) -> None:
    """A corrector that keeps the vision answer by decision reports it in llm.decision;
    llm.error is for failures only."""
    from runtime.correction.contract import Correction, Reason, Skip

    class Deciding:
        mode = "rescore"

        def correct(self, predictions, charset):
            return [Correction(p.text, p.text, False, True, "rescore", reasons=[Reason.LOW_CONFIDENCE],
                               skipped=Skip.TOO_MANY_MASKED) for p in predictions]

    result = fake_recognizer(Deciding(), threshold=1.0).read([barcode("abc")])[0]
    assert result.gated and result.llm.error is None
    assert result.llm.decision == "too many characters below the threshold; vision answer kept"


def test_export_and_training_commands_name_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import export
    import training
    from runtime import extras

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    message = extras.missing_line("export.onnx", export.NEEDS["export.onnx"], "export")
    assert message.startswith("error: python -m export.onnx needs torch") and "clipllama[export]" in message
    assert extras.missing_line("export.lint", export.NEEDS["export.lint"], "export") is None
    assert "clipllama[train]" in extras.missing_line("training.finetune", training.NEEDS["training.finetune"], "train")
    monkeypatch.setattr(sys, "argv", ["-m", "--help"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "training.train", "--help"])
    assert extras.command_being_run() == "training.train"
    with pytest.raises(SystemExit) as info:
        extras.refuse_missing("training", training.NEEDS, "train", default=training.TORCH)
    assert info.value.code == 2
    extras.refuse_missing("export", export.NEEDS, "export")  # another package's command: nothing to say
    monkeypatch.setattr(sys, "argv", ["x.py"])
    assert extras.command_being_run() is None


def test_serve_and_batch_help_without_the_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray", reason="the serve extra is not installed (pip install 'clipllama[serve]')")
    from serving import batch, common, serve

    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    message = common.missing_serve_extra()
    assert message.count("ray") == 1 and "pip install 'clipllama[serve]'" in message
    for module in (serve, batch):
        monkeypatch.setattr(module, "missing_serve_extra", lambda *a: "error: needs ray")
        assert module.main(["--help"]) == 0
        assert "usage:" in capsys.readouterr().out
        assert module.main(["x", "-o", "y"] if module is batch else []) == 2
        assert capsys.readouterr().err.strip() == "error: needs ray"


def test_serve_refuses_options_before_ray(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray", reason="the serve extra is not installed (pip install 'clipllama[serve]')")
    import ray

    from serving import serve

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    for argv, message in ((["--llm", "/nonexistent.gguf"], "error: --llm /nonexistent.gguf: no such GGUF file"),
                          (["--threshold", "2"], "argument --threshold: 2 is not within [0, 1]"),
                          (["--port", "0"], "error: --port 0: must be within 1-65535")):
        assert serve.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
