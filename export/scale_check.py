"""Export a full-size model with random weights and report time, sizes and FP32 parity.

    python -m export.scale_check [--config clip4str-b16] [--work /tmp/scale_check]
                                 [--precision fp32 fp16 int8] [--images 8] [--threads 2]

Builds ``CLIP4STR(model_config(CONFIG))`` with random weights, saves it as a checkpoint,
exports the bundle, and runs the parity report (``export.verify``) on a few real word
crops (``../shared/data/eval/ic13``) or drawn words. Prints one JSON object as the last
line. Minutes of CPU for clip4str-b16: not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from export.onnx import PRECISIONS, _log_to_stderr, export_bundle
from export.verify import Sample, load_set, make_recognizers, reference_model, verify_set
from training.checkpoint import save_checkpoint
from training.config import model_config
from training.model.clip4str import CLIP4STR

IC13 = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "ic13" / "labels_857.tsv"


def _samples(n: int) -> list[Sample]:
    if IC13.is_file():
        return load_set(str(IC13), limit=n).samples
    words = ["hello", "STOP", "cafe42", "parking", "OPEN", "x", "street", "2024"]
    out = []
    for i in range(n):
        word = words[i % len(words)]
        image = Image.new("RGB", (30 + 12 * len(word), 32), (240, 230 - 10 * (i % 8), 200))
        ImageDraw.Draw(image).text((5, 10), word, fill=(20, 20, 90))
        out.append(Sample(image, word))
    return out


def _sizes(bundle: Path) -> dict[str, int]:
    return {p.relative_to(bundle).as_posix(): p.stat().st_size for p in sorted(bundle.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.scale_check",
                                     description="Export a random full-size model: time, sizes, parity.")
    parser.add_argument("--config", default="clip4str-b16")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale_check"))
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    _log_to_stderr()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict = {"config": args.config, "threads": args.threads}
    began = time.perf_counter()
    model = CLIP4STR(model_config(args.config)).eval()
    ckpt = save_checkpoint(model, args.work / "ckpt")
    report["checkpoint_seconds"] = round(time.perf_counter() - began, 1)
    report["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    del model
    began = time.perf_counter()
    bundle = export_bundle(ckpt, args.work / "bundle", args.precision, threads=args.threads)
    report["export_seconds"] = round(time.perf_counter() - began, 1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    report["graphs"] = {name: {k: info[k] for k in ("nodes", "seconds", "max_abs_diff")}
                        for name, info in manifest["created"]["graphs"].items()}
    report["sizes"] = _sizes(bundle)
    recognizers = make_recognizers(str(bundle), args.precision, args.threads)
    result = verify_set(reference_model(str(ckpt)), recognizers, _samples(args.images), batch_size=args.images)
    report["parity"] = result
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
