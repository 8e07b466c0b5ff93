"""Word accuracy and 1 - NED of a checkpoint under the evaluation protocol.

    python -m training.evaluate --ckpt CKPT SET... [--json] [--batch-size 64]

A SET is a folder with ``images/`` and ``labels.tsv``, a labels ``.tsv`` file, an LMDB
(tree), or ``synth:N[:SEED[:DIFFICULTY]]`` for generated words. Prediction and label are lowercased and
reduced to ``[0-9a-z]``; labels over 25 characters are dropped; the total is
sample-weighted. ``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from runtime.charset import WordAccuracy, weighted_total
from training.checkpoint import load_checkpoint
from training.data import build_dataset, collate
from training.model.clip4str import CLIP4STR


@torch.inference_mode()
def predict_words(model: CLIP4STR, images: torch.Tensor) -> list[str]:
    """The final (cross-modal) words for a batch of preprocessed images."""
    return [p.text for p in model.predictions(model(images.to(model.device)))]


def evaluate_loader(model: CLIP4STR, batches: Iterable, progress: bool = False) -> dict:
    """``{"n", "accuracy", "ned"}`` over batches of ``(images, labels)``."""
    was_training = model.training
    model.eval()
    meter = WordAccuracy()
    for images, labels in tqdm(batches, disable=not progress, file=sys.stderr, leave=False):
        meter.update(predict_words(model, images), labels)
    model.train(was_training)
    return meter.as_dict()


def evaluate_set(model: CLIP4STR, spec: str, batch_size: int = 64, workers: int = 0,
                 progress: bool = False) -> dict:
    """Score ``model`` on one set (path or ``synth:N[:SEED[:DIFFICULTY]]``) under the protocol."""
    cfg = model.cfg
    dataset = build_dataset(spec, cfg.image, cfg.charset_train, cfg.max_label_length,
                            train=False, augment=False, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return evaluate_loader(model, loader, progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (model.json + model.safetensors)")
    parser.add_argument("sets", nargs="+", help="folder with labels.tsv, a labels .tsv, an LMDB, or synth:N[:SEED]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)

    model = load_checkpoint(args.ckpt, args.device)
    results = {}
    for spec in args.sets:
        results[spec] = evaluate_set(model, spec, args.batch_size, args.workers, progress=True)
        r = results[spec]
        print(f"{spec}\tn={r['n']}\taccuracy={r['accuracy']:.2f}\t1-NED={r['ned']:.2f}")
    total = weighted_total(list(results.values()))
    print(f"total\tn={total['n']}\taccuracy={total['accuracy']:.2f}\t1-NED={total['ned']:.2f}")
    if args.json:
        print(json.dumps({"sets": results, "total": total, "ckpt": str(args.ckpt)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
