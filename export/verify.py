"""Parity report: the PyTorch checkpoint against its bundle, on labelled sets.

    python -m export.verify BUNDLE_DIR --ckpt CKPT SET... [--precision fp32 fp16 int8]
                            [--synthetic N] [--limit N] [--batch-size 32] [--json]

For every set the same pictures go through the PyTorch model (``early_exit=False``, so
logits are comparable position by position) and through the runtime's own
:class:`runtime.recognizer.Recognizer` on onnxruntime CPU, one per precision; both
preprocess with ``runtime.preprocess.preprocess``. A recording backend keeps every graph
output the recognizer computes. Reported per precision: % of final strings identical to
PyTorch (and to the fp32 bundle), the max |ONNX - PyTorch| per graph output (end to end:
each graph reads the bundle's own upstream outputs), word accuracy and 1 - NED under the
protocol (``runtime.charset.WordAccuracy``) and milliseconds per image. ``--json`` prints
one JSON object as the last line.

A SET is a folder with ``images/`` and ``labels.tsv``, a labels ``.tsv`` (images in the
sibling ``images/``) or an LMDB folder, read by ``training.data.open_set`` (evaluation
label policy: labels over 25 characters dropped, unreadable images left out and counted);
``runtime.inputs.open_input`` stands in where ``training.data`` is not installed.
``--synthetic N`` adds N generated words (``training.data``'s ``synth:N:0``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from runtime.backends import PRECISIONS, RECHECK_KEYS, RECHECKED, Backend, int8_variant, select_backend
from runtime.bundle import load_bundle
from runtime.charset import WordAccuracy, keep_for_eval, weighted_total
from runtime.preprocess import ImageError, load_image, preprocess, width_groups
from runtime.recognizer import Recognizer
from training.checkpoint import load_checkpoint
from training.model.clip4str import CLIP4STR

#: graph outputs compared, as ``graph.output`` (text features split into the two calls)
OUTPUTS = ("image_encoder.image_features", "image_encoder.ctc_log_probs",
           "visual_decoder.ar_logits", "visual_decoder.refined_logits",
           "text_encoder.text_features_ar", "text_encoder.text_features_refined",
           "cross_decoder.ar_logits", "cross_decoder.refined_logits")


#: what ``--precision`` takes: the graph precisions and int8+fp32 (fp32 re-reads of unsure crops)
VARIANTS = (*PRECISIONS, RECHECKED)


class VerifyError(RuntimeError):
    """A set or bundle that cannot be verified."""


class RecordingBackend:
    """Wraps a backend and keeps the outputs of every graph call since :meth:`clear`."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.precision = inner.precision
        #: int8+fp32: the recognizer writes the fp32 rows into the recorded int8 outputs in place
        self.below_confidence = getattr(inner, "below_confidence", None)
        self.calls: list[tuple[str, dict[str, np.ndarray]]] = []

    def run_reference(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.run_reference(graph, feeds)  # type: ignore[attr-defined]

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.inner.run(graph, feeds)
        self.calls.append((graph, outputs))
        return outputs

    def clear(self) -> None:
        self.calls = []

    def outputs(self) -> dict[str, np.ndarray]:
        """The recorded outputs as ``graph.output`` (text features split in AR / refined)."""
        out: dict[str, list[np.ndarray]] = {}
        for graph, outputs in self.calls:
            for name, value in outputs.items():
                if graph == "text_encoder":
                    half = len(value) // 2
                    out.setdefault(f"{graph}.{name}_ar", []).append(value[:half])
                    out.setdefault(f"{graph}.{name}_refined", []).append(value[half:])
                else:
                    out.setdefault(f"{graph}.{name}", []).append(value)
        return {k: np.concatenate(v) for k, v in out.items()}

    def close(self) -> None:
        self.inner.close()


@dataclass
class Sample:
    image: Image.Image
    label: str


@dataclass
class PrecisionStats:
    """What one precision of the bundle did on one set."""

    identical: int = 0
    identical_fp32: int = 0
    accuracy: WordAccuracy = field(default_factory=WordAccuracy)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    errors: int = 0

    def update_diffs(self, onnx_out: Mapping[str, np.ndarray], torch_out: Mapping[str, np.ndarray]) -> None:
        for key in OUTPUTS:
            if key in onnx_out and key in torch_out:
                diff = float(np.abs(onnx_out[key].astype(np.float32) - torch_out[key]).max())
                self.max_abs_diff[key] = max(self.max_abs_diff.get(key, 0.0), diff)

    def as_dict(self, n: int, with_fp32: bool) -> dict[str, Any]:
        out = {"identical_pct": 100.0 * self.identical / n if n else 0.0,
               "accuracy": self.accuracy.as_dict(), "max_abs_diff": self.max_abs_diff,
               "ms_per_image": 1000.0 * self.seconds / n if n else 0.0, "errors": self.errors}
        if with_fp32:
            out["identical_to_fp32_pct"] = 100.0 * self.identical_fp32 / n if n else 0.0
        return out


# -- sets ---------------------------------------------------------------------------------


def _as_image(data: Any) -> Image.Image:
    if isinstance(data, np.ndarray):
        from runtime.inputs import array_to_image

        return array_to_image(data)
    return load_image(data)


@dataclass
class LoadedSet:
    """A set's readable samples (protocol-kept labels) and what was left out."""

    name: str
    samples: list[Sample]
    unreadable: int = 0
    dropped: int = 0


def _from_dataset(dataset: Any, limit: int | None) -> list[Sample]:
    count = len(dataset) if limit is None else min(limit, len(dataset))
    samples = []
    for i in range(count):
        image, label = dataset[i]
        samples.append(Sample(_as_image(image), label))
    return samples


def load_set(spec: str, max_length: int = 25, limit: int | None = None) -> LoadedSet:
    """Open a labelled set: ``training.data.open_set`` when it exists (its evaluation label
    policy), else ``runtime.inputs.open_input`` with ``runtime.charset.keep_for_eval``."""
    try:
        from training.data import open_set as data_open_set
    except ImportError:
        data_open_set = None
    if data_open_set is not None:
        try:
            dataset = data_open_set(spec, max_length=max_length, train=False)
        except (FileNotFoundError, ValueError) as exc:
            raise VerifyError(str(exc)) from None
        return LoadedSet(str(getattr(dataset, "name", spec)), _from_dataset(dataset, limit),
                         unreadable=len(getattr(dataset, "broken", [])),
                         dropped=int(getattr(dataset, "num_dropped", 0)))
    from runtime.inputs import InputError, open_labelled

    try:
        opened = open_labelled(spec)
    except InputError as exc:
        raise VerifyError(str(exc)) from None
    loaded = LoadedSet(opened.name or spec, [])
    for sample in opened.samples:
        if limit is not None and len(loaded.samples) >= limit:
            break
        if sample.label is None or not keep_for_eval(sample.label, max_length):
            loaded.dropped += 1
            continue
        try:
            loaded.samples.append(Sample(_as_image(sample.data), sample.label))
        except ImageError:
            loaded.unreadable += 1
    return loaded


def load_synthetic(n: int, charset: str, max_length: int, seed: int = 0) -> LoadedSet | None:
    """``n`` generated words from ``training.data``; None (with a message) when it is absent."""
    try:
        from training.data import build_dataset
    except ImportError as exc:
        print(f"synthetic words skipped: training.data is not available ({exc})", file=sys.stderr)
        return None
    dataset = build_dataset(f"synth:{n}:{seed}", None, charset, max_length, train=False)
    return LoadedSet(f"synth:{n}:{seed}", _from_dataset(dataset, None))


# -- PyTorch reference ----------------------------------------------------------------


@torch.inference_mode()
def torch_outputs(model: CLIP4STR, batch: np.ndarray) -> tuple[float, list[str], dict[str, np.ndarray]]:
    """Seconds of the model's forward pass, its final words and the PyTorch values of every
    compared graph output for a preprocessed batch."""
    images = torch.from_numpy(batch)
    began = time.perf_counter()
    out = model(images, early_exit=False)
    seconds = time.perf_counter() - began
    features = model.encode_image(images)
    words = [p.text for p in model.predictions(out)]
    extra = {"image_encoder.ctc_log_probs": out["ctc_log_probs"].numpy()} if "ctc_log_probs" in out else {}
    return seconds, words, {
        **extra,
        "image_encoder.image_features": features.numpy(),
        "visual_decoder.ar_logits": out["visual_ar"].numpy(),
        "visual_decoder.refined_logits": out["visual_refined"].numpy(),
        "text_encoder.text_features_ar": model.encode_text(model.text_ids(out["visual_ar"])).numpy(),
        "text_encoder.text_features_refined": model.encode_text(model.text_ids(out["visual_refined"])).numpy(),
        "cross_decoder.ar_logits": out["cross_ar"].numpy(),
        "cross_decoder.refined_logits": out["cross_refined"].numpy(),
    }


# -- the report -----------------------------------------------------------------------


def verify_set(model: CLIP4STR, recognizers: dict[str, Recognizer], samples: Sequence[Sample],
               batch_size: int = 32) -> dict[str, Any]:
    """Parity and accuracy of every precision on one set of samples."""
    spec = recognizers[next(iter(recognizers))].bundle.preprocessing
    reference = WordAccuracy()
    stats = {p: PrecisionStats() for p in recognizers}
    torch_seconds = 0.0
    if samples:  # warm-up: session initialisation is not counted in the timings
        for recognizer in recognizers.values():
            recognizer.read([samples[0].image])
        torch_outputs(model, preprocess([samples[0].image], spec))
    # batches of equal padded width, as Recognizer.read forms them: each batch is one read
    for indices in width_groups([s.image.size for s in samples], spec, batch_size):
        chunk = [samples[i] for i in indices]
        images, labels = [s.image for s in chunk], [s.label for s in chunk]
        batch = preprocess(images, spec)
        seconds, torch_words, expected = torch_outputs(model, batch)
        torch_seconds += seconds
        reference.update(torch_words, labels)
        fp32_words = None
        for precision, recognizer in recognizers.items():
            backend = recognizer.backend
            assert isinstance(backend, RecordingBackend)
            backend.clear()
            began = time.perf_counter()
            results = recognizer.read(images, batch_size=len(images))
            stats[precision].seconds += time.perf_counter() - began
            words = [r.vision_text if r.ok else None for r in results]
            st = stats[precision]
            st.errors += sum(w is None for w in words)
            st.identical += sum(a == b for a, b in zip(words, torch_words))
            st.accuracy.update([w or "" for w in words], labels)
            if not st.errors:
                st.update_diffs(backend.outputs(), expected)
            if precision == "fp32":
                fp32_words = words
            elif fp32_words is not None:
                st.identical_fp32 += sum(a == b for a, b in zip(words, fp32_words))
    n = len(samples)
    return {"n": n, "pytorch": {**reference.as_dict(), "ms_per_image": 1000.0 * torch_seconds / n if n else 0.0},
            "precisions": {p: s.as_dict(n, "fp32" in recognizers and p != "fp32") for p, s in stats.items()}}


def make_recognizers(bundle_dir: str, precisions: Sequence[str], threads: int) -> dict[str, Recognizer]:
    bundle = load_bundle(bundle_dir)
    precisions = [p for p in VARIANTS if p in precisions]
    needed = {p for p in precisions if p != RECHECKED} | ({"fp32", "int8"} if RECHECKED in precisions else set())
    missing = [p for p in PRECISIONS if p in needed and p not in bundle.precisions]
    if missing:
        raise VerifyError(f"{bundle_dir}: no {', '.join(missing)} graphs (has {', '.join(bundle.precisions)})")
    # decode "full": every graph runs on every crop, as in PyTorch (the bundle's cascade would
    # run the decoders on the gated crops only, and their outputs could not be compared); one
    # view: the graphs are compared, not the runtime's re-reading of doubtful crops
    return {p: Recognizer(bundle, RecordingBackend(select_backend(bundle, "ort-cpu", p, threads)), None,
                          decode="full", views="off")
            for p in precisions}


def reference_model(ckpt: str) -> CLIP4STR:
    """The checkpoint's model with the decode bundles are exported for (refine once, not fast)."""
    model = load_checkpoint(ckpt)
    model.cfg = replace(model.cfg, refine_iters=1, fast_decode=False)
    return model


def _check_same_model(manifest: dict[str, Any], ckpt: str) -> None:
    """Warn when the bundle was exported from other weights than ``ckpt``."""
    from runtime.bundle import sha256_file
    from training.checkpoint import WEIGHTS_NAME, checkpoint_dir

    expected = manifest.get("created", {}).get("checkpoint", {}).get("weights_sha256")
    actual = sha256_file(checkpoint_dir(ckpt) / WEIGHTS_NAME)
    if expected and expected != actual:
        print(f"warning: the bundle was exported from other weights than {ckpt} "
              f"(sha256 {expected[:12]}... vs {actual[:12]}...)", file=sys.stderr)


def _summary_line(name: str, result: dict[str, Any]) -> str:
    torch_acc = result["pytorch"]["accuracy"]
    parts = [f"{name}\tn={result['n']}\tpytorch acc={torch_acc:.2f}"]
    for precision, r in result["precisions"].items():
        worst = max(r["max_abs_diff"].values(), default=float("nan"))
        parts.append(f"{precision}: identical={r['identical_pct']:.2f}% acc={r['accuracy']['accuracy']:.2f} "
                     f"max|diff|={worst:.2e} {r['ms_per_image']:.1f} ms/img")
    return "\t".join(parts)


def describe_variant(manifest: dict[str, Any], precision: str, int8_image: str = "int8") -> dict[str, str]:
    """How each graph of ``precision`` was made, in words: ``static int8 (QDQ, minmax; 2
    layer groups in FP32: ...)``, ``dynamic int8``, or the precision whose file it shares.
    ``int8_image``: the graphs key of the int8 image encoder this CPU reads
    (``runtime.backends.int8_variant``)."""
    if precision == RECHECKED:
        key = RECHECK_KEYS[int8_image]
        below = (manifest.get("defaults") or {}).get(key, {}).get("below_confidence")
        return {"all": f"the static int8 image encoder ({manifest['graphs'][int8_image]['image_encoder']['file']}), "
                       f"the other graphs fp32; crops whose int8 CTC confidence is below {below} (or empty) "
                       "encoded again in fp32"}
    graphs = dict(manifest["graphs"].get(precision, {}))
    if precision == "int8" and int8_image != "int8":
        graphs["image_encoder"] = manifest["graphs"][int8_image]["image_encoder"]
    out = {}
    for name, entry in graphs.items():
        record = entry.get("quantization")
        folder = str(entry["file"]).split("/")[0]
        if record and record.get("mode") == "static":
            excluded = [e["group"] for e in record.get("excluded", [])]
            out[name] = (f"static int8 ({record.get('format', 'QDQ')}, {record['calibration'].get('method')} "
                         f"calibration on {record['calibration'].get('crops')} crops; "
                         + (f"{len(excluded)} layer group(s) in FP32: {', '.join(excluded)})" if excluded
                            else "every layer quantized)"))
        elif folder != precision:
            out[name] = f"the {folder} graph"
        else:
            out[name] = "dynamic int8" if precision == "int8" else precision
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(max(1, args.threads))
    model = reference_model(args.ckpt)
    recognizers = make_recognizers(args.bundle, args.precision, args.threads)
    bundle = next(iter(recognizers.values())).bundle
    manifest, int8_image = bundle.manifest, int8_variant(bundle)
    _check_same_model(manifest, args.ckpt)
    report: dict[str, Any] = {"bundle": str(args.bundle), "ckpt": str(args.ckpt), "sets": {},
                              "variants": {p: describe_variant(manifest, p, int8_image) for p in recognizers}}
    for precision, graphs in report["variants"].items():
        print(f"{precision}: " + "; ".join(f"{g}: {how}" for g, how in graphs.items()))
    cfg = model.cfg
    loaded = [load_set(spec, cfg.max_label_length, args.limit) for spec in args.sets]
    if args.synthetic:
        synthetic = load_synthetic(args.synthetic, cfg.charset_train, cfg.max_label_length)
        if synthetic is not None:
            loaded.append(synthetic)
    for item in loaded:
        result = verify_set(model, recognizers, item.samples, args.batch_size)
        result.update(unreadable=item.unreadable, dropped=item.dropped)
        report["sets"][item.name] = result
        print(_summary_line(item.name, result))
    report["total"] = _total(report["sets"])
    return report


def _total(sets: dict[str, Any]) -> dict[str, Any]:
    results = list(sets.values())
    total: dict[str, Any] = {"pytorch": weighted_total([r["pytorch"] for r in results]), "precisions": {}}
    n = sum(r["n"] for r in results)
    precisions = {p for r in results for p in r["precisions"]}
    for p in sorted(precisions):
        rows = [r for r in results if p in r["precisions"]]
        total["precisions"][p] = {
            "accuracy": weighted_total([r["precisions"][p]["accuracy"] for r in rows]),
            "identical_pct": sum(r["precisions"][p]["identical_pct"] * r["n"] for r in rows) / n if n else 0.0,
            "max_abs_diff": {k: max(r["precisions"][p]["max_abs_diff"].get(k, 0.0) for r in rows)
                             for k in OUTPUTS if any(k in r["precisions"][p]["max_abs_diff"] for r in rows)},
        }
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.verify",
                                     description="PyTorch vs bundle parity and accuracy on labelled sets.")
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--ckpt", required=True, help="the checkpoint the bundle was exported from")
    parser.add_argument("sets", nargs="*", help="folder with labels.tsv, a labels .tsv, or an LMDB")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=VARIANTS)
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="also N generated words")
    parser.add_argument("--limit", type=int, default=None, help="at most this many samples per set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_intermixed_args(argv)
    if not args.sets and not args.synthetic:
        parser.error("give at least one SET or --synthetic N")
    try:
        report = run(args)
    except (VerifyError, ValueError, OSError) as exc:
        print(f"verify failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
