"""An HTTP scoring service for a saved model (optional extra ``knnad[serve]``: FastAPI, uvicorn
and python-multipart): ``knnad serve MODEL``.

* :mod:`knnad.serve.app`: :func:`~knnad.serve.app.create_app`, the FastAPI application of one
  loaded model (``POST /v1/predict``, ``GET /v1/model``, ``/healthz``, ``/metrics`` and a page
  at ``/``), its token check and its handling of bad input;
* :mod:`knnad.serve.batching`: the micro-batcher that scores the images of concurrent
  requests together on one worker thread;
* :mod:`knnad.serve.metrics`: the Prometheus metrics;
* :mod:`knnad.serve.server`: :func:`~knnad.serve.server.serve`, uvicorn until Ctrl-C or
  SIGTERM, then a drain;
* :mod:`knnad.serve.settings`: :class:`~knnad.serve.settings.ServeSettings`, each setting's
  default, help and check, and the rule on addresses and tokens;
* :mod:`knnad.serve.uploads`: multipart bodies read into memory, their size limited as they
  arrive.

This package imports only its settings, so that ``knnad``'s command line reads them without
FastAPI; :mod:`knnad.serve.app` and :mod:`knnad.serve.server` raise an ImportError naming the
extra where it is missing.
"""
from .settings import SERVE_EXTRA, TOKEN_VARIABLE, ServeSettings

__all__ = ["SERVE_EXTRA", "TOKEN_VARIABLE", "ServeSettings"]
