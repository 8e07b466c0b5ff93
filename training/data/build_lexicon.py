"""Build the runtime's default English lexicon from ``wordfreq`` (the runtime never imports it).

    python -m training.data.build_lexicon [-o runtime/assets/lexicon/en_words.txt.gz] [--top 100000]

Writes a gzip'd UTF-8 text file, most frequent word first, one ``word<TAB>zipf`` per line
(``zipf`` = log10 of the frequency per billion words, two decimals, as wordfreq reports
it). Only words of lower-case ASCII letters and digits, 2 to 25 characters, are kept:
the protocol's ``[0-9a-z]`` (the corrector restores the case from the image).

wordfreq's code is Apache-2.0; its word-frequency data is CC BY-SA 4.0 (wordfreq's README
names its sources): the shipped list is a derivative of that data and carries the same
licence (README and NOTICE say so). The header line records the wordfreq version.
"""

from __future__ import annotations

import argparse
import gzip
import re
from importlib.metadata import version
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "runtime/assets/lexicon/en_words.txt.gz"
KEEP = re.compile(r"[a-z0-9]{2,25}")


def build(top: int) -> list[tuple[str, float]]:
    """The kept words of wordfreq's ``top`` English list with their Zipf frequencies."""
    from wordfreq import top_n_list, zipf_frequency

    return [(w, zipf_frequency(w, "en")) for w in top_n_list("en", top) if KEEP.fullmatch(w)]


def write(entries: list[tuple[str, float]], path: Path) -> None:
    """Write the list deterministically (fixed gzip mtime, so rebuilding gives the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# wordfreq {version('wordfreq')} 'en' top list; data CC BY-SA 4.0; word<TAB>zipf\n"
    body = header + "".join(f"{w}\t{z:.2f}\n" for w, z in entries)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(body.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data.build_lexicon", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--top", type=int, default=100000, help="size of wordfreq's list read (before filtering)")
    args = parser.parse_args(argv)
    entries = build(args.top)
    write(entries, args.output)
    print(f"wrote {len(entries)} words to {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
