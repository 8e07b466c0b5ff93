"""training.finetune: a few steps on a tiny labelled set from the embedded default, a bundle
that the runtime reads, the summary line, and the losses it is made of."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rapidocr", reason="the PP-OCR tower needs the rapidocr package (train extra)")
torch = pytest.importorskip("torch")

from runtime.decoding import CharCodec  # noqa: E402
from training import finetune  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _set(root: Path, words: list[str]) -> Path:
    import random

    import numpy as np

    from training.data.render import WordRenderer

    renderer = WordRenderer(difficulty=0.0)
    rng, gen = random.Random(3), np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    lines = []
    for i, word in enumerate(words):
        renderer.render(word, rng, gen).save(root / "images" / f"w{i}.png")
        lines.append(f"w{i}.png\t{word}\n")
    (root / "labels.tsv").write_text("".join(lines), encoding="utf-8")
    return root


def test_case_folding_sums_upper_and_lower() -> None:
    matrix, fold = finetune.case_folding("aAb1")
    assert matrix.shape == (5, 4) and fold == [0, 1, 1, 2, 3]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]])
    assert torch.allclose(probs @ matrix, torch.tensor([[0.1, 0.5, 0.25, 0.15]]))


def test_ctc_loss_ignores_case_when_asked() -> None:
    codec = CharCodec("aAb")
    frames = torch.full((1, 4, 4), 0.01)
    for t, k in enumerate([2, 0, 3, 0]):  # "A" then "b"
        frames[0, t, k] = 0.97
    log_probs = frames.log()
    sensitive = finetune.ctc_loss(log_probs, ["ab"], codec, None)
    folded = finetune.ctc_loss(log_probs, ["ab"], codec, finetune.case_folding(codec.charset))
    assert folded < 0.5 < sensitive


def test_mixed_state_moves_floats_part_of_the_way() -> None:
    original = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    trained = {"w": torch.tensor([1.0, 4.0]), "n": torch.tensor(7)}
    mixed = finetune.mixed_state(original, trained, 0.25)
    assert torch.allclose(mixed["w"], torch.tensor([0.25, 2.5])) and int(mixed["n"]) == 7
    assert torch.equal(finetune.mixed_state(original, trained, 0.0)["w"], original["w"])


def test_the_mix_is_the_best_on_validation_within_the_keep_tolerance() -> None:
    def row(alpha: float, val: float, real: float, synthetic: float) -> dict:  # nothing gained on keep sets
        return {"alpha": alpha, "val_ctc": val, "keep_ctc": {"real": real, "synthetic": synthetic},
                "keep_broken": {"real": 90.0 - real, "synthetic": 95.0 - synthetic}}

    rows = [row(0.0, 80.0, 90.0, 95.0), row(0.5, 84.0, 89.6, 95.0), row(0.6, 85.0, 90.0, 94.0),
            row(0.8, 86.0, 89.0, 94.8), row(1.0, 87.0, 88.0, 93.0)]
    assert finetune.pick_mix(rows, 0.5)["alpha"] == 0.5  # 0.6 loses a point of the synthetic set
    assert finetune.pick_mix(rows, 1.0)["alpha"] == 0.8
    assert finetune.pick_mix(rows, 0.0)["alpha"] == 0.0  # nothing else keeps enough
    tie = [rows[0], row(0.4, 80.0, 90.0, 95.0)]
    assert finetune.pick_mix(tie, 0.5)["alpha"] == 0.0  # no gain: the original
    # rows that count the keep words broken are held to those, not to the net accuracy
    broken = [{**r, "keep_broken": {"real": b, "synthetic": 0.0}} for r, b in zip(rows, (0.0, 0.4, 1.0, 2.0, 3.0))]
    assert finetune.pick_mix(broken, 0.5)["alpha"] == 0.5
    assert finetune.pick_mix(broken, 1.0)["alpha"] == 0.6  # even on the real set, but a point of it broken


def test_the_mix_is_refined_at_the_edge_of_the_tolerance() -> None:
    def row(alpha: float) -> dict:  # validation rises with alpha, the keep set falls
        return {"alpha": alpha, "val_ctc": 50.0 + 30.0 * alpha, "keep_ctc": {"real": 90.0 - 4.0 * alpha},
                "keep_broken": {"real": 4.0 * alpha}}

    asked: list[float] = []

    def score(alpha: float) -> dict:
        asked.append(alpha)
        return row(alpha)

    rows = finetune.refine_mix([row(a) for a in (0.0, 0.2, 0.4, 1.0)], score, 0.5, 2)
    assert asked == [0.1, 0.15]  # 0.2 loses 0.8 points: bisect below it
    assert finetune.pick_mix(rows, 0.5)["alpha"] == 0.1
    assert finetune.refine_mix([row(a) for a in (0.0, 0.2)], score, 1.0, 2)[-1]["alpha"] == 0.2  # nothing to refine


class _Threshold(torch.nn.Module):
    """A tower stand-in: reads "a" where a crop's value is above its weight ``w``, else "b"; counts
    the crops it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        value = images.mean(dim=(1, 2, 3))
        logits = torch.stack([torch.full_like(value, -9.0), 9.0 * (value - self.w), 9.0 * (self.w - value)], -1)
        return logits[:, None, :].log_softmax(-1)


