"""Word accuracy and 1 - NED per set: PyTorch, each bundle precision, with and without the LLM.

    python -m benchmarks.accuracy --engine BUNDLE [--ckpt CKPT] SET... [--json] [--limit N]

Rows: the checkpoint in PyTorch (``--ckpt``, default the checkpoint inside the bundle when
it has one), then each precision of the bundle (``--backend``, default auto) alone and
with the LLM corrector in each mode (rescore, fill; ``--llm`` default the embedded GGUF).
The LLM rows re-read only the words the gate sent to the LLM; the other words keep the
vision answer, as the recognizer would. Columns: accuracy and 1 - NED per set and in
total (sample-weighted) under the protocol, the gate rate, and how many words the LLM
changed, fixed (wrong -> right) and broke (right -> wrong). ``--json`` prints one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import EvalSet, clean_nan, fmt, load_sets, machine, machine_line, markdown_table, print_json
from runtime.charset import WordAccuracy, weighted_total
from runtime.cli import SetScore
from runtime.inputs import InputError
from runtime.recognizer import DEFAULT_BATCH_SIZE, LLM_MODES, ReadResult, Recognizer


def score_pytorch(ckpt: Path, sets: Sequence[EvalSet], threads: int | None, batch: int) -> dict[str, dict]:
    """Per set: accuracy, 1 - NED and gate rate of the checkpoint in PyTorch (eager)."""
    import torch

    from runtime.correction.gate import gate
    from runtime.preprocess import preprocess
    from training.checkpoint import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model = load_checkpoint(ckpt)
    out = {}
    for data in sets:
        meter, gated = WordAccuracy(), 0
        for start in range(0, len(data), batch):
            images = data.images[start:start + batch]
            predictions = model.read(torch.from_numpy(preprocess(images, model.cfg.image)))
            meter.update([p.text for p in predictions], data.labels[start:start + batch])
            gated += sum(gate(p, model.cfg.threshold).needs_llm for p in predictions)
        out[data.name] = {**meter.as_dict(), "gate_rate": 100.0 * gated / len(data) if len(data) else 0.0}
    return out


def score_results(results: Sequence[ReadResult], labels: Sequence[str]) -> dict[str, Any]:
    score = SetScore()
    for result, label in zip(results, labels, strict=True):
        score.add(result, label)
    return score.as_dict()


def score_bundle(recognizer: Recognizer, sets: Sequence[EvalSet], modes: Sequence[str], llm: str,
                 batch: int) -> tuple[dict[str, dict[str, dict]], dict[str, str]]:
    """``{row: {set: scores}}`` for the vision answer and each LLM mode; and the modes
    that could not run, with the reason."""
    from runtime.llm import Corrector

    rows: dict[str, dict[str, dict]] = {"none": {}}
    missing: dict[str, str] = {}
    correctors = {}
    for mode in modes:
        corrector = Corrector.from_spec(llm, mode=mode, threshold=recognizer.threshold, settings=recognizer.correction)
        if corrector.enabled:
            correctors[mode] = Recognizer(recognizer.bundle, recognizer.backend, corrector,
                                          recognizer.threshold, llm_mode=mode)
            rows[mode] = {}
        else:
            missing[mode] = str(corrector.unavailable)
    for data in sets:
        vision = recognizer.read(data.images, batch_size=batch)
        rows["none"][data.name] = score_results(vision, data.labels)
        todo = [i for i, r in enumerate(vision) if r.gated]
        for mode, with_llm in correctors.items():
            results = list(vision)
            for i, result in zip(todo, with_llm.read([data.images[i] for i in todo], batch_size=batch)):
                results[i] = result
            rows[mode][data.name] = score_results(results, data.labels)
            print(f"  {data.name} {mode}: {len(todo)} gated words", file=sys.stderr)
    return rows, missing


def with_total(per_set: dict[str, dict]) -> dict[str, Any]:
    """Per-set scores plus a sample-weighted total (counts summed)."""
    total: dict[str, Any] = weighted_total(list(per_set.values()))
    n = total["n"]
    if n and all("gate_rate" in s for s in per_set.values()):
        total["gate_rate"] = sum(s["gate_rate"] * s["n"] for s in per_set.values()) / n
    for key in ("llm_changed", "llm_fixed", "llm_broke", "errors"):
        if all(key in s for s in per_set.values()):
            total[key] = sum(s[key] for s in per_set.values())
    return {"sets": per_set, "total": total}


def table(rows: Sequence[dict[str, Any]], sets: Sequence[EvalSet]) -> str:
    header = ["engine", "LLM", *[f"{s.name} (n={len(s)}) acc / 1-NED" for s in sets], "total acc %",
              "total 1-NED %", "acc vs PyTorch", "gate %", "LLM changed", "fixed", "broke"]
    reference = next((r["total"]["accuracy"] for r in rows
                      if r["engine"].startswith("PyTorch") and r.get("status") == "ok"), None)
    body = []
    for row in rows:
        if row.get("status") == "missing":
            body.append([row["engine"], row["llm"], *["-"] * (len(header) - 2)])
            continue
        total = row["total"]
        body.append([row["engine"], row["llm"],
                     *[f"{fmt(row['sets'][s.name]['accuracy'])} / {fmt(row['sets'][s.name]['ned'])}" for s in sets],
                     fmt(total["accuracy"]), fmt(total["ned"]),
                     fmt(None if reference is None else total["accuracy"] - reference, 2, " pts"),
                     fmt(total.get("gate_rate")),
                     total.get("llm_changed", "-") if row["llm"] != "none" else "-",
                     total.get("llm_fixed", "-") if row["llm"] != "none" else "-",
                     total.get("llm_broke", "-") if row["llm"] != "none" else "-"])
    notes = [f"- {r['engine']} {r['llm']}: missing: {r['reason']}" for r in rows if r.get("status") == "missing"]
    return markdown_table(header, body) + ("\n\n" + "\n".join(notes) if notes else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", metavar="SET", help="labelled set: folder or labels .tsv")
    parser.add_argument("--engine", help="the bundle (default: runtime/assets/default_bundle)")
    parser.add_argument("--ckpt", help="checkpoint for the PyTorch row (default: the bundle's own)")
    parser.add_argument("--backend", default="auto", help="backend for the bundle (auto, ort-cpu, ...)")
    parser.add_argument("--precisions", nargs="+", help="bundle precisions (default: all)")
    parser.add_argument("--llm", default="default", help="GGUF for the LLM rows: default or a path")
    parser.add_argument("--modes", nargs="*", choices=LLM_MODES, default=list(LLM_MODES),
                        help="LLM modes (default: rescore fill; none: no LLM rows)")
    parser.add_argument("--llm-precisions", nargs="+", help="precisions that get LLM rows (default: all)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, help="batch size (default 32)")
    parser.add_argument("--limit", type=int, help="first N crops of each set (after the protocol's filter)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.readers import default_bundle
    from runtime.backends import select_backend
    from runtime.bundle import load_bundle

    bundle_path = Path(args.engine) if args.engine else default_bundle()
    if not (bundle_path / "manifest.json").is_file():
        print(f"error: no bundle at {bundle_path} (pass --engine BUNDLE)", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("error: --batch must be at least 1", file=sys.stderr)
        return 2
    try:
        sets = load_sets(args.sets, args.limit)
        bundle = load_bundle(bundle_path)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = machine()
    rows: list[dict[str, Any]] = []
    ckpt = Path(args.ckpt) if args.ckpt else (bundle_path if (bundle_path / "model.json").is_file() else None)
    if ckpt is None:
        rows.append({"engine": "PyTorch fp32", "llm": "none", "status": "missing",
                     "reason": "no checkpoint (pass --ckpt; bundles exported --with-checkpoint carry one)"})
    else:
        print("PyTorch", file=sys.stderr)
        rows.append({"engine": "PyTorch fp32", "llm": "none", "status": "ok",
                     **with_total(score_pytorch(ckpt, sets, args.threads, args.batch))})
    for precision in args.precisions or bundle.precisions:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                backend = select_backend(bundle, args.backend, precision, args.threads)
        except Exception as exc:  # this precision cannot run here; the rest can
            rows.append({"engine": f"{args.backend} {precision}", "llm": "none", "status": "missing",
                         "reason": f"{type(exc).__name__}: {exc}"})
            continue
        label = f"{backend.name} {precision}"
        print(label, file=sys.stderr)
        modes = args.modes if args.llm_precisions is None or precision in args.llm_precisions else []
        with Recognizer(bundle, backend) as recognizer:
            scores, missing = score_bundle(recognizer, sets, modes, args.llm, args.batch)
        for mode, per_set in scores.items():
            rows.append({"engine": label, "llm": mode, "status": "ok", **with_total(per_set)})
        rows += [{"engine": label, "llm": mode, "status": "missing", "reason": reason}
                 for mode, reason in missing.items()]
    print(machine_line(info))
    print(f"Bundle: {bundle_path}; LLM: {args.llm}; threshold {bundle.threshold}")
    print()
    print(table(rows, sets))
    if args.json:
        print_json(clean_nan({"benchmark": "accuracy", "machine": info, "bundle": str(bundle_path),
                              "checkpoint": str(ckpt) if ckpt else None, "llm": args.llm,
                              "sets": [{"name": s.name, "path": s.path, "n": len(s), "dropped": s.dropped,
                                        "unreadable": len(s.unreadable or [])} for s in sets],
                              "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
