"""``clipllama-batch SRC... -o OUT``: read many crops with Ray Data.

The inputs are listed as ``clipllama-run`` lists them (:mod:`runtime.inputs`: image files,
folders, ``labels.tsv``/``.tsv`` sets, LMDBs) plus text files of image paths (``.txt``/``.lst``,
one per line, relative to the file's folder). Each set is cut into chunks of ``--batch``
samples, the chunks ``clipllama-run --batch`` reads, so every record equals its
``clipllama-run --json`` record (timings aside). Then, on Ray:

1. ``map`` tasks load, decode and resize each chunk's images (``runtime.preprocess``; an
   image that fails there is handed on as it is, so the recognizer reports it as it would;
   when the recognizer reads doubtful crops again under stretched views, ``--views``, the
   images keep their size: a view is made from the image as it came);
2. an actor pool (``map_batches``) of recognizers, each loading the bundle and the LLM once,
   reads each chunk with :meth:`Recognizer.read`;
3. the driver writes the records to part files in OUT (:mod:`serving.parts`).

A rerun with the same OUT skips every id (set, source) already written.

With ``--detect`` every input is a whole photo: step 1 is skipped (photos are not resized to
the recognizer's input), the actors call :meth:`Recognizer.read_photos` and each record is
the one ``clipllama-run --detect --json`` prints (``source``, ``words``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import EXIT_CANNOT_RUN, EXIT_OK, EXIT_SOME_FAILED
from runtime.inputs import InputError, InputSet, LmdbSamples, Sample, collect_inputs
from runtime.options import RecognizerConfig
from runtime.recognizer import DEFAULT_BATCH_SIZE, LLMInfo, ReadResult
from runtime.records import SetScore, json_record, merge_loose, unique_names
from serving.common import (
    add_recognizer_options,
    check_recognizer,
    missing_serve_extra,
    one_line,
    settings_from_args,
    stop_on_signals,
)
from serving.parts import FORMATS, PartWriter, done_ids, read_records

PATH_LIST_SUFFIXES = (".txt", ".lst")


def read_path_list(path: Path) -> InputSet:
    """A text file of image paths, one per line (relative ones from the file's folder)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the path list ({exc})") from None
    images = [path.parent / line.strip() for line in lines if line.strip()]
    return InputSet(None, [Sample(str(image), image) for image in images])


def list_inputs(paths: Sequence[str]) -> tuple[list[tuple[str | None, InputSet]], list[str], list[str]]:
    """``(name, set)`` for each input set as ``clipllama-run`` names them, listing errors, and
    listing notes (what folders left out)."""
    sets: list[InputSet] = []
    errors, notes = [], []
    for path in paths:
        try:
            if Path(path).suffix.lower() in PATH_LIST_SUFFIXES and Path(path).is_file():
                found = [read_path_list(Path(path))]
            else:
                found = collect_inputs([path])
        except InputError as exc:
            errors.append(str(exc))
            continue
        notes.extend(n for s in found for n in s.notes)
        sets.extend(found)
    sets = merge_loose(sets)
    return list(zip(unique_names(sets), sets)), errors, notes


@dataclass
class Plan:
    """What to read: chunk rows for Ray Data, and what the summary needs."""

    chunks: list[dict[str, Any]] = field(default_factory=list)
    #: per scored set: (source, label) in reading order
    scored: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    todo: int = 0
    skipped: int = 0


def plan(named_sets: list[tuple[str | None, InputSet]], batch: int, evaluate: bool,
         done: set[tuple[str, str]]) -> Plan:
    """Chunks of ``batch`` samples as ``clipllama-run`` forms them (with ``--eval``, labels the
    protocol drops are left out of their chunk), less the ids in ``done`` and ids listed twice."""
    from runtime.charset import keep_for_eval

    out = Plan()
    planned: set[tuple[str, str]] = set()
    for name, input_set in named_sets:
        scoring = evaluate and input_set.labelled and name is not None
        if scoring:
            out.scored[str(name)] = []
        samples, lmdb = input_set.samples, isinstance(input_set.samples, LmdbSamples)
        for start in range(0, len(samples), batch):
            raw = list(samples[start:start + batch])
            rows = []
            for offset, sample in enumerate(raw):
                if scoring and not (sample.label is not None and keep_for_eval(sample.label)):
                    continue
                if scoring:
                    out.scored[str(name)].append((sample.source, str(sample.label)))
                key = (name or "", sample.source)
                if key in done or key in planned:  # written before, or listed twice
                    out.skipped += 1
                    continue
                planned.add(key)
                where = str(input_set.samples.path) if lmdb else str(sample.data)
                rows.append((sample.source, sample.label, where, start + offset if lmdb else -1))
            if rows:
                out.todo += len(rows)
                out.chunks.append({"set": name or "", "named": name is not None,
                                   "source": [r[0] for r in rows], "label": [r[1] for r in rows],
                                   "path": [r[2] for r in rows], "lmdb_index": [r[3] for r in rows]})
    return out


def _raw(path: str, lmdb_index: int) -> Any:
    """The undecoded input: a file path, or an LMDB image's bytes."""
    if lmdb_index < 0:
        return Path(path)
    return LmdbSamples(path)[lmdb_index].data


def decode_chunk(row: dict[str, Any], preprocessing: dict[str, Any], resize_images: bool = True) -> dict[str, Any]:
    """Ray Data ``map``: each image loaded, decoded and (``resize_images``) resized to the
    model input (uint8 pixels); an image that fails is passed on undecoded (``raw``) for the
    recognizer."""
    from runtime.preprocess import Preprocessing, load_image, resize

    spec = Preprocessing.from_dict(preprocessing)
    pixels, heights, widths, raws = [], [], [], []
    for path, index in zip(row["path"], row["lmdb_index"]):
        raw = _raw(path, index)
        try:
            image = load_image(raw)
            array = np.asarray(resize(image, spec) if resize_images else image)
            pixels.append(array.tobytes())
            heights.append(array.shape[0])
            widths.append(array.shape[1])
            raws.append(b"")
        except Exception:  # the recognizer reads it again and says why
            pixels.append(b"")
            heights.append(0)
            widths.append(0)
            raws.append(raw if isinstance(raw, bytes) else b"")
    return {**row, "pixels": pixels, "height": heights, "width": widths, "raw": raws}


class ChunkReader:
    """Ray Data actor: one recognizer (bundle and LLM loaded once), reading whole chunks."""

    def __init__(self, settings: dict[str, Any], batch: int, num_cpus: float | None = None,
                 detect: bool = False) -> None:
        self.recognizer = RecognizerConfig.from_dict(settings).build(num_cpus)
        self.batch = batch
        self.detect = detect

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        out = []
        for row in table.to_pylist():
            if self.detect:
                out.extend(self._photos(row))
                continue
            samples = [Sample(source, _input(row, k), label)
                       for k, (source, label) in enumerate(zip(row["source"], row["label"]))]
            name = row["set"] if row["named"] else None
            for result in self.recognizer.read(samples, batch_size=self.batch):
                out.append(json.dumps(json_record(result, self.recognizer, name), ensure_ascii=False))
        return pa.table({"record": pa.array(out, pa.string())})


    def _photos(self, row: dict[str, Any]) -> list[str]:
        """--detect: the photo records of a chunk."""
        from runtime.cli import backend_info
        from runtime.detect.output import photo_record

        samples = [Sample(source, _raw(path, index))
                   for source, path, index in zip(row["source"], row["path"], row["lmdb_index"])]
        backend = backend_info(self.recognizer)
        extra = {"backend": f"{backend['name']} {backend['precision']}"}
        if row["named"]:
            extra["set"] = row["set"]
        return [json.dumps(photo_record(result, extra), ensure_ascii=False)
                for result in self.recognizer.read_photos(samples, batch_size=self.batch)]


def _input(row: dict[str, Any], k: int) -> Any:
    if row["height"][k]:
        return np.frombuffer(row["pixels"][k], np.uint8).reshape(row["height"][k], row["width"][k], 3)
    return row["raw"][k] if row["lmdb_index"][k] >= 0 else Path(row["path"][k])


@dataclass(frozen=True)
class Resources:
    """Ray resources: the recognizer actor pool and the decoding tasks."""

    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    decode_cpus: float = 0.25


def read_chunks(chunks: list[dict[str, Any]], settings: RecognizerConfig, batch: int,
                resources: Resources, detect: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Records, a Ray Data block at a time (Ray must be initialised)."""
    import ray

    from runtime.bundle import load_bundle

    if not chunks:
        return
    from runtime.recognizer import check_views

    bundle = load_bundle(settings.engine, verify=False)
    one_view = check_views(bundle, settings.views) is None  # views are made from the image as it came
    ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 1000))
    if not detect:  # photos are read whole, not resized to the recognizer's input
        ds = ds.map(decode_chunk, fn_kwargs={"preprocessing": bundle.preprocessing.to_dict(),
                                             "resize_images": one_view}, num_cpus=resources.decode_cpus)
    with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60 (pinned)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(ChunkReader, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
                            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                            # an actor that dies fails the run (a rerun resumes it) rather than being
                            # restarted from constructor arguments Ray may have dropped (ray#53727)
                            max_restarts=0,
                            fn_constructor_kwargs={"settings": settings.to_dict(), "batch": batch,
                                                   "num_cpus": resources.num_cpus, "detect": detect})
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield [json.loads(text) for text in block.column("record").to_pylist()]


def summarize(out: str | Path, scored: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """``clipllama-run --eval``'s summary of the scored sets from every record in ``out``,
    with the backends that read them (``{"summary": {SET: {...}}, "backends": [...]}``)."""
    records = {}
    wanted = {(name, source) for name, pairs in scored.items() for source, _ in pairs}
    for record in read_records(out):
        key = (str(record.get("set") or ""), str(record["source"]))
        if key in wanted:
            records[key] = record
    summary = {}
    for name, pairs in scored.items():
        score = SetScore()
        for source, label in pairs:
            record = records.get((name, source))
            if record is not None:
                score.add(as_result(record), label)
        summary[name] = score.as_dict()
    backends = sorted({str(r["backend"]) for r in records.values() if r.get("backend")})
    return {"summary": summary, "backends": backends}


def as_result(record: dict[str, Any]) -> ReadResult:
    """A :class:`ReadResult` from its ``to_dict`` record (for scoring)."""
    fields = {k: v for k, v in record.items() if k in ReadResult.__dataclass_fields__}
    llm = fields.pop("llm", None)
    return ReadResult(**fields, llm=LLMInfo(**llm) if llm else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipllama-batch", description="Read many word images with Ray Data; resumable.",
        epilog="SRC: image files, folders, labelled sets (labels.tsv, .tsv, LMDB) or text files of paths "
               "(.txt/.lst). A rerun with the same OUT skips what is already written. Exit status: 0 all "
               "read, 1 some inputs could not be read, 2 nothing could run.")
    parser.add_argument("inputs", nargs="+", metavar="SRC")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder of part files")
    parser.add_argument("--format", choices=FORMATS, default="parquet", help="part file format (default: parquet)")
    add_recognizer_options(parser)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"images per recognizer batch, as clipllama-run --batch (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--concurrency", type=int, default=1, metavar="N", help="recognizer actors (default: 1)")
    parser.add_argument("--num-cpus", type=float, default=1.0, metavar="C", help="CPUs per actor (default: 1)")
    parser.add_argument("--num-gpus", type=float, default=0.0, metavar="G", help="GPUs per actor (default: 0)")
    parser.add_argument("--decode-cpus", type=float, default=0.25, metavar="C",
                        help="CPUs per decoding task (default: 0.25)")
    parser.add_argument("--part-size", type=int, default=4096, metavar="N",
                        help="records per part file, at most what an interruption loses (default: 4096)")
    parser.add_argument("--eval", action="store_true", help="score labelled sets; print the summary JSON")
    parser.add_argument("--address", metavar="ADDR", help="a running Ray cluster ('auto' or ray://HOST:10001)")
    parser.add_argument("--detect", action="store_true",
                        help="SRCs are whole photos: one record of words per photo (needs the detect extra)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``clipllama-batch``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)  # --help works without the serve extra
    except SystemExit as exc:
        return int(exc.code or 0)
    message = missing_serve_extra(("ray", "pyarrow"))
    if message:
        print(message, file=sys.stderr)
        return EXIT_CANNOT_RUN
    problem = check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.detect:
        from runtime.detect.settings import DetectUnavailable, check_available

        try:
            if args.eval:
                raise DetectUnavailable("--eval scores word crops; score photos with python -m benchmarks.e2e")
            check_available()
        except DetectUnavailable as exc:
            print(f"error: --detect: {exc}", file=sys.stderr)
            return EXIT_CANNOT_RUN
    named_sets, listing_errors, notes = list_inputs(args.inputs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for error in listing_errors:
        print(f"error: {error}", file=sys.stderr)
    if not any(len(s.samples) for _, s in named_sets):
        print("error: no inputs to read", file=sys.stderr)
        return EXIT_CANNOT_RUN
    work = plan(named_sets, args.batch, args.eval, done_ids(args.output))
    print(f"clipllama-batch: {work.todo} to read, {work.skipped} already in {args.output}", file=sys.stderr)
    failed = 0
    if work.todo:  # a rerun with nothing left to read does not start Ray
        try:
            failed = _run_on_ray(args, work)
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        except Exception as exc:  # a failure inside Ray: one line, not its tracebacks
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_CANNOT_RUN
    if args.eval:
        summary = summarize(args.output, work.scored)
        if not summary["summary"]:
            print("note: --eval: no labelled set among the inputs; nothing was scored", file=sys.stderr)
        print(json.dumps(summary), flush=True)
    if failed or listing_errors:
        print(f"clipllama-batch: {failed + len(listing_errors)} input(s) could not be read "
              f"({failed} image(s), {len(listing_errors)} listing error(s)); each is named above", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, the bundle or the LLM, before Ray starts (None: nothing)."""
    if args.batch < 1 or args.part_size < 1 or args.concurrency < 1:
        return "--batch, --part-size and --concurrency must be at least 1"
    if args.num_cpus <= 0 or args.num_gpus < 0 or args.decode_cpus <= 0:
        return "--num-cpus and --decode-cpus must be above 0 and --num-gpus at least 0"
    return check_recognizer(args)


def quiet_ray() -> None:
    """Ray's own log lines stay in its log files, off the user's terminal: Ray Data's console
    handler (a failure is reported by :func:`main` as one line) and its progress bars
    (``clipllama-batch`` prints its own progress)."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for name in ("ray", "ray.data", "ray.serve"):  # a failure is reported once, as one line, by main
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                handler.setLevel(logging.CRITICAL)


def _run_on_ray(args: argparse.Namespace, work: Plan) -> int:
    """Start (or join) Ray, read the plan, stop Ray; the number of inputs that failed."""
    import ray

    quiet_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    stop_on_signals()  # after ray.init, which installs its own SIGTERM handler
    try:
        return write(args, work)
    finally:
        if started:
            ray.shutdown()


def write(args: argparse.Namespace, work: Plan) -> int:
    """Read the plan's chunks and write the records in parts; the number of failed inputs.
    Each failed input is named on stderr, as ``clipllama-run`` names it."""
    writer = PartWriter(args.output, args.format)
    resources = Resources(args.concurrency, args.num_cpus, args.num_gpus, args.decode_cpus)
    pending: list[dict[str, Any]] = []
    failed = written = 0
    for records in read_chunks(work.chunks, settings_from_args(args), args.batch, resources,
                               getattr(args, "detect", False)):
        pending.extend(records)
        for record in records:
            if record.get("error") is not None:
                failed += 1
                source, error = str(record.get("source")), str(record["error"])
                print(f"error: {error}" if source in error else f"error: {source}: {error}", file=sys.stderr)
        if len(pending) >= args.part_size:
            writer.write(pending)
            written += len(pending)
            pending = []
            print(f"clipllama-batch: {written}/{work.todo} written", file=sys.stderr, flush=True)
    writer.write(pending)
    written += len(pending)
    print(f"clipllama-batch: {written}/{work.todo} written to {args.output}", file=sys.stderr, flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
