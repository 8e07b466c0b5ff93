"""``clipllama-run``: read word images with a bundle (and an LLM), print or score them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from runtime import bundle as bundle_module
from runtime.backends import BackendError
from runtime.bundle import BundleError
from runtime.charset import keep_for_eval
from runtime.inputs import InputError, InputSet, collect_inputs
from runtime.options import OptionError, RecognizerConfig, add_recognizer_options
from runtime.recognizer import DEFAULT_BATCH_SIZE, ReadResult, Recognizer
from runtime.records import (
    SetScore,
    backend_info,
    error_line,
    json_record,
    merge_loose,
    plain_line,
    unique_names,
)

#: The bundle used when ``--engine`` is not given (installed with the package).
DEFAULT_BUNDLE = bundle_module.DEFAULT_BUNDLE
#: Show a progress bar (on a terminal) from this many inputs on.
PROGRESS_FROM = 50

EXIT_OK, EXIT_SOME_FAILED, EXIT_CANNOT_RUN = 0, 1, 2

EPILOG = """\
INPUT is an image file, a directory of images (--recursive: and of its subfolders), or a
labelled set: a folder with images/ and labels.tsv, a .tsv label file (filename<TAB>label),
or an LMDB folder (data.mdb). Images larger than 40 megapixels are refused (one error each).

output: 'INPUT<TAB>TEXT<TAB>CONFIDENCE' per image on stdout (the word's confidence in [0, 1];
failed inputs: a message on stderr); --json prints one JSON object per input instead (with
the backend that read it). With --eval, labelled sets are scored with the standard protocol
and the last line is {"summary": {SET: {...}}, "backend": {...}}. Notes on stderr say which
faster backend was not used and why (always with --json; otherwise unless the machine has no
NVIDIA GPU).

exit status:
  0  every input was read
  1  some inputs could not be read (each reported)
  2  nothing could run: bad bundle, bad arguments, no inputs
  130  interrupted
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipllama-run", description="Scene text recognition with CLIP4STR and a gated Llama corrector.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, directory of images or labelled set")
    add_recognizer_options(parser)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"batch size (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--recursive", action="store_true", help="read the images in subfolders of a folder too")
    parser.add_argument("--json", action="store_true", help="one JSON object per input")
    parser.add_argument("--eval", action="store_true", help="score labelled sets; summary JSON last")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument("--detect", action="store_true",
                        help="INPUTs are whole photos: find their words, print 'INPUT<TAB>x1,y1,...,x4,y4<TAB>TEXT' "
                             "per word (--json: one object per photo); needs the detect extra")
    parser.add_argument("--draw", metavar="DIR", help="with --detect: write each photo with its words drawn into DIR")
    return parser


def _warning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total <= PROGRESS_FROM:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, disable=None, dynamic_ncols=True)


