"""The server's settings, described once: :class:`ServeSettings` holds their defaults,
:data:`SERVE_OPTIONS` their help, checks and command-line reading (``knnad serve`` derives its
flags from both), and :func:`check_access` the rule on who may reach the model.

Imports neither FastAPI nor uvicorn, so that the command line can read its options and refuse
an unsafe address before they are needed (:func:`missing_extra` names the extra when they are
not installed).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from .._checks import check_bool, check_int, check_number
from ..options import OPTIONS, Option

#: What to install when FastAPI, uvicorn or python-multipart is missing.
SERVE_EXTRA = "pip install 'knnad[serve]'"
#: The environment variable ``knnad serve`` reads the token from when ``--token`` is not given.
TOKEN_VARIABLE = "KNNAD_TOKEN"
#: Host names that reach this machine only.
LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")
#: A token: visible ASCII without spaces, as an HTTP header value carries it unchanged.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def missing_extra(error: ImportError) -> ImportError:
    """The ImportError to raise when ``error`` says a package of the ``serve`` extra is
    missing: it names the extra and how to install it."""
    return ImportError(f"knnad serve needs FastAPI, uvicorn and python-multipart: {SERVE_EXTRA} "
                       f"({error})")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IPv4/IPv6 address) reaches this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to any address
        return False


def _host(value: Any, name: str) -> str:
    if isinstance(value, str) and value.strip() and not any(c.isspace() for c in value):
        return value
    raise ValueError(f"{name} must be a host name or an IP address, got {value!r}")


def _token(value: Any, name: str) -> Optional[str]:
    if value is None or (isinstance(value, str) and _TOKEN.fullmatch(value)):
        return value
    raise ValueError(f"{name} must be visible ASCII characters without spaces (an HTTP header "
                     f"carries it), got {'an empty string' if value == '' else 'other text'}")


SERVE_OPTIONS: Dict[str, Option] = {
    "host": Option("address to listen on; any but a loopback address needs a token (or "
                   "--no-auth)", _host),
    "port": Option("TCP port (0: any free port, logged at start)",
                   lambda value, name: check_int(value, name, 0, 65535), parse=int),
    "token": Option(f"bearer token every endpoint but /healthz requires (Authorization: Bearer "
                    f"TOKEN); knnad serve reads ${TOKEN_VARIABLE} when it is not given", _token),
    "no_auth": Option("serve on a non-loopback address without a token, open to anyone who can "
                      "reach it", check_bool),
    "max_upload_mb": Option("largest request body in MiB; a larger one is refused with 413",
                            lambda value, name: check_number(value, name, 0.001, " of MiB"),
                            parse=float),
    "queue_size": Option("images admitted at once (decoding, waiting or being scored), and "
                         "requests sending their images at once; a request beyond either gets "
                         "503 with Retry-After",
                         lambda value, name: check_int(value, name, 1), parse=int),
    "batch_size": Option("images scored together in one backbone call, from one or several "
                         "requests (default: the model's batch_size)",
                         lambda value, name: None if value is None else
                         OPTIONS["batch_size"].check(value, name), parse=int),
    "max_wait_ms": Option("most ms a batch waits, after its first image, for the images of "
                          "requests still decoding them (none on their way: no wait)",
                          lambda value, name: check_number(value, name, 0.0, " of ms"),
                          parse=float),
}


@dataclass(frozen=True)
class ServeSettings:
    """How :func:`knnad.serve.app.create_app` and :func:`knnad.serve.server.serve` serve a model
    (see :data:`SERVE_OPTIONS` for each field). Checked when made: a ValueError names the
    field, or says why the address needs a token (:func:`check_access`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    no_auth: bool = False
    max_upload_mb: float = 20.0
    queue_size: int = 64
    batch_size: Optional[int] = None
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        for field in fields(self):
            checked = SERVE_OPTIONS[field.name].check(getattr(self, field.name), field.name)
            object.__setattr__(self, field.name, checked)
        check_access(self.host, self.token, self.no_auth)

    @property
    def max_upload_bytes(self) -> int:
        """:attr:`max_upload_mb` in bytes."""
        return int(self.max_upload_mb * 2**20)


def check_access(host: str, token: Optional[str], no_auth: bool) -> None:
    """A ValueError unless the model stays private: ``host`` is a loopback address, or a
    ``token`` guards it, or ``no_auth`` says it is served openly on purpose."""
    if token is None and not no_auth and not is_loopback(host):
        raise ValueError(f"host {host} is reachable from other machines, and no token guards the "
                         f"model: pass --token TOKEN (or set {TOKEN_VARIABLE}), or --no-auth to "
                         f"serve it to anyone who can reach {host}")
