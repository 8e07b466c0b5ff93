"""``clipllama-batch`` output: a folder of part files, each written whole or not at all.

A part is written to a hidden temporary name and renamed into place, so a run that is
interrupted leaves only complete parts. The ids of the records in complete parts are the
"done" set a rerun skips, so no id is written twice.

* JSON Lines: one record per line, as ``clipllama-run --json`` prints it (with ``set``);
* Parquet: the columns of :data:`COLUMNS` plus ``record``, that same JSON line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("parquet", "jsonl")
#: Flat Parquet columns (the full record is in ``record``).
COLUMNS = ("set", "source", "label", "text", "confidence", "vision_text", "vision_confidence", "gated",
           "llm_changed", "llm_error", "error")


def record_id(record: dict[str, Any]) -> tuple[str, str]:
    """What makes a record unique in an output: its set and its source."""
    return str(record.get("set") or ""), str(record["source"])


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
    """The Parquet row of a record."""
    llm = record.get("llm") or {}
    row = {name: record.get(name) for name in COLUMNS}
    row.update(set=record.get("set") or "", llm_changed=bool(llm.get("changed")), llm_error=llm.get("error"),
               record=json.dumps(record, ensure_ascii=False))
    return row


class PartWriter:
    """Writes lists of records as numbered part files in ``folder``."""

    def __init__(self, folder: str | Path, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")
        self.folder, self.fmt = Path(folder), fmt
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = f"part-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        self.count = 0

    def write(self, records: list[dict[str, Any]]) -> Path | None:
        """One part holding ``records`` (none for an empty list); its path."""
        if not records:
            return None
        final = self.folder / f"{self.prefix}-{self.count:05d}.{self.fmt}"
        temporary = self.folder / f".{final.name}.tmp"
        if self.fmt == "jsonl":
            with open(temporary, "w", encoding="utf-8") as out:
                out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                out.flush()
                os.fsync(out.fileno())
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([flat_row(r) for r in records]), temporary)
        os.replace(temporary, final)
        self.count += 1
        return final


def part_files(folder: str | Path) -> list[Path]:
    """The complete parts in ``folder`` (both formats), in name order."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("part-") and p.suffix[1:] in FORMATS)


def read_records(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of every complete part."""
    for path in part_files(folder):
        if path.suffix == ".jsonl":
            yield from read_records_of(path)
        else:
            import pyarrow.parquet as pq

            for text in pq.read_table(path, columns=["record"]).column("record").to_pylist():
                yield json.loads(text)


def done_ids(folder: str | Path) -> set[tuple[str, str]]:
    """The ids already written to ``folder``."""
    done: set[tuple[str, str]] = set()
    for path in part_files(folder):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["set", "source"])
            done.update(zip(table.column("set").to_pylist(), table.column("source").to_pylist()))
        else:
            done.update(record_id(r) for r in read_records_of(path))
    return done


def read_records_of(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one JSON Lines part."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
