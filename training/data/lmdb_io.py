"""The standard scene-text LMDB layout (as used by the STR benchmarks, PARSeq and CLIP4STR).

One LMDB environment (a directory holding ``data.mdb``) with ASCII keys:
``num-samples`` -> decimal count; ``image-%09d`` -> encoded image bytes (PNG/JPEG...);
``label-%09d`` -> UTF-8 label; indices start at 1. A dataset root may hold a tree of such
directories; :func:`find_lmdb_dirs` lists them all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import lmdb

NUM_KEY = b"num-samples"


def image_key(index: int) -> bytes:
    return b"image-%09d" % index


def label_key(index: int) -> bytes:
    return b"label-%09d" % index


def find_lmdb_dirs(root: str | os.PathLike) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds a ``data.mdb``, sorted."""
    root = Path(root)
    found = [Path(dirpath) for dirpath, _, files in os.walk(root, followlinks=True) if "data.mdb" in files]
    return sorted(found)


_ENVS: dict[str, lmdb.Environment] = {}


def open_env(path: str | os.PathLike) -> lmdb.Environment:
    """The read-only environment of ``path``, opened once per process and kept open.

    LMDB refuses to open an environment twice in one process (a forked DataLoader worker
    counts as the same process), so every reader shares this one. It is opened without
    locking, which makes read transactions safe in forked children too.
    """
    key = str(Path(path).resolve())
    env = _ENVS.get(key)
    if env is None:
        env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
        _ENVS[key] = env
    return env


def close_env(path: str | os.PathLike) -> None:
    """Close the shared environment of ``path`` (before rewriting it)."""
    env = _ENVS.pop(str(Path(path).resolve()), None)
    if env is not None:
        env.close()


def read_count(env: lmdb.Environment) -> int:
    with env.begin() as txn:
        raw = txn.get(NUM_KEY)
    if raw is None:
        raise ValueError(f"{env.path()}: no 'num-samples' key: not a scene-text LMDB")
    return int(raw.decode("ascii"))


def write_lmdb(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[bytes, str]],
    overwrite: bool = False,
    commit_every: int = 1000,
    map_size: int = 1 << 30,
) -> int:
    """Write ``(encoded image, label)`` pairs as a scene-text LMDB; returns the count.

    Refuses to replace an existing LMDB unless ``overwrite``; the map grows as needed.
    """
    out = Path(out_dir)
    close_env(out)
    if (out / "data.mdb").exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds an LMDB (use overwrite)")
        for name in ("data.mdb", "lock.mdb"):
            (out / name).unlink(missing_ok=True)
    elif out.exists() and not out.is_dir():
        raise NotADirectoryError(str(out))
    out.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(out), map_size=map_size, subdir=True)
    pending: list[tuple[bytes, bytes]] = []
    count = 0

    def flush(items: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)

    try:
        for image, label in samples:
            if not image:
                raise ValueError(f"sample {count + 1}: empty image bytes")
            count += 1
            pending += [(image_key(count), bytes(image)), (label_key(count), label.encode("utf-8"))]
            if len(pending) >= 2 * commit_every:
                flush(pending)
                pending = []
        pending.append((NUM_KEY, str(count).encode("ascii")))
        flush(pending)
        env.sync()
    finally:
        env.close()
    return count

