"""Reaching Ray: its import, naming the extra when it is missing, and the connection of this
process to a cluster at an address checked up front."""
from __future__ import annotations

import logging
import os
import socket
from typing import List, Optional, Tuple

from .._types import PathLike

logger = logging.getLogger(__name__)

#: What to install when Ray is missing.
RAY_EXTRA = "pip install 'knnad[ray]'"
#: Seconds to wait for a cluster's head to accept a connection before calling it unreachable
#: (Ray itself waits minutes).
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """The ``ray`` module (with Ray Data), or an ImportError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data: pyarrow, pandas)
    except ImportError as error:
        raise ImportError(f"knnad.distributed needs Ray with Ray Data (ray[data] >= 2.60, < 2.64): "
                          f"{RAY_EXTRA} ({error})") from error
    return ray


def _host_port(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address={address!r} is not a Ray cluster address; use None (this "
                         f"process's Ray, or a new local one), 'auto' (the cluster started here "
                         f"by 'ray start'), 'host:port' (the head's GCS port, 6379 by default) or "
                         f"'ray://host:port'")
    return host.strip("[]"), int(port)


def _local(host: str) -> bool:
    try:
        resolved = socket.gethostbyname(host)
    except OSError:
        return False
    return resolved.startswith("127.") or resolved in _node_addresses()


def _node_addresses() -> List[str]:
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        return []


def connect(address: Optional[str] = None):
    """Connect this process to Ray at ``address`` (see :mod:`knnad.distributed`) and return
    ``ray``.

    Raises ValueError for a malformed address, or for one that is not the cluster this process
    is already connected to; ConnectionError, naming the address and what to do, when nothing
    answers there (checked within :data:`CONNECT_TIMEOUT_S`)."""
    ray = import_ray()
    if address is None:
        if not ray.is_initialized():
            logger.info("starting a local Ray instance (address=None); pass address='auto' or "
                        "'host:port' to use a running cluster")
            ray.init(logging_level=logging.WARNING)
        return ray
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be None or a string such as 'auto' or 'host:6379', got "
                         f"{address!r}")
    if address != "auto":
        client = address.startswith("ray://")
        host, port = _host_port(address[len("ray://"):] if client else address)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise ConnectionError(
                f"no Ray cluster answers at address={address!r} ({error}); start one with "
                f"'ray start --head' on that machine, check the host and port (the head's GCS "
                f"port, 6379 by default, or the Ray Client port 10001 for ray://), or pass "
                f"address=None to run on a local Ray instance") from None
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            current_host, current_port = _host_port(current)
            same = port == current_port and (host == current_host
                                             or (_local(host) and _local(current_host)))
            if not same and not client:
                raise ValueError(f"this process is already connected to the Ray cluster at "
                                 f"{current}, not address={address!r}; call ray.shutdown() "
                                 f"first, or pass address=None to use the connected one")
            return ray
    elif ray.is_initialized():
        return ray
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as error:
        raise ConnectionError(f"no Ray cluster at address={address!r}: {error} Start one with "
                              f"'ray start --head', or pass address=None to run on a local Ray "
                              f"instance") from None
    return ray


def absolute(path: PathLike) -> str:
    """``path`` made absolute here, on the driver: the workers' working folder is not this
    process's."""
    return os.path.abspath(os.fspath(path))
