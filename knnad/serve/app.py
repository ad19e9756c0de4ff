"""The HTTP service of one loaded model: the FastAPI application of ``knnad serve``.

Endpoints (every one but ``/healthz`` needs ``Authorization: Bearer TOKEN`` when a token is
set; 401 otherwise):

* ``POST /v1/predict``: one or more images as the file parts of a ``multipart/form-data`` body
  (``curl -F image=@a.png -F image=@b.png``); JSON ``{"images": [...]}``, one object per file
  in their order: ``name``, ``score`` (the image score, as ``Detector.predict`` gives it),
  ``label`` (true: anomalous, the score above the calibrated image threshold; null without
  thresholds, and ``note`` says why), ``threshold``, ``map_max`` (the anomaly map's largest
  value) and, with ``?overlay=true``, ``overlay_png`` (base64 PNG: the heatmap over the image
  as the model saw it). A body over ``max_upload_mb``: 413; more images than ``queue_size``:
  413; not multipart: 415; a file that is not a decodable image: 415; an image the model
  refuses (its mode's values out of range, its size or aspect ratio): 422; a malformed body:
  400; a full queue: 503 with ``Retry-After``. Errors are JSON ``{"detail": "one line"}``,
  knnad's own message for an image.
* ``GET /v1/model``: knnad's version, the model's settings, frame, memory bank and thresholds,
  and the server's settings.
* ``GET /healthz``: ``{"status": "ok"}``, without a token.
* ``GET /metrics``: Prometheus text (:mod:`knnad.serve.metrics`).
* ``GET /``: a page where a person drops images and sees their overlays, scores and labels.

Uploads are parsed in memory as they arrive (:mod:`knnad.serve.uploads`) and never written to
disk; the model file is read once, when the application is made, and never written.
Concurrent requests are scored together by :class:`~knnad.serve.batching.MicroBatcher` on
the model's thread, the thread that read the model file, and, on a CPU model, a helper thread
that takes a batch while the model's thread scores another; decoding runs in a pool of one
thread per CPU. Threads and torch: torch's OpenMP runtime keeps a pool of threads for each
thread that runs parallel work, and with more of them than CPUs it stops spinning between a
forward pass's many small operations — one image's predict took 39 ms on a thread other than
the one that loaded the model, 25 ms on the same. So only the model's thread scores on several
threads, and only a batch that is all the work admitted (one request at a time), which no
helper joins; any other batch scores on one thread (OpenMP thread counts are per thread), the
two workers side by side without spinning threads. On bottle, two CPUs shared with the
clients: 16 clients 35.6 images/s (26.6 with one worker on two threads), one client 45 ms a
request (64 on one thread).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .._types import PathLike
from .._version import __version__
from ..detector import Detector
from ..html_report import heatmap_overlay, heatmap_vmax
from ..preprocessing import ImageLoadError, decode_image
from ..report import display_images
from ..runtime import kept_cpu_threads, set_cpu_threads
from .batching import MicroBatcher, QueueFull
from .metrics import CONTENT_TYPE, Metrics
from .settings import ServeSettings, missing_extra
from .uploads import TooLarge, is_multipart, read_files

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
except ImportError as error:
    raise missing_extra(error) from error

logger = logging.getLogger(__name__)

#: The page at ``/``, in knnad/templates.
PAGE = "serve.html"
#: Seconds a client is told to wait (``Retry-After``) when the queue is full.
RETRY_AFTER_S = 1
#: The endpoints, as the metrics label them (any other path counts as "other").
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/model", "/v1/predict")


class HttpError(Exception):
    """An answer other than 200: ``status``, a one-line ``detail`` and extra ``headers``."""

    def __init__(self, status: int, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail}, self.status, self.headers)


@dataclass
class _Upload:
    """One uploaded image: its ``name``, the decoded upright ``image`` (kept for its overlay
    only), its preprocessed ``array`` ``[3, H, W]`` and its ``size`` ``(height, width)`` as
    given."""

    name: str
    image: Optional[Image.Image]
    array: np.ndarray
    size: Tuple[int, int]


@dataclass
class _Scored:
    """One image's ``score``, ``label`` (None without thresholds) and ``anomaly_map``
    ``[H, W]`` (the size ``Detector.predict`` gives it)."""

    score: float
    label: Optional[bool]
    anomaly_map: np.ndarray


class _Service:
    """The loaded model and what serves it: batcher, decoding pool, metrics."""

    def __init__(self, detector: Detector, name: str, settings: ServeSettings,
                 model_thread: ThreadPoolExecutor):
        self.detector, self.name, self.settings = detector, name, settings
        self.model_thread = model_thread  # one thread: loads the model, then scores
        thresholds = detector.thresholds_
        usable = thresholds is not None and thresholds.usable(detector.get_params())
        self.thresholds = thresholds if usable else None
        self.note = None if usable else (
            "no labels: the model has no thresholds; fit it with --calibrate (or call "
            "Detector.calibrate) and save it again" if thresholds is None else
            "no labels: the model's thresholds were calibrated with other scoring settings")
        self.display = display_images(detector)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(self._score, detector.batch_size, settings.queue_size,
                                    settings.max_wait_ms / 1000,
                                    helpers=int(detector.extractor_.device.type == "cpu"))
        self.pool: Optional[ThreadPoolExecutor] = None
        self.receiving = 0  # requests sending their bodies

    @contextmanager
    def receive(self) -> Iterator[None]:
        """``with service.receive():`` while a request's body arrives, at most ``queue_size``
        at once (memory: at most ``queue_size`` bodies of ``max_upload_mb``); QueueFull when
        that many are arriving."""
        if self.receiving >= self.settings.queue_size:
            raise QueueFull(f"{self.receiving} requests are sending their images (at most "
                            f"{self.settings.queue_size})")
        self.receiving += 1
        try:
            yield
        finally:
            self.receiving -= 1

    async def run(self, function: Any, *args: Any) -> Any:
        """``function(*args)`` in the decoding pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def authorized(self, header: Optional[str]) -> bool:
        """Whether an ``Authorization`` header value carries the token (compared in constant
        time); always, without a token."""
        token = self.settings.token
        if token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  token.encode())

    async def files(self, request: Request) -> List[Tuple[str, bytes]]:
        """``(name, bytes)`` of each file part of the request's multipart body, read into
        memory (:mod:`knnad.serve.uploads`); HttpError 415, 413 or 400 for a body of another
        type, too large or malformed, and 422 for one without files."""
        content_type = request.headers.get("content-type", "")
        if not is_multipart(content_type):
            raise HttpError(415, "send the images as the file parts of a multipart/form-data "
                                 "body (curl -F image=@part.png URL)")
        limit = self.settings.max_upload_bytes
        declared = request.headers.get("content-length", "")
        try:
            if declared.isdigit() and int(declared) > limit:
                raise TooLarge(int(declared), limit)
            parts = await read_files(request.stream(), content_type, limit)
        except TooLarge as error:
            raise HttpError(413, f"{error} (--max-upload-mb)") from None
        except ValueError as error:
            raise HttpError(400, str(error)) from None
        if not parts:
            raise HttpError(422, "no image in the request: send each image as a file part of a "
                                 "multipart/form-data body (curl -F image=@part.png URL)")
        if len(parts) > self.settings.queue_size:
            raise HttpError(413, f"{len(parts)} images in one request, more than the server "
                                 f"admits at once ({self.settings.queue_size}); send at most "
                                 f"{self.settings.queue_size} per request")
        return [(part.filename or f"image {number}", part.data)
                for number, part in enumerate(parts, 1)]

    def decode(self, files: List[Tuple[str, bytes]], overlay: bool) -> List[_Upload]:
        """Each file decoded and preprocessed as ``Detector.predict`` prepares an image file
        (the decoded image kept for an ``overlay``); HttpError 415 for one that is not a
        decodable image, 422 for one the model refuses."""
        uploads = []
        for name, data in files:
            try:
                image = decode_image(data, name)
            except ImageLoadError as error:
                raise HttpError(415, str(error)) from None
            try:
                array, size = self.detector.preprocessor_.prepare(image)
            except (ValueError, OSError) as error:  # ImageLoadError: its mode, size or values
                raise HttpError(422, str(ImageLoadError(name, getattr(error, "reason",
                                                                      str(error))))) from None
            uploads.append(_Upload(name, image if overlay else None, array, size))
        return uploads

    def _score(self, uploads: List[_Upload], worker: int, alone: bool) -> List[_Scored]:
        """The batcher's scoring, on its worker ``worker``'s thread: ``Detector.predict`` on the
        batch of preprocessed images, each map brought to its image's size with
        ``map_size="original"``. A batch scored ``alone`` on torch's thread count, any other on
        one thread (this thread's count only; see the module docstring)."""
        with kept_cpu_threads():
            if not alone:
                set_cpu_threads(1)
            prediction = self.detector.predict(np.stack([upload.array for upload in uploads]))
        scored = []
        for row, upload in enumerate(uploads):
            anomaly_map = prediction.anomaly_maps[row]
            if self.detector.map_size == "original":
                anomaly_map = self.detector.preprocessor_.original_maps(anomaly_map[None],
                                                                        [upload.size])[0]
            label = None if prediction.labels is None else bool(prediction.labels[row])
            scored.append(_Scored(float(prediction.image_scores[row]), label, anomaly_map))
        self.metrics.scored(len(uploads))
        return scored

    def rows(self, uploads: List[_Upload], scored: List[_Scored]) -> List[Dict[str, Any]]:
        """The answer's object for each image, with its overlay where its image was kept."""
        threshold = self.thresholds.image if self.thresholds is not None else None
        vmax = heatmap_vmax(self.thresholds)
        rows = []
        for upload, result in zip(uploads, scored):
            row = {"name": upload.name, "score": result.score, "label": result.label,
                   "threshold": threshold, "map_max": float(result.anomaly_map.max())}
            if upload.image is not None:
                picture = heatmap_overlay(self.display(upload.image), result.anomaly_map, vmax)
                buffer = io.BytesIO()
                Image.fromarray(picture).save(buffer, format="PNG")
                row["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
            rows.append(row)
        return rows

    def model(self) -> Dict[str, Any]:
        """What ``GET /v1/model`` answers."""
        thresholds = self.thresholds
        settings = self.settings
        return {"knnad": __version__, "model": self.name, "settings": self.detector.get_params(),
                "frame": list(self.detector.preprocessor_.frame or ()),  # fit and load fix it
                "memory_bank": [len(scale.index) for scale in self.detector.scales_],
                "thresholds": None if thresholds is None else {
                    "image": thresholds.image, "pixel": thresholds.pixel,
                    "quantile": thresholds.quantile},
                "labels": self.note or "true where the image score is above thresholds.image",
                "serve": {"batch_size": self.batcher.batch_size, "queue_size": settings.queue_size,
                          "max_upload_mb": settings.max_upload_mb,
                          "max_wait_ms": settings.max_wait_ms}}


def create_app(model: Union[Detector, PathLike], settings: Optional[ServeSettings] = None, *,
               name: Optional[str] = None, weights: Optional[str] = None,
               backend: Optional[str] = None, device: Optional[str] = None,
               **changes: Any) -> FastAPI:
    """The application serving ``model``: the path of a saved :class:`~knnad.Detector` (read
    here, once, with ``weights``, ``backend`` and ``device`` as in :meth:`Detector.load`) or a
    fitted one. A path is better: it is read on the thread that will score, which keeps
    predict at its speed (see the module docstring). ``settings`` (default
    :class:`ServeSettings`'s), with ``changes`` by name (``batch_size=4``), say how;
    ``batch_size`` sets the detector's, and its progress bars are turned off. ``name``: the
    model's name in ``GET /v1/model`` (default: the file's name). Its scoring and decoding
    threads run while the application does (its lifespan): serve it with uvicorn
    (:func:`knnad.serve.server.serve`) or ``with fastapi.testclient.TestClient(app)``."""
    settings = replace(settings or ServeSettings(), **changes)
    model_thread = ThreadPoolExecutor(1, "knnad-model")
    if isinstance(model, Detector):
        if (weights, backend, device) != (None, None, None):
            raise ValueError("weights, backend and device are read with a saved model; a fitted "
                             "Detector has them already: pass the saved model's path instead")
        detector = model
    else:
        try:
            detector = model_thread.submit(Detector.load, model, weights=weights,
                                           backend=backend, device=device,
                                           progress=False).result()
        except BaseException:
            model_thread.shutdown()
            raise
        name = name or Path(model).name
    if settings.batch_size is not None:
        detector.set_params(batch_size=settings.batch_size)
    detector.set_params(progress=False)
    service = _Service(detector, name or "a detector in memory", settings, model_thread)
    page = resources.files("knnad").joinpath("templates", PAGE).read_text("utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.pool = ThreadPoolExecutor(os.cpu_count() or 1, "knnad-decode")
        service.batcher.start(service.model_thread)
        try:
            yield
        finally:  # after the server answered every request it had taken
            await asyncio.get_running_loop().run_in_executor(None, service.batcher.close)
            service.pool.shutdown()

    app = FastAPI(title="knnad", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        """The token check and the metrics of every request; an unexpected error is logged
        and answered 500 without its details."""
        start = time.perf_counter()
        path = request.url.path
        if path != "/healthz" and not service.authorized(request.headers.get("authorization")):
            unauthorized = HttpError(401, "this server needs Authorization: Bearer TOKEN",
                                     {"WWW-Authenticate": "Bearer"})
            # The page asks for the token itself, and sends it with every request it makes.
            response: Response = HTMLResponse(page, 401, unauthorized.headers) \
                if path == "/" and request.method == "GET" else unauthorized.response()
        else:
            try:
                response = await call_next(request)
            except Exception:
                logger.exception("%s %s failed", request.method, path)
                response = JSONResponse({"detail": "internal error; see the server's log"}, 500)
        service.metrics.request(path if path in ENDPOINTS else "other", response.status_code,
                                time.perf_counter() - start,
                                predict=path == "/v1/predict" and request.method == "POST")
        return response

    @app.exception_handler(HttpError)
    async def http_error(request: Request, error: HttpError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        """A bad query parameter, in one line."""
        detail = "; ".join(f"{'.'.join(map(str, problem['loc'][1:]))}: {problem['msg']}"
                           for problem in error.errors())
        return JSONResponse({"detail": detail}, 422)

    @app.post("/v1/predict")
    async def predict(request: Request, overlay: bool = False) -> JSONResponse:
        try:
            with service.receive():  # on the event loop's thread, as every change of the count
                files = await service.files(request)
            with service.batcher.admit(len(files)) as admission:
                uploads = await service.run(service.decode, files, overlay)
                scored = await admission.score(uploads)
                rows = await service.run(service.rows, uploads, scored)
        except QueueFull as error:
            raise HttpError(503, f"the server is busy: {error}; retry in {RETRY_AFTER_S} s",
                            {"Retry-After": str(RETRY_AFTER_S)}) from None
        return JSONResponse({"images": rows, **({"note": service.note} if service.note else {})})

    @app.get("/v1/model")
    async def model_info() -> Response:
        text = json.dumps(service.model(), default=lambda value: type(value).__name__)
        return Response(text, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(service.batcher.depth), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