def test_a_mix_that_breaks_a_keep_set_is_not_read_further() -> None:
    import numpy as np

    def crops(values: list[float]) -> list:
        return [np.full((1, 3, 4, 8), v, dtype=np.float32) for v in values]

    tower = _Threshold()
    codec = CharCodec("ab")
    keep_values = [0.05 * (i % 20) + 0.01 for i in range(96)]  # the original (w 0) reads every one "a"
    keep = {"keep": (crops(keep_values), ["a"] * 96)}
    val = (crops([0.3] * 20), ["b"] * 20)  # read "b" once the weight passes 0.3
    original, trained = {"w": torch.tensor(0.0)}, {"w": torch.tensor(1.0)}
    readings: dict = {}
    rows = finetune.score_mixes(tower, original, trained, val, keep, codec, (0.0, 0.5, 1.0), tolerance=1.0,
                                refine=0, readings=readings, whole=(1.0,))
    by_alpha = {row["alpha"]: row for row in rows}
    assert by_alpha[0.0]["val_ctc"] == 0.0 and by_alpha[1.0]["val_ctc"] == 100.0  # read whole
    half = by_alpha[0.5]  # breaks half the keep set: stopped after its first batch of 32, VAL never read
    assert half["stopped"] == "keep" and "val_ctc" not in half and half["keep_broken"]["keep"] > 1.0
    assert sorted(readings) == [0.0, 1.0]
    assert tower.seen == 2 * (96 + 20) + 32
    assert finetune.pick_mix(rows, 1.0)["alpha"] == 0.0  # mix 1 breaks as much: only the original keeps
    # the stopped row names the words that broke, with the original's confidence in each
    assert half["allowed"] == 0 and len(half["broken_words"]) >= 1
    assert all(label == "a" and 0.0 <= sure <= 1.0 for label, sure in half["broken_words"])
    note = finetune.nothing_kept_note(rows, 1.0)
    assert note is not None and "alpha 0.5" in note and "keep" in note and "0 allowed" in note
    assert "the trained tower reads VAL at 100.0 against 0.0" in note


def test_no_note_when_a_mix_was_read_whole() -> None:
    rows = [{"alpha": 0.0, "val_ctc": 50.0, "keep_ctc": {"k": 90.0}, "keep_broken": {"k": 0.0}},
            {"alpha": 0.2, "val_ctc": 49.0, "keep_ctc": {"k": 90.0}, "keep_broken": {"k": 0.0}},
            {"alpha": 0.4, "stopped": "k", "keep_broken": {"k": 2.0}, "allowed": 1,
             "broken_words": [["SECRET", 0.44], ["EXIT", 0.91]]}]
    assert finetune.nothing_kept_note(rows, 0.5) is None  # mix 0.2 kept the set; it just read VAL worse
    assert finetune.nothing_kept_note([rows[0], rows[2], {**rows[1], "alpha": 0.6}], 0.5) is None  # nor above
    note = finetune.nothing_kept_note([rows[0], rows[2]], 0.5)
    assert note is not None and "SECRET (0.44), EXIT (0.91)" in note and "1 allowed" in note


