"""Latency per stage and end to end, per backend and precision, against PyTorch eager.

    python -m benchmarks.latency --engine BUNDLE [--ckpt CKPT] [--set SET] [--batches 1,8,32]
        [--repeats N] [--threads N[,N...]] [--also BUNDLE...] [--only ENGINE...]
        [--llm PATH ...] [--json] [--plot FILE]

Every available backend and precision of the bundle (onnxruntime CPU FP32/FP16/INT8; CUDA,
TensorRT where present) and the checkpoint in PyTorch eager mode (the baseline; ``--ckpt``,
default the checkpoint inside the bundle when it has one) read the same batches in one
process, interleaved: for each repeat and batch size each engine runs in turn, the order
rotating. Reported per engine and batch size: p50 and p95 milliseconds per image (batch
time / batch size), throughput, the median ratio to PyTorch on the same batches, the
per-stage p50, and the host-side share (time outside the graphs and llama.cpp).

The LLM step (needs ``--set``): the gate rate on the set at the bundle's threshold, then
for each model (the default GGUF and every ``--llm PATH``) and mode (rescore, fill), the
time per gated word and the mean added latency per image. ``--json`` prints one JSON
object as the last line; ``--plot`` writes a PNG of the stage breakdown and batch scaling.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import (
    clean_nan,
    fmt,
    load_set,
    machine,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    percentile,
    print_json,
    rotate,
)
from benchmarks.engines import ALL_STAGES, BatchTiming, BundleEngine, TorchEngine, backend_choices
from runtime.inputs import InputError
from runtime.recognizer import LLM_MODES

Engine = TorchEngine | BundleEngine


def synthetic_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Word-crop-sized noise images (sizes vary like real crops), when no set is given."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h = int(rng.integers(24, 80))
        w = int(h * rng.uniform(1.5, 6.0))
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def make_engines(bundle: Path, ckpt: Path | None, threads: int | None | Sequence[int | None],
                 only: Sequence[str] | None = None,
                 others: Sequence[Path] = ()) -> tuple[list[Engine], dict[str, str]]:
    """PyTorch (when a checkpoint is given) and every backend/precision of the bundle (and
    of each bundle of ``others``, labelled with its folder's name), once per thread count
    of ``threads`` (None: the runtime's default; labelled when there are several)."""
    counts = list(threads) if isinstance(threads, Sequence) else [threads]
    engines: list[Engine] = []
    missing: dict[str, str] = {}
    if ckpt is not None:
        try:
            engines.append(TorchEngine(ckpt, counts[0]))
        except (ImportError, OSError, ValueError) as exc:
            missing["pytorch"] = f"cannot load {ckpt} ({exc})"
    else:
        missing["pytorch"] = "no checkpoint (pass --ckpt; bundles exported --with-checkpoint carry one)"
    for source in [bundle, *others]:
        prefix = f"{source.name}:" if source != bundle else ""
        for backend, precision in backend_choices(source):
            key = f"{backend}/{precision}"
            if only and not {prefix + key, prefix + backend, prefix + precision} & set(only):
                continue  # unprefixed entries name the main bundle's engines, NAME:... another's
            for count in counts:
                suffix = (f"@{count or 'default'}t") if len(counts) > 1 else ""
                try:
                    engine = BundleEngine(source, backend, precision, count)
                except Exception as exc:  # a backend that cannot start is reported, the rest still run
                    missing[prefix + key + suffix] = f"{type(exc).__name__}: {exc}"
                    continue
                engine.key = prefix + engine.key + suffix
                threads_label = f", {count} thread{'s' if count != 1 else ''}" if count else ", default threads"
                engine.label = prefix + engine.label + (threads_label if suffix else "")
                engines.append(engine)
    return engines, missing


def measure(engines: Sequence[Engine], images: Sequence[Image.Image], batches: Sequence[int],
            repeats: int) -> dict[tuple[str, int], list[BatchTiming]]:
    """Interleaved timings: ``{(engine key, batch): [BatchTiming per repeat]}``."""
    out: dict[tuple[str, int], list[BatchTiming]] = {(e.key, b): [] for e in engines for b in batches}
    pool = list(images)
    for b in batches:  # warm-up: sessions allocate per shape on first use
        chunk = [pool[i % len(pool)] for i in range(b)]
        for engine in engines:
            engine.run(chunk)
    cursor, round_ = 0, 0
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for b in batches:
                chunk = [pool[(cursor + i) % len(pool)] for i in range(b)]
                cursor += b
                for engine in rotate(engines, round_):
                    out[(engine.key, b)].append(engine.run(chunk))
                round_ += 1
            gc.collect()
    finally:
        if enabled:
            gc.enable()
    return out


def summarise(engines: Sequence[Engine], timings: dict[tuple[str, int], list[BatchTiming]],
              batches: Sequence[int], baseline: str | None) -> list[dict[str, Any]]:
    """One row per engine and batch size."""
    rows = []
    for engine in engines:
        for b in batches:
            runs = timings[(engine.key, b)]
            per_image = [t.wall_ms / b for t in runs]
            row: dict[str, Any] = {
                "engine": engine.key, "label": engine.label, "kind": engine.kind, "backend": engine.backend,
                "precision": engine.precision, "batch": b, "repeats": len(runs),
                "p50_ms": median(per_image), "p95_ms": percentile(per_image, 95),
                "throughput": 1000.0 * b / median([t.wall_ms for t in runs]),
                "host_share": median([t.host_ms / t.wall_ms for t in runs if t.wall_ms > 0]),
                "stages_p50_ms": {s: median([t.stages_ms.get(s, 0.0) / b for t in runs])
                                  for s in ALL_STAGES if any(s in t.stages_ms for t in runs)},
                "errors": sum(t.errors for t in runs),
                "image_encoder": getattr(engine, "image_encoder", None),
                "warnings": list(getattr(engine, "warnings", [])),
            }
            if baseline is not None:
                row["ratio_to_baseline"] = paired_ratio([t.wall_ms for t in runs],
                                                        [t.wall_ms for t in timings[(baseline, b)]])
            rows.append(row)
    return rows


# -- the LLM step ----------------------------------------------------------------------


def llm_models(extra: Sequence[str]) -> list[str]:
    """``default`` (the embedded GGUF) and every extra path, without repeats."""
    out = ["default"]
    for path in extra:
        if path not in out:
            out.append(path)
    return out


def measure_llm(bundle: Path, images: Sequence[Image.Image], models: Sequence[str], threads: int | None,
                max_words: int, batch: int = 8) -> dict[str, Any]:
    """Gate rate on ``images`` and, per model and mode, the time per gated word and the
    mean added latency per image, the modes interleaved chunk by chunk."""
    from runtime.llm import Corrector

    vision = BundleEngine(bundle, "ort-cpu", "fp32", threads)
    threshold = vision.threshold
    variants: list[tuple[str, str, BundleEngine]] = []
    missing: dict[str, str] = {}
    for model in models:
        for mode in LLM_MODES:
            corrector = Corrector.from_spec(model, mode=mode, threshold=threshold, cache_size=0,
                                            settings=vision.recognizer.correction)
            if not corrector.enabled:
                missing[f"{model}/{mode}"] = str(corrector.unavailable)
                continue
            engine = BundleEngine(bundle, "ort-cpu", "fp32", threads, corrector=corrector, llm_mode=mode)
            variants.append((model, mode, engine))
    words: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in variants}
    walls: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in variants}
    hosts: dict[tuple[str, str], list[float]] = {(m, k): [] for m, k, _ in variants}
    vision_walls: list[float] = []
    counted = gated = 0
    for start in range(0, len(images), batch):
        if variants and min(len(v) for v in words.values()) >= max_words:
            break
        chunk = list(images[start:start + batch])
        base = vision.run(chunk)
        vision_walls.append(base.wall_ms)
        counted += len(chunk)
        gated += base.gated
        for model, mode, engine in rotate(variants, start // batch):
            timing = engine.run(chunk)
            words[(model, mode)] += [r.timings_ms.get("llm", 0.0) for r in timing.results  # type: ignore[attr-defined]
                                     if r.gated]
            walls[(model, mode)].append(timing.wall_ms)
            hosts[(model, mode)].append(timing.host_ms)
    out: dict[str, Any] = {"threshold": threshold, "images": counted, "gated": gated,
                           "gate_rate": 100.0 * gated / counted if counted else float("nan"),
                           "vision_ms_per_image": sum(vision_walls) / counted if counted else float("nan"),
                           "variants": [], "missing": missing}
    for model, mode, engine in variants:
        per_word = words[(model, mode)]
        total_wall = sum(walls[(model, mode)])
        name = getattr(getattr(engine.recognizer.corrector, "backend", None), "name", None) or model
        out["variants"].append({
            "model": model, "model_name": name, "mode": mode, "gated_words": len(per_word),
            "ms_per_word_p50": median(per_word), "ms_per_word_p95": percentile(per_word, 95),
            "ms_per_word_mean": sum(per_word) / len(per_word) if per_word else float("nan"),
            # the corrector's own time spread over every image (gated or not)
            "added_ms_per_image": sum(per_word) / counted if counted else float("nan"),
            # the same from wall clocks: with-LLM minus vision-only, same chunks
            "added_ms_per_image_wall": (total_wall - sum(vision_walls)) / counted if counted else float("nan"),
            # time outside the graphs and llama.cpp, as a fraction of the with-LLM wall time
            "host_share": sum(hosts[(model, mode)]) / total_wall if total_wall else float("nan"),
        })
        engine.close()
    vision.close()
    return out


# -- output ----------------------------------------------------------------------------


def tables(rows: Sequence[dict[str, Any]], llm: dict[str, Any] | None, baseline: str | None) -> str:
    """Markdown: end-to-end per engine and batch, stage p50 per image, the LLM step."""
    head = ["engine", "batch", "p50 ms/img", "p95 ms/img", "img/s", f"time vs {baseline or '-'}", "host share"]
    body = [[r["label"], r["batch"], fmt(r["p50_ms"], 2), fmt(r["p95_ms"], 2), fmt(r["throughput"], 1),
             fmt(r.get("ratio_to_baseline"), 2, "x"), fmt(100 * r["host_share"], 1, "%")] for r in rows]
    parts = ["End to end (per image = batch time / batch size):", "", markdown_table(head, body)]
    stages = [s for s in ALL_STAGES if any(r["stages_p50_ms"].get(s, 0.0) > 0 for r in rows)]
    body = [[r["label"], r["batch"], *[fmt(r["stages_p50_ms"].get(s), 2) for s in stages]] for r in rows]
    parts += ["", "Stage p50, ms per image:", "", markdown_table(["engine", "batch", *stages], body)]
    if llm is not None:
        parts += ["", f"LLM step: gate rate {fmt(llm['gate_rate'])}% of {llm['images']} images at threshold "
                      f"{llm['threshold']}; vision alone {fmt(llm['vision_ms_per_image'], 1)} ms/image (batch 8)", ""]
        body = [[v["model_name"], v["mode"], v["gated_words"], fmt(v["ms_per_word_p50"], 1),
                 fmt(v["ms_per_word_p95"], 1), fmt(v["added_ms_per_image"], 1),
                 fmt(v["added_ms_per_image_wall"], 1), fmt(100 * v["host_share"], 1, "%")]
                for v in llm["variants"]]
        body += [[k, "missing", "-", "-", "-", "-", "-", "-"] for k in llm["missing"]]
        parts.append(markdown_table(["model", "mode", "gated words", "p50 ms/word", "p95 ms/word",
                                     "added ms/image", "added ms/image (wall)", "host share"], body))
    return "\n".join(parts)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """PNG: stage breakdown per engine at the smallest batch; throughput against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(dict.fromkeys(r["engine"] for r in rows))
    labels = {r["engine"]: r["label"] for r in rows}
    smallest = min(r["batch"] for r in rows)
    first = {r["engine"]: r for r in rows if r["batch"] == smallest}
    stages = [s for s in ALL_STAGES if any(r["stages_p50_ms"].get(s, 0.0) > 0 for r in first.values())]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.6 * len(engines) + 3.5))
    colours = plt.get_cmap("tab10")
    for y, key in enumerate(engines):
        row, x = first[key], 0.0
        for i, stage in enumerate(stages):
            value = row["stages_p50_ms"].get(stage, 0.0)
            left.barh(y, value, left=x, color=colours(i % 10), label=stage if y == 0 else None)
            x += value
        other = max(0.0, row["p50_ms"] - x)
        left.barh(y, other, left=x, color="lightgrey", label="other host" if y == 0 else None)
    left.set_yticks(range(len(engines)), [labels[k] for k in engines])
    left.invert_yaxis()
    left.set_xlabel(f"ms per image, batch {smallest} (p50 per stage)")
    left.set_title("Stage breakdown")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    for key in engines:
        points = sorted((r["batch"], r["throughput"]) for r in rows if r["engine"] == key)
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=labels[key])
    right.set_xscale("log", base=2)
    right.set_xticks(sorted({r["batch"] for r in rows}), [str(b) for b in sorted({r["batch"] for r in rows})])
    right.set_xlabel("batch size")
    right.set_ylabel("images per second")
    right.set_title("Batch scaling")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", help="the bundle (default: runtime/assets/default_bundle)")
    parser.add_argument("--ckpt", help="checkpoint for the PyTorch baseline (default: the bundle's own)")
    parser.add_argument("--set", help="labelled set whose crops are timed and gated (default: synthetic crops)")
    parser.add_argument("--limit", type=int, default=256, help="crops taken from --set (default 256)")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per engine and size (default 5)")
    parser.add_argument("--only", nargs="+", help="bundle engines to run: backend, precision or backend/precision "
                                                  "(NAME:... for an --also bundle in folder NAME)")
    parser.add_argument("--threads", type=parse_threads, default=[None], metavar="N[,N...]",
                        help="intra-op threads for every engine, or several counts each timed "
                             "(0 or 'default': the runtime's default; default: the runtime's)")
    parser.add_argument("--also", type=Path, nargs="+", default=[], metavar="BUNDLE",
                        help="more bundles whose engines join the same interleaved run")
    parser.add_argument("--llm", action="append", default=[], metavar="PATH", help="another GGUF to time")
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM step")
    parser.add_argument("--llm-words", type=int, default=40, help="gated words per model and mode (default 40)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    parser.add_argument("--plot", type=Path, help="write a PNG of the stage breakdown and batch scaling")
    return parser


def parse_threads(text: str) -> list[int | None]:
    """``"default,1,2"`` -> ``[None, 1, 2]`` (None: the runtime's default)."""
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in ("default", "0"):
            out.append(None)
            continue
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"--threads wants counts or 'default', got {part!r}")
        out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError("--threads wants at least one count")
    return list(dict.fromkeys(out))


def parse_batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--batches wants comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError("--batches wants positive batch sizes")
    return sorted(set(values))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.readers import default_bundle

    bundle = Path(args.engine) if args.engine else default_bundle()
    if not (bundle / "manifest.json").is_file():
        print(f"error: no bundle at {bundle} (pass --engine BUNDLE)", file=sys.stderr)
        return 2
    try:
        batches = parse_batches(args.batches)
        if args.repeats < 1:
            raise ValueError("--repeats must be at least 1")
        data = load_set(args.set, args.limit) if args.set else None
    except (ValueError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if data is not None and not len(data):
        print(f"error: {args.set}: no readable crops", file=sys.stderr)
        return 2
    images = data.images if data is not None else synthetic_images(64)
    ckpt = Path(args.ckpt) if args.ckpt else (bundle if (bundle / "model.json").is_file() else None)
    info = machine()
    for other in args.also:
        if not (other / "manifest.json").is_file():
            print(f"error: --also {other}: no bundle there", file=sys.stderr)
            return 2
    engines, missing = make_engines(bundle, ckpt, args.threads, args.only, args.also)
    for key, reason in missing.items():
        print(f"{key}: skipped: {reason}", file=sys.stderr)
    if not engines:
        print("error: no engine could run", file=sys.stderr)
        return 2
    for engine in engines:
        for warning in getattr(engine, "warnings", []):
            print(f"warning: {engine.label}: {warning}", file=sys.stderr)
    baseline = "pytorch" if any(e.key == "pytorch" for e in engines) else None
    print(f"timing {len(engines)} engines x batches {batches} x {args.repeats} repeats", file=sys.stderr)
    try:
        timings = measure(engines, images, batches, args.repeats)
    finally:
        for engine in engines:
            engine.close()
    rows = summarise(engines, timings, batches, baseline)
    llm = None
    if args.no_llm:
        pass
    elif data is None:
        print("LLM step skipped: pass --set for the gate rate and the LLM timings", file=sys.stderr)
    else:
        print("timing the LLM step", file=sys.stderr)
        llm = measure_llm(bundle, data.images, llm_models(args.llm), args.threads[0], args.llm_words)
    source = f"{data.name} ({len(data)} crops)" if data is not None else "synthetic crops"
    print(machine_line(info))
    print(f"Bundle: {bundle}; crops: {source}; repeats: {args.repeats}; interleaved in one process")
    graphs = [f"{e.label}: {e.image_encoder}" for e in engines if getattr(e, "image_encoder", None)]
    if graphs:
        print("Image encoder graphs: " + "; ".join(graphs))
    print()
    print(tables(rows, llm, baseline))
    if missing:
        print()
        print("\n".join(f"- {k}: skipped: {v}" for k, v in missing.items()))
    if args.plot:
        model = json.loads((bundle / "manifest.json").read_text()).get("model", {}).get("name", bundle.name)
        plot(rows, args.plot, f"{model} bundle ({bundle}): {source}; {info['cpu']}, {info['nproc']} CPUs")
        print(f"\nplot written to {args.plot}", file=sys.stderr)
    if args.json:
        print_json(clean_nan({"benchmark": "latency", "machine": info, "bundle": str(bundle),
                              "checkpoint": str(ckpt) if ckpt else None, "images": source,
                              "batches": batches, "repeats": args.repeats, "baseline": baseline,
                              "rows": rows, "missing": missing, "llm": llm}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
