"""The Ray Serve deployment: one recognizer per replica behind ``POST /read`` and ``GET /healthz``.

Imports Ray at module level: use it through :mod:`serving.serve` (which checks the extra first).

A request carries one image as its raw body, or many as ``multipart/form-data`` file parts
(a part's file name becomes the record's ``source``; else ``<bytes i>``). The answer is
``{"results": [record, ...]}`` with one record per image, the same record as
``clipllama-run --json`` prints (:func:`serving.common.json_record`). Status 200 when at least one
image was read (an image over the pixel limit is an error record like any bad image), 400
when none could be (the records still say why), 413 when the request is over a limit (body
size, image count) or when no image was read and one was over the pixel limit. Images of
requests that arrive together are read together (``serve.batch``); :data:`MERGE_POLICIES`
says how.

With detection on (``clipllama-serve --detect``, or per request ``POST /read?detect=1``;
``?detect=0`` turns it off) every image is a whole photo and its record is the one
``clipllama-run --detect --json`` prints: ``{"source", "words": [{"text", "polygon",
"confidence", "line", "order", ...}], ...}`` (``runtime.detect.output.photo_record``).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from runtime.inputs import Sample
from runtime.options import RecognizerConfig
from runtime.preprocess import ImageError, ImageTooLarge, load_image
from runtime.recognizer import DEFAULT_BATCH_SIZE, ReadResult
from runtime.records import json_record

#: How the images of requests batched together are grouped into recognizer calls:
#: ``width``: all in one call, which batches images of the same padded input width
#: (``Recognizer.read``), so no image is padded more than when read alone (results equal a
#: read of that request alone, up to float rounding of the batch size); ``request``: each
#: request is its own call (bit-identical to ``Recognizer.read`` of that request, slowest).
MERGE_POLICIES = ("width", "request")


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_request_bytes: int = 32 * 1024 * 1024
    max_images: int = 256
    #: per image, checked from the header before it is decoded
    max_pixels: int = 4_000_000


@dataclass(frozen=True)
class Batching:
    """``serve.batch`` settings (requests, seconds) and the merge policy."""

    max_batch_size: int = 8
    wait_s: float = 0.005
    merge: str = "width"

    def __post_init__(self) -> None:
        if self.merge not in MERGE_POLICIES:
            raise ValueError(f"unknown merge policy {self.merge!r} (choose from {', '.join(MERGE_POLICIES)})")
        if self.max_batch_size < 1 or self.wait_s < 0:
            raise ValueError("max batch size must be at least 1 and the wait at least 0")


class TooLarge(Exception):
    """A request over :class:`Limits`."""


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes (the declared length is checked first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _images(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` per image of the request."""
    body = await _body(request, limits.max_request_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [("<bytes 0>", body)] if body else []

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=limits.max_images + 1,
                                                     max_fields=limits.max_images + 1)
    items = []
    for i, (_, value) in enumerate(form.multi_items()):
        if not isinstance(value, str):  # a plain form field (-F name=value) is text, not an image
            items.append((value.filename or f"<bytes {i}>", await value.read()))
    await form.close()
    return items


