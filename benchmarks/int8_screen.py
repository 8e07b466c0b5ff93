"""Screen static INT8 variants of a bundle's image encoder by the tower's own CTC reading.

    python -m benchmarks.int8_screen BUNDLE --calibration SET --dev SET... -o DIR
        [--variants NAME...] [--crops N] [--exact]

Every variant (:data:`VARIANTS`: calibration method, crops, the quantizer's options, layer
groups kept in FP32) is quantized from the same prepared graph and read on each dev set by
``export.static_int8.EncoderProbe`` (best-path CTC of the encoder alone, against the FP32
encoder: seconds, where the whole pipeline takes minutes). One JSON line per variant goes
to ``DIR/screen.jsonl``; a variant already there is not run again (so a stopped screen
resumes). Calibration ranges are cached per method, crops and calibration options.
Choose only on training-carved dev sets (``benchmarks.int8_sets``), never an eval set.
``--exact`` reads the QDQ graphs unfused (float math on the int8 grids, so nothing saturates as
on x86 CPUs without VNNI) rather than with this CPU's fused kernels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export import static_int8 as q

#: the neck and head groups (the sensitivity pass's costliest are among them)
NECK = ("features/neck/encoder/conv_reduce",)


@dataclass(frozen=True)
class Variant:
    """One way to quantize: the method, how many calibration crops, options passed to
    ``static_int8.quantize``, layer groups (prefixes of node scopes) kept in FP32 and the
    activations given 16 bits (calibrated tensors whose names contain any of ``wide``;
    ``"/"``: every one; onnxruntime's CPU kernels then run those ops in float)."""

    method: str = "entropy"
    crops: int = 320
    options: dict[str, Any] = field(default_factory=dict)
    fp32_groups: tuple[str, ...] = ()
    wide: tuple[str, ...] = ()

    def cache_key(self) -> str:
        """What the calibration ranges depend on."""
        calib = {k: v for k, v in sorted(self.options.items()) if k.startswith("Calib")}
        text = json.dumps([self.method, self.crops, calib], sort_keys=True)
        return f"{self.method}.{self.crops}.{hashlib.sha1(text.encode()).hexdigest()[:8]}"


#: the layer groups by the shipped bundle's sensitivity pass, costliest first
RANKED = ("features/neck/encoder/conv_reduce", "features/backbone/blocks4/blocks4.0",
          "features/backbone/blocks5/blocks5.1", "features/backbone/blocks2/blocks2.0",
          "features/backbone/blocks4/blocks4.4", "features/backbone/conv1/stem4")
#: the first convolution's weights (3 input channels at full resolution): the layer whose 8-bit
#: products saturate most on x86 CPUs without VNNI (docs/int8.md)
STEM1 = "encoder.features.backbone.conv1.stem1.conv.weight"
#: the groups the shipped bundle keeps in FP32
SHIPPED = RANKED[:2]

VARIANTS: dict[str, Variant] = {
    "entropy320": Variant(),
    "entropy320_x2": Variant(fp32_groups=SHIPPED),
    "entropy2000": Variant(crops=2000),
    "entropy2000_x2": Variant(crops=2000, fp32_groups=SHIPPED),
    "entropy1000": Variant(crops=1000),
    "entropy320_actsym": Variant(options={"ActivationSymmetric": True}),
    "entropy320_s8": Variant(options={"activations": "int8", "ActivationSymmetric": True}),
    "entropy320_pertensor": Variant(options={"per_channel": False}),
    "pct9999_2000": Variant("percentile", 2000, {"CalibPercentile": 99.99}),
    "pct999_2000": Variant("percentile", 2000, {"CalibPercentile": 99.9}),
    "pct99999_2000": Variant("percentile", 2000),
    "minmax_avg2000": Variant("minmax", 2000, {"CalibMovingAverage": True}),
    "entropy2000_x1": Variant(crops=2000, fp32_groups=RANKED[:1]),
    "entropy2000_x3": Variant(crops=2000, fp32_groups=RANKED[:3]),
    "entropy2000_x4": Variant(crops=2000, fp32_groups=RANKED[:4]),
    "entropy2000_x6": Variant(crops=2000, fp32_groups=RANKED),
    "entropy2000_neck": Variant(crops=2000, fp32_groups=("features/neck",)),
    "entropy320_a16": Variant(wide=("/",)),
    "entropy320_a16_stem": Variant(wide=("conv1/",)),
    "entropy320_a16_neck": Variant(wide=("/neck/",)),
    # x86 CPUs without VNNI: u8 x s8 products saturate (runtime.backends.int8_dot_saturates)
    "entropy2000_neck_r7": Variant(crops=2000, options={"reduce_range": True}, fp32_groups=("features/neck",)),
    "entropy2000_neck_u8u8": Variant(crops=2000, options={"weights": "uint8"}, fp32_groups=("features/neck",)),
    "entropy2000_neck_stem1r7": Variant(crops=2000, options={"weights_7bit": [STEM1]}, fp32_groups=("features/neck",)),
    "entropy2000_neck_stem1u8": Variant(crops=2000, options={"weights_uint8": [STEM1]}, fp32_groups=("features/neck",)),
    "entropy2000_neck_s8s8": Variant(crops=2000, options={"activations": "int8", "ActivationSymmetric": True},
                                     fp32_groups=("features/neck",)),
}


def _prepare(bundle_dir: Path, work: Path) -> Path:
    from runtime.bundle import load_bundle

    prepared = work / "prepared.onnx"
    if not prepared.is_file():
        bundle = load_bundle(bundle_dir, verify=False)
        q.prepare(bundle.path(bundle.graph("fp32", "image_encoder").file), prepared)
    return prepared


def nodes_in(groups: dict[str, list[str]], prefixes: tuple[str, ...]) -> list[str]:
    """The quantizable nodes of the groups that start with any of ``prefixes``."""
    return [n for g, nodes in groups.items() if any(g.startswith(p) for p in prefixes) for n in nodes]


def wide_overrides(cache: Path, wide: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """``TensorQuantOverrides`` giving 16-bit (uint16) activations to the calibrated tensors
    whose names contain any of ``wide``."""
    from onnxruntime.quantization import QuantType

    names = json.loads(cache.read_text())["data"]
    return {n: [{"quant_type": QuantType.QUInt16}] for n in names if any(w in n for w in wide)}


def run_variant(name: str, variant: Variant, prepared: Path, work: Path, calibration: Path,
                probes: list[q.EncoderProbe], spec: Any, groups: dict[str, list[str]],
                evaluator: q.Evaluator | None = None,
                fixed: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Quantize ``variant`` and score it on every probe (and with the whole pipeline when
    an ``evaluator`` is given); ``fixed``: scales and zero points that replace the
    calibrated ones (``TensorQuantOverrides`` by tensor name)."""
    cache = work / f"calibration.{variant.cache_key()}.json"
    reader = None
    if not cache.is_file():
        images, _ = q.load_crops(calibration, variant.crops)
        reader = q.CropBatches(q.crop_batches(images, spec))
    out = work / f"{name}.onnx"
    start = time.perf_counter()
    options = dict(variant.options)
    overrides = dict(fixed or {})
    if variant.wide:
        if not cache.is_file():  # the tensor names come from the calibration
            q.quantize(prepared, out, variant.method, cache, reader)
        overrides.update(wide_overrides(cache, variant.wide))
    if overrides:
        options["TensorQuantOverrides"] = overrides
    q.quantize(prepared, out, variant.method, cache, reader, exclude=nodes_in(groups, variant.fp32_groups),
               options=options)
    row: dict[str, Any] = {"variant": name, "method": variant.method, "crops": variant.crops,
                           "options": variant.options, "fp32_groups": list(variant.fp32_groups),
                           "wide": list(variant.wide),
                           "quantize_s": round(time.perf_counter() - start, 1), "ctc_accuracy_drop": {},
                           "changed_strings": {}, "feature_error": {}}
    for probe in probes:
        score = probe.score(out)
        # None: the encoder has no CTC head to read with
        row["ctc_accuracy_drop"][probe.name] = score["ctc_accuracy_drop"].get(probe.name)
        row["changed_strings"][probe.name] = score["changed_strings"]
        row["feature_error"][probe.name] = score["feature_error"]
    if evaluator is not None:
        row["pipeline"] = evaluator.score(out).as_dict(evaluator.reference)
    row["file"] = str(out)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_screen", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calibration", type=Path, required=True, help="calibration crops (training data)")
    parser.add_argument("--dev", nargs="+", required=True, help="labelled dev sets carved from training data")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ranges-from", type=Path, metavar="QDQ_ONNX",
                        help="take every activation's scale and zero point from this int8 graph (of the same "
                             "export; e.g. the one a training.qat --grid run trained on)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also read the dev sets with the whole pipeline (minutes per variant)")
    parser.add_argument("--exact", action="store_true",
                        help="read each int8 graph unfused (nothing saturates), not with this CPU's fused "
                             "kernels; results go to DIR/screen-exact.jsonl")
    args = parser.parse_args(argv)
    if args.ranges_from is not None and not args.ranges_from.is_file():
        print(f"error: --ranges-from {args.ranges_from}: no such file", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from runtime.bundle import load_bundle

    args.output.mkdir(parents=True, exist_ok=True)
    results = args.output / ("screen-exact.jsonl" if args.exact else "screen.jsonl")
    done = {json.loads(line)["variant"] for line in results.read_text().splitlines()} if results.is_file() else set()
    todo = [v for v in args.variants if v not in done]
    if not todo:
        print("every variant is already in", results)
        return 0
    bundle = load_bundle(args.bundle, verify=False)
    prepared = _prepare(args.bundle, args.output)
    groups = q.layer_groups(q.onnx.load(str(prepared)))
    probes = [q.EncoderProbe(prepared, dev, bundle.preprocessing, bundle.charset, args.threads, exact=args.exact)
              for dev in q.dev_sets_from(args.dev)]
    for probe in probes:
        print(f"fp32 CTC reading {probe.name}: {probe.reference_accuracy:.3f}", flush=True)
    evaluator = q.Evaluator(args.bundle, q.dev_sets_from(args.dev), args.threads) if args.pipeline else None
    fixed = q.scale_overrides(args.ranges_from) if args.ranges_from is not None else None
    for name in todo:
        row = run_variant(name, VARIANTS[name], prepared, args.output, args.calibration, probes,
                          bundle.preprocessing, groups, evaluator, fixed)
        with results.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{name:24s} drop {row['ctc_accuracy_drop']} changed {row['changed_strings']} "
              f"error {row['feature_error']} ({row['quantize_s']} s)", flush=True)
        if "pipeline" in row:
            print(f"{'':24s} pipeline drop {row['pipeline']['accuracy_drop']} "
                  f"changed {row['pipeline']['changed_strings']}", flush=True)
    if evaluator is not None:
        evaluator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
