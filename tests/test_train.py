"""Trainer: overrides, optimizer groups, schedule, a short run, resume and DDP replicas."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from training.config import TrainConfig, load_config, model_config
from training.model.clip4str import CLIP4STR
from training.optim import lr_factor, parameter_groups
from training.train import apply_overrides, train

torch.set_num_threads(1)


def test_overrides_parse_json_values() -> None:
    doc = apply_overrides({"train": {"max_steps": 5}}, ["train.max_steps=7", 'train.train_data=["a","b"]',
                                                       "model.decoder.depth=2", "train.log=tensorboard"])
    assert doc["train"] == {"max_steps": 7, "train_data": ["a", "b"], "log": "tensorboard"}
    assert doc["model"]["decoder"]["depth"] == 2
    with pytest.raises(ValueError):
        apply_overrides({}, ["novalue"])


def test_parameter_groups_follow_the_lr_rule_and_decay_exclusions() -> None:
    model = CLIP4STR(model_config("clip4str-tiny"))
    cfg = TrainConfig(lr=8.4e-5, decoder_lr_scale=19.0, weight_decay=0.2)
    groups = {g["name"]: g for g in parameter_groups(model, cfg, total_batch=256)}
    assert groups["clip"]["lr"] == pytest.approx(8.4e-5 * 256 / 512)
    assert groups["decoder"]["lr"] == pytest.approx(19 * 8.4e-5 * 256 / 512)
    assert groups["clip_no_decay"]["weight_decay"] == 0.0 and groups["decoder"]["weight_decay"] == 0.2
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ["visual_decoder.pos_queries", "visual_decoder.embedding.weight", "visual_decoder.head.bias",
                 "image_encoder.visual.class_embedding", "image_encoder.visual.positional_embedding",
                 "cross_decoder.layers.0.norm_mlp.weight"]:
        assert id(named[name]) in no_decay, name
    assert id(named["visual_decoder.head.weight"]) not in no_decay
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == trainable


def test_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0.0, 0.1) == 0.0
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(0.5, 0.1) < lr_factor(0.3, 0.1)


def _tiny_run(out: Path, **train_overrides) -> tuple:
    model_cfg, tcfg = load_config("clip4str-tiny")
    values = dict(tcfg.__dict__, synthetic_train=64, synthetic_val=16, batch_size=8, max_steps=4, val_every=2,
                  num_workers=0, output_dir=str(out))
    values.update(train_overrides)
    return model_cfg, TrainConfig(**values)


def test_short_run_writes_best_checkpoint_and_resumes(tmp_path: Path) -> None:
    model_cfg, tcfg = _tiny_run(tmp_path / "run")
    summary = train(model_cfg, tcfg)
    assert summary["steps"] == 4
    assert (tmp_path / "run/best/model.safetensors").is_file() and (tmp_path / "run/best/model.json").is_file()
    assert (tmp_path / "run/log.csv").read_text().count("train/loss") >= 1
    tcfg.max_steps = 6
    resumed = train(model_cfg, tcfg, resume=str(tmp_path / "run/last"))
    assert resumed["steps"] == 6


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model_cfg, tcfg = _tiny_run(Path(out) / "run", max_steps=3, val_every=100, synthetic_val=0)
    summary = train(model_cfg, tcfg)
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_replica(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["world_size"] == second["world_size"] == 2
    assert first["steps"] == second["steps"] == 3
    assert first["param_checksum"] == second["param_checksum"]
    # and they did train: parameters moved away from the shared initialisation
    torch.manual_seed(0)
    fresh = CLIP4STR(model_config("clip4str-tiny"))
    assert first["param_checksum"] != float(sum(p.double().abs().sum() for p in fresh.parameters()))


def test_synthetic_difficulty_reaches_both_synthetic_sets() -> None:
    from training.train import _train_dataset, _val_dataset

    model_cfg, tcfg = load_config("clipllama-small")
    tcfg = TrainConfig(**{**tcfg.__dict__, "synthetic_train": 50, "synthetic_val": 5,
                          "synthetic_difficulty": 0.25, "train_data": [], "val_data": []})
    train_set, val_set = _train_dataset(model_cfg, tcfg), _val_dataset(model_cfg, tcfg)
    assert train_set.difficulty == val_set.difficulty == 0.25
    assert train_set.seed != val_set.seed  # held-out words
