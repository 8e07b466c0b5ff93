"""Validation split carved from a training folder set."""

from pathlib import Path

from PIL import Image

from training.data import open_set
from training.data.split import split_set


def test_split_is_disjoint_complete_and_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "set"
    (src / "images").mkdir(parents=True)
    lines = []
    for i in range(40):
        Image.new("RGB", (20, 10), (i, i, i)).save(src / "images" / f"w{i}.png")
        lines.append(f"w{i}.png\tword{i}")
    (src / "labels.tsv").write_text("\n".join(lines) + "\n")
    train, val = split_set(src, tmp_path / "a", 0.25, seed=3)
    t_names = {line.split("\t")[0] for line in train.read_text().splitlines()}
    v_names = {line.split("\t")[0] for line in val.read_text().splitlines()}
    assert len(v_names) == 10 and not t_names & v_names and len(t_names | v_names) == 40
    again = split_set(src, tmp_path / "b", 0.25, seed=3)[1]
    assert again.read_text() == val.read_text()
    assert len(open_set(val, "94", 25, train=False)) == 10
