"""``knnad serve``: a saved model served by uvicorn until Ctrl-C or SIGTERM.

On either signal the server stops taking connections, answers the requests it has taken (for
at most :data:`DRAIN_TIMEOUT_S` seconds), stops its worker and returns normally, so that the
command exits with status 0. A second Ctrl-C stops without waiting.
"""
from __future__ import annotations

import gc
import logging
import signal
import socket
from typing import Any, Optional

from .._types import PathLike
from .app import create_app
from .settings import ServeSettings, missing_extra

try:
    import uvicorn
except ImportError as error:
    raise missing_extra(error) from error

logger = logging.getLogger(__name__)

#: Seconds the server waits, after a stop signal, for the requests it has taken.
DRAIN_TIMEOUT_S = 30
#: The signals that stop the server after it has answered what it had taken.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host`` (IPv4 or IPv6) and ``port`` (0: a free one), listening,
    whose connections send without Nagle's delay; OSError when the address is taken or not
    this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family)
    # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP, which
    # create_server's are not; connections inherit it from the listening socket. Without it, a
    # response written in two parts waited for the client's delayed ACK: 40 ms per request on
    # a kept-alive connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def uvicorn_server(app: Any, settings: ServeSettings) -> uvicorn.Server:
    """A uvicorn server of ``app`` that leaves logging to the caller (its records go to the
    ``uvicorn`` loggers) and drains for at most :data:`DRAIN_TIMEOUT_S` when stopped; run it
    with ``server.run(sockets=[listening_socket(...)])``."""
    return uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                         log_config=None,
                                         timeout_graceful_shutdown=DRAIN_TIMEOUT_S))


def _stop_requested(number: int, frame: Any) -> None:
    """What the stop signals do once uvicorn, which handles them while it serves, has stopped
    and raises them again: nothing (the server has drained; the command ends normally)."""
    logger.info("stopped by %s", signal.Signals(number).name)


def serve(model: PathLike, settings: Optional[ServeSettings] = None, *,
          weights: Optional[str] = None, backend: Optional[str] = None,
          device: Optional[str] = None) -> None:
    """Serve the model saved at ``model`` (read once; ``weights``, ``backend`` and ``device`` as
    in :meth:`Detector.load`) on ``settings.host``:``settings.port`` until SIGINT or SIGTERM,
    then drain and return. The address is bound before the model is read, so that a taken
    port fails at once. Call it from the main thread."""
    settings = settings or ServeSettings()
    sock = listening_socket(settings.host, settings.port)
    try:
        app = create_app(model, settings, weights=weights, backend=backend, device=device)
        # The loaded model and libraries are ~500k objects that live as long as the server: a
        # full collection walking them paused a request for 190 ms while serving; frozen, the
        # collector skips them.
        gc.collect()
        gc.freeze()
        server = uvicorn_server(app, settings)
        host, port = sock.getsockname()[:2]
        logger.info("serving %s on http://%s:%d/ (%s)", model,
                    f"[{host}]" if ":" in host else host, port,
                    "token required" if settings.token else "no token")
        previous = {number: signal.signal(number, _stop_requested) for number in STOP_SIGNALS}
        try:
            server.run(sockets=[sock])
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
    finally:
        sock.close()
