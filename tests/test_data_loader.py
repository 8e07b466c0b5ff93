"""Augmentation op space, collate, build_dataset/build_loader (incl. workers and DDP sampler)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.transforms import autoaugment

from runtime.preprocess import Preprocessing
from training.data import (
    STRRandAugment,
    SynthWords,
    build_dataset,
    build_loader,
    collate,
    parse_synth_spec,
)
from training.data.lmdb_io import write_lmdb
from training.data.transforms import augmentation, build_transform

SPEC = Preprocessing(32, 128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (50 + i, 20), (i * 20 % 255, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "db"
    write_lmdb(path, [(_png(i), f"word{i}") for i in range(10)])
    return path


def test_randaugment_space_has_no_sharpness_or_invert(monkeypatch):
    aug = STRRandAugment()
    assert (aug.num_ops, aug.magnitude) == (3, 5)
    space = aug._augmentation_space(31, (32, 128))
    assert "Sharpness" not in space and "Invert" not in space
    assert {"Rotate", "ShearX", "Contrast", "Posterize", "Solarize", "Equalize"} <= set(space)

    seen = []
    real = autoaugment._apply_op

    def spy(img, op_name, magnitude, interpolation, fill):
        seen.append(op_name)
        return real(img, op_name, magnitude, interpolation, fill)

    monkeypatch.setattr(autoaugment, "_apply_op", spy)
    torch.manual_seed(0)
    image = Image.new("RGB", (100, 32), (200, 30, 30))
    for _ in range(150):
        out = aug(image)
        assert out.size == image.size and out.mode == "RGB"
    assert len(seen) == 450 and len(set(seen)) >= 10
    assert "Sharpness" not in seen and "Invert" not in seen


def test_augmented_transform_gives_tensors():
    torch.manual_seed(0)
    image = Image.new("RGB", (90, 30), (10, 200, 30))
    out = build_transform(SPEC, augment=True)(image)
    assert tuple(out.shape) == (3, 32, 128) and out.dtype == torch.float32
    assert augmentation(blur_p=1.0, noise_p=1.0)(image).size == image.size


def test_collate_shapes_and_errors():
    batch = [(torch.zeros(3, 32, 128), "ab"), (torch.ones(3, 32, 128), "c")]
    images, labels = collate(batch)
    assert tuple(images.shape) == (2, 3, 32, 128) and images.dtype == torch.float32
    assert labels == ["ab", "c"]
    with pytest.raises(TypeError, match="Preprocessing"):
        collate([(Image.new("RGB", (4, 4)), "x")])


def test_parse_synth_spec():
    assert parse_synth_spec("synth:100") == (100, 0, 1.0)
    assert parse_synth_spec("synth:100:9", seed=3) == (100, 9, 1.0)
    assert parse_synth_spec("synth:100", seed=3) == (100, 3, 1.0)
    assert parse_synth_spec("synth:100:9:0.25") == (100, 9, 0.25)
    assert parse_synth_spec("/data/x") is None
    with pytest.raises(ValueError, match="synth:N"):
        parse_synth_spec("synth:lots")
    with pytest.raises(ValueError, match="DIFFICULTY"):
        parse_synth_spec("synth:100:9:hard")
    with pytest.raises(ValueError, match=r"difficulty must be within \[0, 1\]"):
        build_dataset("synth:100:9:2", SPEC)  # refused when the set is built


def test_build_dataset_synth_and_path(lmdb_dir):
    ds = build_dataset("synth:20:4", SPEC, charset="94", max_length=25, train=True)
    assert isinstance(ds, SynthWords) and len(ds) == 20 and ds.seed == 4
    tensor, label = ds[0]
    assert tuple(tensor.shape) == (3, 32, 128) and label
    raw = build_dataset(str(lmdb_dir), None, train=False)
    assert isinstance(raw[0][0], Image.Image) and raw[0][1] == "word0"


def test_build_loader_mixes_sources(lmdb_dir):
    loader = build_loader([str(lmdb_dir), "synth:14"], SPEC, charset="36", batch_size=8, train=True, seed=1)
    batches = list(loader)
    assert len(batches) == 3  # 24 samples, drop_last in training
    images, labels = batches[0]
    assert tuple(images.shape) == (8, 3, 32, 128) and len(labels) == 8
    order = [lab for _, labs in batches for lab in labs]
    again = [lab for _, labs in build_loader([str(lmdb_dir), "synth:14"], SPEC, charset="36", batch_size=8,
                                             train=True, seed=1) for lab in labs]
    assert order == again  # the seed fixes the shuffle


def test_eval_loader_keeps_order_and_all(lmdb_dir):
    loader = build_loader(str(lmdb_dir), SPEC, batch_size=4, train=False)
    labels = [lab for _, labs in loader for lab in labs]
    assert labels == [f"word{i}" for i in range(10)]


def test_loader_with_worker_after_parent_read(lmdb_dir):
    loader = build_loader(str(lmdb_dir), SPEC, batch_size=5, train=False, workers=1)
    loader.dataset[0]  # the parent has the environment open before the worker forks
    labels = [lab for _, labs in loader for lab in labs]
    assert labels == [f"word{i}" for i in range(10)]


def test_distributed_sampler(lmdb_dir, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_loader(str(lmdb_dir), SPEC, batch_size=4, train=True, distributed=True, seed=2)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(1)
        assert sum(len(labels) for _, labels in loader) == 8
    finally:
        dist.destroy_process_group()


def test_empty_source_is_an_error(tmp_path):
    write_lmdb(tmp_path / "db", [(_png(0), "x" * 40)])
    with pytest.raises(ValueError, match="no usable samples"):
        build_loader(str(tmp_path / "db"), SPEC, batch_size=2, train=True)
