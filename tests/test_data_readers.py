"""Folder and LMDB readers: label policy, broken images, set detection, make_lmdb."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import data_path

from runtime.preprocess import ImageError, Preprocessing
from training.data import FolderSet, LmdbSet, open_set
from training.data.lmdb_io import find_lmdb_dirs, write_lmdb
from training.data.make_lmdb import main as make_lmdb_main

IC13 = data_path("eval", "ic13")

LABELS = ["Hello", "wörld", "a b", "x" * 30, "", "OK!"]
# what training keeps (94 charset, max 25): accents reduced, spaces removed, too long/empty dropped
TRAIN_KEPT = ["Hello", "world", "ab", "OK!"]
# evaluation keeps raw labels, dropping only those over 25 characters
EVAL_KEPT = ["Hello", "wörld", "a b", "", "OK!"]


def _png(colour: int, size=(40, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (colour, 255 - colour, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, labels=LABELS, broken: set[int] = frozenset()) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i, label in enumerate(labels):
        name = f"img_{i}.png"
        data = b"not an image" if i in broken else _png(10 * i)
        (root / "images" / name).write_bytes(data)
        lines.append(f"{name}\t{label}")
    (root / "labels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_folder_train_normalises_labels(tmp_path):
    ds = open_set(make_folder(tmp_path / "set"), charset="94", max_length=25, train=True)
    assert isinstance(ds, FolderSet)
    assert ds.labels == TRAIN_KEPT
    assert ds.num_raw == len(LABELS) and ds.num_dropped == 2
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (40, 16)
    assert label == "Hello"
    # the image matches its label's line (not shifted by the dropped ones)
    assert np.asarray(ds[3][0])[0, 0, 0] == 50


def test_folder_36_charset_lowercases(tmp_path):
    ds = open_set(make_folder(tmp_path / "set"), charset="36", train=True)
    assert ds.labels == ["hello", "world", "ab", "ok"]


def test_folder_eval_keeps_raw_labels(tmp_path):
    ds = open_set(make_folder(tmp_path / "set"), max_length=25, train=False)
    assert ds.labels == EVAL_KEPT
    assert ds.num_dropped == 1 and ds.broken == []


def test_labels_file_path_uses_sibling_images(tmp_path):
    root = make_folder(tmp_path / "set")
    (root / "labels.tsv").rename(root / "labels_small.tsv")
    ds = open_set(root / "labels_small.tsv", train=True)
    assert ds.labels == TRAIN_KEPT and ds[1][0].size == (40, 16)
    with pytest.raises(FileNotFoundError, match="labels_small.tsv"):
        open_set(root)  # a folder with only other .tsv files says which to pick


def test_malformed_labels_file_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "set")
    (root / "labels.tsv").write_text("img_0.png\tok\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels.tsv:2"):
        open_set(root)


def test_open_set_rejects_other_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_set(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no labels.tsv and no LMDB"):
        open_set(tmp_path / "empty")


def test_broken_image_eval_verified_and_reported(tmp_path):
    root = make_folder(tmp_path / "set", labels=["aa", "bb", "cc"], broken={1})
    (root / "labels.tsv").write_text("img_0.png\taa\nimg_1.png\tbb\nimg_2.png\tcc\nmissing.png\tdd\n")
    ds = open_set(root, train=False)
    assert ds.labels == ["aa", "cc"]
    assert [key for key, _ in ds.broken] == ["img_1.png", "missing.png"]
    assert [ds[i][1] for i in range(len(ds))] == ["aa", "cc"]


def test_broken_image_train_is_skipped_with_warning(tmp_path):
    ds = open_set(make_folder(tmp_path / "set", labels=["aa", "bb", "cc"], broken={1}), train=True)
    assert len(ds) == 3  # not verified up front in training
    with pytest.warns(UserWarning, match="img_1.png"):
        image, label = ds[1]
    assert label == "cc" and image.size == (40, 16)  # the next readable item stands in
    assert ds.num_skipped == 1
    # without verification, evaluation raises a clear error instead
    ds_eval = open_set(tmp_path / "set", train=False, verify=False)
    with pytest.raises(ImageError, match="img_1.png"):
        ds_eval[1]


def test_transform_gives_model_tensor(tmp_path):
    from training.data import ToModelInput

    ds = open_set(make_folder(tmp_path / "set"), train=True, transform=ToModelInput(Preprocessing(32, 128)))
    tensor, label = ds[0]
    assert tuple(tensor.shape) == (3, 32, 128) and str(tensor.dtype) == "torch.float32"


def test_lmdb_round_trip_and_tree(tmp_path):
    samples = [(_png(10 * i), label) for i, label in enumerate(LABELS)]
    assert write_lmdb(tmp_path / "tree" / "a", samples) == len(LABELS)
    assert write_lmdb(tmp_path / "tree" / "sub" / "b", samples[:2]) == 2
    with pytest.raises(FileExistsError):
        write_lmdb(tmp_path / "tree" / "a", samples)
    assert [p.name for p in find_lmdb_dirs(tmp_path / "tree")] == ["a", "b"]

    one = open_set(tmp_path / "tree" / "a", train=True)
    assert isinstance(one, LmdbSet) and one.labels == TRAIN_KEPT and one.num_dropped == 2
    assert np.asarray(one[3][0])[0, 0, 0] == 50  # OK! is sample 6, colour 50

    tree = open_set(tmp_path / "tree", train=False)
    assert len(tree) == len(EVAL_KEPT) + 2
    assert [tree[i][1] for i in range(len(tree))] == EVAL_KEPT + ["Hello", "wörld"]
    assert tree.num_dropped == 1 and "samples" in tree.summary()


def test_lmdb_broken_image_and_pickling(tmp_path):
    import pickle

    write_lmdb(tmp_path / "db", [(_png(0), "aa"), (b"garbage", "bb"), (_png(9), "cc")])
    ds = open_set(tmp_path / "db", train=False)
    assert ds.labels == ["aa", "cc"] and ds.broken[0][0] == "image-000000002"
    ds[0]  # opens the environment
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert clone[1][1] == "cc"


def test_make_lmdb_command(tmp_path, capsys):
    root = make_folder(tmp_path / "set", broken={2})
    assert make_lmdb_main([str(root), "-o", str(tmp_path / "out")]) == 0
    assert "1 unreadable skipped" in capsys.readouterr().out
    ds = open_set(tmp_path / "out", train=False)
    assert ds.labels == [lab for i, lab in enumerate(EVAL_KEPT) if i != 2]
    # the bytes are copied as they were
    assert ds.source(0) == (root / "images" / "img_0.png").read_bytes()
    # a labels file works as the source too; an existing LMDB is not replaced
    assert make_lmdb_main([str(root / "labels.tsv"), "-o", str(tmp_path / "out")]) == 2
    assert make_lmdb_main([str(root / "labels.tsv"), "-o", str(tmp_path / "out"), "--overwrite"]) == 0


def test_ic13_smoke():
    labels = IC13 / "labels_857.tsv"
    if not labels.is_file():
        pytest.skip(f"real data not present at {IC13}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_set(labels, charset="94", train=True)
    assert len(ds) == 857 and ds.num_dropped == 0
    for i in range(5):
        image, label = ds[i]
        assert image.mode == "RGB" and min(image.size) > 5 and label
    assert ds[0][1] == "Tiredness"