def test_augment_keeps_the_size_and_changes_the_crop() -> None:
    import random

    from PIL import Image

    crop = Image.new("RGB", (120, 32), "white")
    crop.paste((0, 0, 0), (30, 8, 90, 24))
    changed = [finetune.augment(crop, random.Random(seed)) for seed in range(12)]
    assert all(c.size == crop.size for c in changed)
    assert any(c.tobytes() != crop.tobytes() for c in changed)


def test_a_short_finetune_writes_a_bundle_the_runtime_reads(tmp_path: Path, capsys) -> None:
    words = ["coffee", "Station", "OPEN", "hello", "pizza", "EXIT", "2026", "Bakery"]
    train = _set(tmp_path / "train", words)
    val = _set(tmp_path / "val", words[:4])
    out = tmp_path / "out"
    status = finetune.main([str(train), "--val", str(val), "-o", str(out), "--minutes", "0.05", "--batch", "4",
                            "--general", "8", "--keep", str(val), "--keep-synthetic", "4", "--eval-every", "1",
                            "--no-progress", "--threads", "1", "--distill", "0.5"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"val_before", "val_after", "steps", "bundle", "checkpoint"} <= set(summary)
    assert summary["steps"] >= 1 and 0.0 <= summary["val_after"] <= 100.0
    phases = summary["phase_minutes"]  # where the run's time went
    assert set(phases) == {"setup", "train", "mixes", "export", "bundle_settings"}
    assert sum(phases.values()) <= summary["total_minutes"] + 0.05
    meta = json.loads((out / "checkpoint" / "model.json").read_text())["meta"]["finetune"]
    assert meta["steps"] == summary["steps"] and meta["settings"]["batch"] == 4
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert summary["decode"] in ("cascade", "ctc", "full") and manifest["defaults"]["decode"] == summary["decode"]
    from runtime.views import ViewSettings

    written = ViewSettings.from_manifest(manifest)  # fitted on VAL and the keep sets; None: one view
    assert "views" in summary and summary["views"] == (written.to_dict() if written else None)
    assert meta["keep_crops"] == {str(val): 4, "synthetic": 4} and meta["settings"]["augment"]
    assert meta["mixes"][0]["alpha"] == 0.0 and summary["mix"] == meta["mix"]
    from runtime.specialist import SpecialistSettings

    specialist = SpecialistSettings.from_manifest(manifest)  # the trained tower for doubtful crops, or None
    assert (summary["specialist"] is None) == (specialist is None) == (meta["specialist"] is None)
    if specialist is not None:
        assert summary["specialist"]["below_confidence"] == specialist.below_confidence
    assert set(summary["keep_ctc_after"]) == set(summary["keep_broken"]) == {str(val), "synthetic"}
    assert all(v <= 0.5 for v in summary["keep_broken"].values())  # within --keep-tolerance
    from runtime.recognizer import Recognizer

    with Recognizer.from_bundle(out / "bundle", llm="none") as reader:
        results = reader.read(sorted((val / "images").glob("*.png")))
    assert all(r.ok and isinstance(r.text, str) for r in results)
    # the end of the schedule is kept: the chosen mix of it with the original is the checkpoint's tower
    from runtime.bundle import DEFAULT_BUNDLE
    from training.checkpoint import load_checkpoint

    trained = finetune.load_tower_state(out / finetune.TRAINED_FILE)
    original = finetune.Tower(load_checkpoint(DEFAULT_BUNDLE)).state_dict()
    saved = finetune.Tower(load_checkpoint(out / "checkpoint")).state_dict()
    assert set(trained) == set(saved)
    remixed = finetune.mixed_state(original, trained, summary["mix"])
    assert all(torch.allclose(remixed[name], saved[name], atol=1e-6) for name in saved)


def test_minutes_bound_the_whole_run(capsys) -> None:
    settings = finetune.FinetuneSettings(minutes=10.0)
    mixes = len({0.0, *settings.mixes}) + settings.refine
    after = 0.02 * 800 * (finetune.MIX_READ_SHARE * mixes + finetune.AFTER_RUNTIME_READS) + finetune.AFTER_FIXED_S
    assert finetune.training_budget(settings, 60.0, 0.02, 800) == pytest.approx(600.0 - 60.0 - after)
    assert "longer than --minutes" not in capsys.readouterr().err
    # slow reading: training keeps its minimum share, and the run says it will overrun
    assert finetune.training_budget(settings, 60.0, 1.0, 800) == pytest.approx(600.0 * finetune.MIN_TRAIN_SHARE)
    assert "longer than --minutes" in capsys.readouterr().err
    # the runtime reads a sample of large keep sets: fewer crops, more training
    fewer = finetune.training_budget(settings, 60.0, 0.02, 800, 300)
    assert fewer == pytest.approx(600.0 - 60.0 - after + 0.02 * 500 * finetune.AFTER_RUNTIME_READS)
    fixed = finetune.FinetuneSettings(minutes=10.0, train_minutes=3.0)
    assert finetune.training_budget(fixed, 60.0, 1.0, 800) == 180.0


def test_small_keep_sets_are_named(capsys) -> None:
    assert finetune.warn_small_keep_sets({"synthetic": 400, "general": 3000}, 0.5) == ["synthetic"]
    assert "synthetic (400 crops: 2)" in capsys.readouterr().err
    assert finetune.warn_small_keep_sets({"general": 3000}, 0.5) == [] and not capsys.readouterr().err


def test_bad_arguments_are_one_line(tmp_path: Path, capsys) -> None:
    assert finetune.main([str(tmp_path), "--val", str(tmp_path), "-o", str(tmp_path / "o"), "--minutes", "0"]) == 2
    assert "--minutes and --train-minutes must be above 0" in capsys.readouterr().err
    assert finetune.main([str(tmp_path), "--val", str(tmp_path), "-o", str(tmp_path / "o"),
                          "--keep-synthetic", "0"]) == 2
    assert "--keep-synthetic 0 needs a --keep SET" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a labelled set"):
        finetune.main([str(tmp_path), "--val", str(tmp_path), "-o", str(tmp_path / "o")])


def test_the_domain_looks_keep_the_word_and_split_the_set(tmp_path: Path) -> None:
    """benchmarks.finetune_domain: every crop lands in exactly one split, each look gives an
    image (the LED look lights the text: few lamps lit, on black)."""
    import numpy as np
    from PIL import Image

    from benchmarks import finetune_domain

    src = _set(tmp_path / "src", ["coffee", "Station", "OPEN", "hello", "pizza", "EXIT", "2026", "Bakery",
                                  "north", "Taxi"])
    for look in ("lowres", "led", "night"):
        sizes = finetune_domain.build(src, tmp_path / look, seed=1, look=look)
        assert sizes == {"train": 7, "val": 1, "test": 2}
        rows = [line.split("\t") for split in sizes
                for line in (tmp_path / look / split / "labels.tsv").read_text().splitlines()]
        assert sorted(label for _, label in rows) == sorted(["coffee", "Station", "OPEN", "hello", "pizza", "EXIT",
                                                              "2026", "Bakery", "north", "Taxi"])
    lamps = np.asarray(Image.open(next((tmp_path / "led" / "train" / "images").glob("*.png"))).convert("L"))
    assert lamps.shape[0] == finetune_domain.LED_ROWS * finetune_domain.LED_PITCH
    assert 0.02 < (lamps > 128).mean() < 0.5
    crop = Image.open(src / "images" / "w0.png").convert("RGB")
    dark = finetune_domain.night(crop)
    assert dark.size == crop.size and np.asarray(dark).mean() < 0.5 * np.asarray(crop).mean()
    assert np.array_equal(np.asarray(dark), np.asarray(finetune_domain.night(crop)))  # the same noise each time
