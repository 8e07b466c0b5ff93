"""A reader in a process of its own, driven from the benchmark's process.

``benchmarks.peers --isolated`` loads each reader in a worker process (``spawn``), so its
thread pools meet no other reader's in one process: what a user who runs only that
reader gets. The parent still interleaves: it sends one crop to one worker at a time
and waits for the answer, so only one reader computes at any moment. The time of a read
is measured inside the worker around the read alone (no pickling, no pipe); it is
``last_ms`` after each :meth:`IsolatedReader.read`.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import traceback
from multiprocessing.connection import Connection
from typing import Any

from PIL import Image

#: seconds a worker may take to load its reader (a cold onnxruntime or torch import)
LOAD_TIMEOUT_S = 300.0
#: seconds one read may take before the worker is given up
READ_TIMEOUT_S = 120.0


def _serve(conn: Connection, key: str, args: argparse.Namespace) -> None:
    """Worker: load ``key`` with the peers loader, then answer crops until told to stop."""
    import time

    from benchmarks.peers import load_readers

    try:
        readers, missing = load_readers([key], args)
    except Exception as exc:  # reported to the parent, which lists the reader as missing
        conn.send(("missing", f"{type(exc).__name__}: {exc}"))
        return
    if not readers:
        conn.send(("missing", missing.get(key, "did not load")))
        return
    reader = readers[0]
    conn.send(("ok", {"key": reader.key, "name": reader.name, "version": reader.version, "info": reader.info}))
    try:
        while True:
            image = conn.recv()
            if image is None:
                break
            start = time.perf_counter()
            try:
                text = reader.read(image)
            except Exception as exc:  # one failure: the parent records it and goes on
                conn.send(("error", f"{type(exc).__name__}: {exc}", float("nan")))
                continue
            conn.send(("ok", text, 1000.0 * (time.perf_counter() - start)))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        reader.close()


class IsolatedReader:
    """:class:`benchmarks.readers.Reader`'s interface over a worker process."""

    def __init__(self, key: str, args: argparse.Namespace) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, key, args), daemon=True)
        self.process.start()
        child.close()
        self.last_ms = float("nan")
        if not self.conn.poll(LOAD_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"{key}: the worker did not load within {LOAD_TIMEOUT_S:.0f} s")
        status, payload = self.conn.recv()
        if status != "ok":
            self.close()
            raise RuntimeError(str(payload))
        self.key: str = payload["key"]
        self.name: str = payload["name"] + " [own process]"
        self.version: str = payload["version"]
        self.info: dict[str, Any] = {**payload["info"], "process": "own"}

    def read(self, image: Image.Image) -> str:
        """The worker's reading of ``image``; its time inside the worker is ``last_ms``."""
        self.last_ms = float("nan")
        self.conn.send(image)
        if not self.conn.poll(READ_TIMEOUT_S):
            raise RuntimeError(f"{self.key}: no answer within {READ_TIMEOUT_S:.0f} s")
        status, text, ms = self.conn.recv()
        if status != "ok":
            raise RuntimeError(text)
        self.last_ms = ms
        return text

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the worker is gone already
            self.conn.send(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


def load_isolated(keys: list[str], args: argparse.Namespace) -> tuple[list[Any], dict[str, str]]:
    """One :class:`IsolatedReader` per key that loads; ``{key: reason}`` for the others."""
    readers, missing = [], {}
    for key in keys:
        try:
            readers.append(IsolatedReader(key, args))
        except RuntimeError as exc:
            missing[key] = str(exc) or traceback.format_exc(limit=1)
    return readers, missing
