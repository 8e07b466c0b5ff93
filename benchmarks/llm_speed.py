"""Speed of the LLM corrector on simulated gated words, and what prefix reuse saves.

Gated words are simulated from real labels (IIIT5K train by default): one or two inner
characters are masked and given a top-5 of the true character and four others (the true
one ranked first half the time), as a decoder unsure there would report. This measures
time per gated word for ``rescore`` and ``fill`` and, as a rough sanity check only, how
often each restores the label (a simulated top-k is not a decoder's: tune weight and k on
real decoder output).

    python -m benchmarks.llm_speed [--model default|PATH] [--words 60] [--labels FILE]

Prints a JSON report: per mode and masked count the median and p90 seconds per word,
accuracy; the prefix-reuse comparison (N continuations with the prefix evaluated once,
re-evaluated for each, and all in one batched decode).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import time
from pathlib import Path

from runtime.charset import CHARSET_94, word_correct
from runtime.correction.backend import LlamaCppBackend, find_default_gguf
from runtime.correction.settings import RESCORE_PREFIX
from runtime.decoding import Prediction
from runtime.llm import Corrector

DEFAULT_LABELS = Path(__file__).resolve().parents[2] / "shared/data/train/iiit5k_train_2000/labels.tsv"


def simulate(label: str, masked: int, rng: random.Random) -> Prediction | None:
    """A gated prediction of ``label``: ``masked`` inner characters unsure (top-5)."""
    inner = [i for i in range(1, len(label) - 1) if label[i].isalnum()]
    if len(inner) < masked:
        return None
    positions = sorted(rng.sample(inner, masked))
    text, probs = list(label), [0.99] * len(label)
    topk = [[(c, 0.99)] for c in label]
    pool = string.ascii_letters
    if label.islower() or label.isupper():
        pool = string.ascii_lowercase if label.islower() else string.ascii_uppercase
    for i in positions:
        others = rng.sample([c for c in pool + string.digits if c != label[i]], 4)
        weights = sorted((rng.random() for _ in range(5)), reverse=True)
        total = sum(weights) / 0.95
        p = [w / total for w in weights]
        rank = 0 if rng.random() < 0.5 else rng.randint(1, 4)
        order = others[:rank] + [label[i]] + others[rank:]
        topk[i] = list(zip(order, p))
        text[i], probs[i] = order[0], min(p[0], 0.79)
    return Prediction("".join(text), probs, topk)


def reuse_speed(backend_path: Path, n: int, repeats: int = 3) -> dict:
    """Seconds to score ``n`` continuations: prefix once, prefix each time, batched."""
    words = [f'{w}"' for w in ("coffee", "cotfee", "house", "hcuse", "station", "statlon", "rescue", "resoue")]
    words = (words * (n // len(words) + 1))[:n]
    out = {}
    for name, kwargs in (("prefix_once", {"batched": False}), ("prefix_each_time", {"reuse_prefix": False}),
                         ("batched", {})):
        backend = LlamaCppBackend(backend_path, **kwargs)
        backend.score(RESCORE_PREFIX, words[:1])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.score(RESCORE_PREFIX, words)
            times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times), 4)
    out["speedup_prefix_once"] = round(out["prefix_each_time"] / out["prefix_once"], 2)
    out["speedup_batched"] = round(out["prefix_each_time"] / out["batched"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--words", type=int, default=60, help="simulated gated words per masked count")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    args = parser.parse_args(argv)
    path = find_default_gguf() if args.model == "default" else Path(args.model)
    rng = random.Random(args.seed)
    labels = [line.split("\t")[1] for line in args.labels.read_text(encoding="utf-8").splitlines() if "\t" in line]
    rng.shuffle(labels)
    report: dict = {"model": str(path), "threads": LlamaCppBackend(path).threads, "cpus": os.cpu_count(),
                    "load_before": os.getloadavg()[0], "modes": {}}
    for masked in (1, 2):
        cases = [(label, p) for label in labels if (p := simulate(label, masked, rng)) is not None][: args.words]
        vision = sum(word_correct(p.text, label) for label, p in cases) / len(cases)
        report["modes"][f"vision_{masked}"] = {"accuracy": round(vision, 3), "n": len(cases)}
        for mode in ("rescore", "fill"):
            corrector = Corrector.from_spec(str(path), mode=mode, time_budget_s=None, cache_size=0)
            times, results = [], []
            for _, prediction in cases:
                result = corrector.correct([prediction], CHARSET_94)[0]
                times.append(result.time_s)
                results.append(result)
            entry = {"median_s": round(statistics.median(times), 4),
                     "p90_s": round(sorted(times)[int(0.9 * (len(times) - 1))], 4),
                     "candidates": round(statistics.mean(len(r.candidates) for r in results), 1)}
            if mode == "rescore":
                for weight in args.weights:
                    hits = 0
                    for (label, _), r in zip(cases, results, strict=True):
                        best = max(r.candidates, key=lambda c: c.visual_logprob + weight * (c.llm_logprob or 0.0))
                        hits += word_correct(best.text, label)
                    entry[f"accuracy_w{weight:g}"] = round(hits / len(cases), 3)
            else:
                hits = sum(word_correct(r.text, label) for (label, _), r in zip(cases, results))
                entry["accuracy"] = round(hits / len(cases), 3)
            report["modes"][f"{mode}_{masked}"] = entry
    report["prefix_reuse"] = {n: reuse_speed(path, n) for n in (5, 25)}
    report["load_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
