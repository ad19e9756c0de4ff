"""One-file model storage: JSON metadata and named numpy arrays in an ``.npz`` archive,
written atomically and read without executing anything from the file (no pickle)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from ._types import PathLike

_META_KEY = "__knnad_meta__"


class ModelFileError(ValueError):
    """A file that is not a readable knnad model of the expected kind and version."""


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1)).hexdigest()


def write_archive(path: PathLike, kind: str, version: int, meta: Dict[str, Any],
                  arrays: Dict[str, np.ndarray]) -> Path:
    """Write ``meta`` (JSON-serialisable) and ``arrays`` to ``path`` atomically: a temporary
    file in the same folder, flushed to disk, then renamed over ``path``. A crash leaves either
    the old file or the new one, never half of one. Returns the path written."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"model path {path} must end in .npz")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} for the model file does not exist")
    header = {"kind": kind, "format_version": version, "meta": meta,
              "sha256": {name: _digest(array) for name, array in arrays.items()}}
    header_bytes = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **{_META_KEY: header_bytes}, **arrays)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_archive(path: PathLike, kind: str, max_version: int
                 ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], int]:
    """Read a file written by :func:`write_archive`. Returns ``(meta, arrays, version)``.

    Raises ModelFileError naming ``path`` for a missing, truncated, foreign or corrupted file,
    one of another kind, or one whose format version is newer than ``max_version``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            if _META_KEY not in archive.files:
                raise ModelFileError(f"{path} is not a knnad model file (no knnad header)")
            header = json.loads(archive[_META_KEY].tobytes().decode())
            arrays = {name: archive[name] for name in archive.files if name != _META_KEY}
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path} is truncated, corrupted or not a knnad model file ({error})") from None
    if header.get("kind") != kind:
        raise ModelFileError(f"{path} holds a {header.get('kind')!r}, not a {kind!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise ModelFileError(f"{path} has format version {version}; this knnad reads versions up "
                             f"to {max_version}: upgrade knnad to load it")
    expected = header.get("sha256", {})
    if set(expected) != set(arrays):
        raise ModelFileError(f"{path} is incomplete: arrays {sorted(set(expected) ^ set(arrays))} "
                             f"missing or unexpected")
    for name, array in arrays.items():
        if _digest(array) != expected[name]:
            raise ModelFileError(f"{path} is corrupted: checksum of array {name!r} does not match")
    return header["meta"], arrays, version
