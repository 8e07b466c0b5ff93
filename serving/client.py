"""A small HTTP client for ``clipllama-serve`` that retries what a replica failure loses.

Standard library only. Reading is idempotent, so a request that failed on the way (connection
refused or reset, a timeout, HTTP 500/502/503/504 while Serve replaces a replica) is sent
again after a growing pause; a refused request (400 with no usable image, 413 over a limit)
is not.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: HTTP statuses worth another try (the replica or the proxy was not there for a moment).
RETRY_STATUSES = frozenset({500, 502, 503, 504})


class RequestRefused(RuntimeError):
    """The server refused the request (4xx); ``status`` and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class ReadClient:
    """Posts images to ``URL/read``; :meth:`read` gives one record per image, in order."""

    def __init__(self, url: str = "http://127.0.0.1:8000", retries: int = 8, backoff_s: float = 0.25,
                 max_backoff_s: float = 4.0, timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.max_backoff_s, self.timeout_s = retries, backoff_s, max_backoff_s, timeout_s
        #: requests sent again so far (for monitoring and tests)
        self.retried = 0

    def read(self, images: Sequence[bytes | str | Path], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Records for ``images`` (encoded bytes or file paths). Paths are sent with their
        path as the name; ``names`` overrides. One unnamed image goes as a raw body."""
        data = [Path(x).read_bytes() if isinstance(x, str | Path) else bytes(x) for x in images]
        if names is None and any(isinstance(x, str | Path) for x in images):
            names = [str(x) if isinstance(x, str | Path) else f"<bytes {i}>" for i, x in enumerate(images)]
        if len(data) == 1 and names is None:
            body, content_type = data[0], "application/octet-stream"
        else:
            body, content_type = multipart(data, names)
        status, answer = self._post("/read", body, content_type)
        if status == 200 or (status == 400 and "results" in answer):
            return list(answer["results"])
        raise RequestRefused(status, str(answer.get("error", answer)))

    def read_one(self, image: bytes | str | Path) -> dict[str, Any]:
        return self.read([image])[0]

    def health(self) -> dict[str, Any]:
        status, answer = self._send(urllib.request.Request(self.url + "/healthz"))
        if status != 200:
            raise RequestRefused(status, str(answer))
        return answer

    def _post(self, route: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(self.url + route, data=body, method="POST",
                                         headers={"Content-Type": content_type})
        return self._send(request)

    def _send(self, request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
        pause = self.backoff_s
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUSES or last:
                    return exc.code, _json(exc.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if last:
                    raise
            self.retried += 1
            time.sleep(pause)
            pause = min(self.max_backoff_s, 2 * pause)
        raise AssertionError("unreachable")


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:500]}
    return value if isinstance(value, dict) else {"error": str(value)}


def multipart(images: Sequence[bytes], names: Sequence[str] | None = None) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one file part per image, and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for i, data in enumerate(images):
        name = (names[i] if names is not None else f"<bytes {i}>").replace('"', "%22").replace("\r", " ")
        name = name.replace("\n", " ")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