def run(args: argparse.Namespace, recognizer: Recognizer, sets: list[InputSet], out: TextIO) -> int:
    """Read every set, print results (and the summary); the exit status."""
    names = unique_names(sets)
    backend = backend_info(recognizer)
    bar = _progress(sum(len(s.samples) for s in sets), not args.no_progress)
    failed = 0
    summary: dict[str, dict[str, Any]] = {}
    try:
        for name, input_set in zip(names, sets):
            scoring = args.eval and input_set.labelled and name is not None
            score = SetScore() if scoring else None
            samples = input_set.samples
            for start in range(0, len(samples), args.batch):
                raw = list(samples[start:start + args.batch])  # LMDB sets are read chunk by chunk
                chunk = [x for x in raw if x.label is not None and keep_for_eval(x.label)] if scoring else raw
                for sample, result in zip(chunk, recognizer.read(chunk, batch_size=args.batch)):
                    failed += not result.ok
                    _print(result, name, out, args.json, backend)
                    if score is not None and sample.label is not None:
                        score.add(result, sample.label)
                if bar is not None:
                    bar.update(len(raw))
            if score is not None:
                summary[str(name)] = score.as_dict()
    finally:
        if bar is not None:
            bar.close()
    if args.eval:
        if not summary:
            print("note: --eval: no labelled set among the inputs (a folder with images/ and labels.tsv, "
                  "a .tsv label file or an LMDB set); nothing was scored", file=sys.stderr)
        print(json.dumps({"summary": summary, "backend": backend}), file=out, flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _print(result: ReadResult, set_name: str | None, out: TextIO, as_json: bool,
           backend: dict[str, Any] | None = None) -> None:
    if as_json:
        data = json_record(result, None, set_name)
        if backend is not None:
            data["backend"] = f"{backend['name']} {backend['precision']}"
        print(json.dumps(data, ensure_ascii=False), file=out, flush=True)
    elif result.ok:
        print(plain_line(result), file=out, flush=True)
    if not result.ok:
        print(error_line(result), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None,
         make_recognizer: Callable[[argparse.Namespace, Path], Recognizer] | None = None) -> int:
    """Entry point of ``clipllama-run``; returns the exit status (see ``--help``).

    ``make_recognizer`` replaces :meth:`Recognizer.from_bundle` (tests).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for bad arguments
        return int(exc.code or 0)
    warnings.formatwarning = _warning  # type: ignore[assignment]
    if args.batch < 1:
        print("error: --batch must be at least 1", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.engine is None and not (DEFAULT_BUNDLE / "manifest.json").is_file():
        print(f"error: no default bundle is installed ({DEFAULT_BUNDLE}); pass --engine BUNDLE", file=sys.stderr)
        return EXIT_CANNOT_RUN
    config = RecognizerConfig.from_args(args)
    try:
        config.check()
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if _detect_unusable(args):
        return EXIT_CANNOT_RUN
    bundle = Path(args.engine) if args.engine else DEFAULT_BUNDLE
    sets: list[InputSet] = []
    listing_failed = False
    for path in args.inputs:
        try:
            found = collect_inputs([path], recursive=args.recursive)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            listing_failed = True
            continue
        for note in (n for s in found for n in s.notes):
            print(f"note: {note}", file=sys.stderr)
        sets.extend(found)
    sets = merge_loose(sets)
    if not any(len(s.samples) for s in sets):
        print("error: no inputs to read", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        recognizer = make_recognizer(args, bundle) if make_recognizer is not None else config.build()
    except (BundleError, BackendError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    _backend_notes(recognizer, args.json)
    try:
        with recognizer:
            status = (run_photos if args.detect else run)(args, recognizer, sets, sys.stdout)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the exit quiet
        return EXIT_OK
    return EXIT_SOME_FAILED if listing_failed else status


def _detect_unusable(args: argparse.Namespace) -> bool:
    """--detect/--draw that cannot run: say why in one line (True)."""
    if args.draw and not args.detect:
        print("error: --draw needs --detect", file=sys.stderr)
        return True
    if args.detect and args.eval:
        print("error: --eval scores word crops; score photos with python -m benchmarks.e2e", file=sys.stderr)
        return True
    if args.detect:
        from runtime.detect.settings import DetectUnavailable, check_available

        try:
            check_available()
        except DetectUnavailable as exc:
            print(f"error: --detect: {exc}", file=sys.stderr)
            return True
    return False


def run_photos(args: argparse.Namespace, recognizer: Recognizer, sets: list[InputSet], out: TextIO) -> int:
    """--detect: every input is a photo; print its words (runtime.detect.output)."""
    from runtime.detect.settings import DetectUnavailable

    try:
        from runtime.detect.output import read_and_print

        photos = [sample for s in sets for sample in s.samples]
        backend = backend_info(recognizer)
        extra = {"backend": f"{backend['name']} {backend['precision']}"} if args.json else None
        failed = read_and_print(recognizer, photos, out, args.json, args.batch, args.draw, extra)
    except DetectUnavailable as exc:
        print(f"error: --detect: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _backend_notes(recognizer: Recognizer, as_json: bool) -> None:
    """The backend's warnings, then its notes on stderr, one line each (the notes are quiet on
    a machine with no NVIDIA GPU, unless --json)."""
    for warning in getattr(recognizer.backend, "warnings", []) or []:
        print(f"warning: {warning}", file=sys.stderr)
    if getattr(recognizer.backend, "gpu_absent", False) and not as_json:
        return
    for note in backend_info(recognizer)["notes"]:
        print(f"note: backend {backend_info(recognizer)['name']}: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