class Reader:
    """One replica: the bundle and the LLM are loaded once, in the constructor."""

    def __init__(self, settings: dict[str, Any], limits: dict[str, Any], batching: dict[str, Any],
                 num_cpus: float | None = None, detect: bool = False) -> None:
        self.recognizer = RecognizerConfig.from_dict(settings).build(num_cpus)
        self.detect = detect
        if detect:  # load the detector now: a replica that cannot detect fails at deployment
            from runtime.detect.photo import stages_for

            stages_for(self.recognizer)
        self.limits = Limits(**limits)
        self.batching = Batching(**batching)
        self.read_requests.set_max_batch_size(self.batching.max_batch_size)
        self.read_requests.set_batch_wait_timeout_s(self.batching.wait_s)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if path == "healthz":
            return JSONResponse(self.health())
        if path != "read":
            return JSONResponse({"error": f"no route {request.url.path} (POST /read, GET /healthz)"}, 404)
        if request.method != "POST":
            return JSONResponse({"error": "POST images to /read"}, 405)
        try:
            items = await _images(request, self.limits)
        except TooLarge as exc:
            return JSONResponse({"error": str(exc)}, 413)
        except Exception as exc:  # a malformed multipart body
            return JSONResponse({"error": f"cannot parse the request ({type(exc).__name__}: {exc})"}, 400)
        if not items:
            return JSONResponse({"error": "no image in the request (send the image as the body, or as "
                                          "multipart file parts: curl -F file=@word.png; form fields are "
                                          "not images)"}, 400)
        if len(items) > self.limits.max_images:
            return JSONResponse({"error": f"{len(items)} images exceed the {self.limits.max_images}-image limit"},
                                413)
        decoded = await asyncio.to_thread(self._decode, items)
        if self._wants_detect(request):
            return await asyncio.to_thread(self._photos, decoded)
        good = [x for x in decoded if isinstance(x, Sample)]
        read = iter(await self.read_requests(good) if good else [])
        records = [next(read) if isinstance(x, Sample) else x for x in decoded]
        too_large = [r for r in records if r.pop("too_large", False)]
        if not good:  # nothing read: 413 when an image was over the pixel limit, else 400
            if too_large:
                return JSONResponse({"error": too_large[0]["error"], "results": records}, 413)
            return JSONResponse({"error": "no usable image in the request", "results": records}, 400)
        return JSONResponse({"results": records})

    def _decode(self, items: list[tuple[str, bytes]]) -> list[Sample | dict[str, Any]]:
        """A decoded sample per image, or its error record (pixel limit checked before decoding)."""
        out: list[Sample | dict[str, Any]] = []
        for name, data in items:
            try:
                out.append(Sample(name, load_image(data, max_pixels=self.limits.max_pixels, name=name)))
            except ImageTooLarge as exc:
                out.append({**json_record(ReadResult(name, error=str(exc)), self.recognizer), "too_large": True})
            except ImageError as exc:
                out.append(json_record(ReadResult(name, error=str(exc)), self.recognizer))
        return out

    def _wants_detect(self, request: Request) -> bool:
        value = request.query_params.get("detect")
        if value is None:
            return self.detect
        return value.strip().lower() in ("1", "true", "yes", "on")

    def _photos(self, decoded: list[Sample | dict[str, Any]]) -> JSONResponse:
        """Detection on: one photo record per image (decoding errors as records with no words)."""
        from runtime.detect.output import photo_record
        from runtime.detect.settings import DetectUnavailable

        good = [x for x in decoded if isinstance(x, Sample)]
        try:
            read = iter(self.recognizer.read_photos(good) if good else [])
        except DetectUnavailable as exc:
            return JSONResponse({"error": f"detection is not available here: {exc}"}, 400)
        records = [photo_record(next(read)) if isinstance(x, Sample) else
                   {"source": x["source"], "words": [], "error": x["error"]} for x in decoded]
        if not good:  # as for crops: 413 when a photo was over the pixel limit, else 400
            too_large = [x for x in decoded if isinstance(x, dict) and x.get("too_large")]
            if too_large:
                return JSONResponse({"error": too_large[0]["error"], "results": records}, 413)
            return JSONResponse({"error": "no usable image in the request", "results": records}, 400)
        return JSONResponse({"results": records})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def read_requests(self, requests: list[list[Sample]]) -> list[list[dict[str, Any]]]:
        """The records of each request of a ``serve.batch`` batch."""
        return await asyncio.to_thread(self._read, requests)

    def _read(self, requests: list[list[Sample]]) -> list[list[dict[str, Any]]]:
        read = self.recognizer.read
        if self.batching.merge == "request":
            return [[json_record(r, self.recognizer) for r in read(samples)] for samples in requests]
        flat = [(k, j) for k, samples in enumerate(requests) for j in range(len(samples))]
        results = read([requests[k][j] for k, j in flat], batch_size=DEFAULT_BATCH_SIZE)
        records: list[list[dict[str, Any]]] = [[{} for _ in samples] for samples in requests]
        for (k, j), result in zip(flat, results):
            records[k][j] = json_record(result, self.recognizer)
        return records

    def health(self) -> dict[str, Any]:
        model = self.recognizer.bundle.manifest.get("model", {}).get("name")
        return {"status": "ok", "pid": os.getpid(), "model": model,
                "backend": self.recognizer.backend.name, "precision": self.recognizer.backend.precision,
                "llm": self.recognizer.llm_enabled, "correction": self.recognizer.correction_kind,
                "threshold": self.recognizer.threshold,
                "views": self.recognizer.views.to_dict() if self.recognizer.views else None,
                "specialist": self.recognizer.specialist.settings.to_dict() if self.recognizer.specialist else None}


def build_app(settings: RecognizerConfig, limits: Limits, batching: Batching, replicas: int = 1,
              num_cpus: float = 1.0, num_gpus: float = 0.0, detect: bool = False) -> Any:
    """The Serve application: ``replicas`` copies of :class:`Reader`, each with its own CPUs/GPUs."""
    deployment = serve.deployment(Reader, name="clipllama-reader").options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max(16, 4 * batching.max_batch_size),
    )
    return deployment.bind(settings.to_dict(), limits.__dict__, batching.__dict__, num_cpus, detect)
