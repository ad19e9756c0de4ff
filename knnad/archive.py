"""One-file model storage: JSON metadata and named numpy arrays in an ``.npz`` archive,
written atomically and read without executing anything from the file (no pickle)."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Tuple

import numpy as np

from ._types import PathLike

_META_KEY = "__knnad_meta__"


class ModelFileError(ValueError):
    """A file that is not a readable knnad model of the expected kind and version."""


#: What to do about a damaged file, and about a file of another kind.
_RESTORE = "restore it from a good copy or fit and save the model again"
_NAME_ONE = "name a file written by knnad (knnad fit, Detector.save)"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data).hexdigest()


def check_target(path: PathLike, suffix: str = ".npz") -> Path:
    """``path`` as a Path if a model file can be written there: it ends in ``suffix``, is not a
    folder, and its folder exists and is writable; else a ValueError, FileNotFoundError or
    PermissionError saying what to change. Run it before long work whose result goes there."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"model path {path} must end in {suffix}")
    if path.is_dir():
        raise IsADirectoryError(f"model path {path} is a folder; name a file such as "
                                f"{path / ('model' + suffix)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} for the model file does not exist; create "
                                "it first")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists()
                                                         and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write the model file {path}: permission denied; choose "
                              f"another folder or fix its permissions")
    return path


#: Suffix of the hidden file a save writes before renaming it over the target.
PARTIAL_SUFFIX = ".knnad-partial"


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _partial_name(path: Path) -> str:
    """``.NAME.HOST.PID-XXXXXXXX.knnad-partial``: who writes it, recognisable by its suffix."""
    return f".{path.name}.{_host()}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def _remove_stale_partials(path: Path) -> None:
    """Delete the partial files that killed saves of ``path`` on this host left behind (the
    writer's process is gone); files of other hosts, of running saves and any other file stay."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(_host())}\.(\d+)-[0-9a-f]{{8}}"
                         rf"{re.escape(PARTIAL_SUFFIX)}")
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"):
        found = pattern.fullmatch(partial.name)
        if found and not _running(int(found.group(1))):
            partial.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_archive(path: PathLike, kind: str, version: int, meta: Dict[str, Any],
                  arrays: Dict[str, np.ndarray]) -> Path:
    """Write ``meta`` (JSON-serialisable) and ``arrays`` to ``path`` (``.npz``) atomically (see
    :func:`atomic_write`). Returns the path written."""
    header = {"kind": kind, "format_version": version, "meta": meta,
              "sha256": {name: _digest(array) for name, array in arrays.items()}}
    header_bytes = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    contents = {_META_KEY: header_bytes, **arrays}
    # numpy's stubs let **kwds fill allow_pickle (a bool); every key here is an array's name.
    return atomic_write(check_target(path),
                        lambda stream: np.savez(stream, **contents))  # type: ignore[arg-type]


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(stream)`` on a temporary file in ``path``'s folder, flush it to disk, then
    rename it over ``path``: a crash leaves either the old file or the new one, never half of
    one (a killed writer's temporary file is removed by the next write of ``path``). The file
    gets the permissions of any new file (0666 less the umask), or those of the file it
    replaces. Returns ``path``."""
    _remove_stale_partials(path)
    temporary = path.parent / _partial_name(path)
    try:
        # Opened inside the try: a Ctrl-C just after the file appears must still remove it.
        # O_EXCL with mode 0666: a new file of our own, with the umask applied as for any file;
        # the name holds this process's id and a random token, so no other writer owns it.
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        if path.exists():  # replacing a model keeps its permissions
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def read_archive(path: PathLike, kind: str, max_version: int, arrays: bool = True
                 ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], int]:
    """Read a file written by :func:`write_archive`. Returns ``(meta, arrays, version)``;
    with ``arrays=False`` only the header is read (``arrays`` is then empty and no checksum
    is verified: for a quick look at the settings, not for using the file's contents).

    Raises ModelFileError naming ``path`` for a missing, truncated, foreign or corrupted file,
    one of another kind, or one whose format version is newer than ``max_version``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"model file {path} is a folder; name the .npz file in it")
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read the model file {path}: permission denied; ask its "
                              f"owner to make it readable (chmod a+r) or to copy it for you")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            zip_start = handle.read(4) == b"PK\x03\x04"
        raise ModelFileError(f"{path} is truncated or corrupted (an incomplete .npz archive); "
                             f"{_RESTORE}" if zip_start
                             else f"{path} is not a knnad model file (not an .npz archive)")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            if _META_KEY not in archive.files:
                raise ModelFileError(f"{path} is not a knnad model file (no knnad header); "
                                     f"{_NAME_ONE}")
            header = json.loads(archive[_META_KEY].tobytes().decode())
            names = [name for name in archive.files if name != _META_KEY]
            stored = {name: archive[name] for name in names} if arrays else {}
    except ModelFileError:
        raise
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise ModelFileError(f"{path} is truncated, corrupted or not a knnad model file "
                                 f"({error}); {_RESTORE}") from None
        # numpy's advice (allow_pickle=True) would run code from the file: never give it.
        raise ModelFileError(f"{path} is not a knnad model file: it holds pickled Python "
                             f"objects, which knnad never loads (they could run code); "
                             f"{_NAME_ONE}") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError,
            UnicodeDecodeError) as error:
        raise ModelFileError(f"{path} is truncated, corrupted or not a knnad model file ({error}); "
                             f"{_RESTORE}") from None
    if not (isinstance(header, dict) and isinstance(header.get("meta"), dict)
            and isinstance(header.get("sha256"), dict)
            and all(isinstance(value, str) for value in header["sha256"].values())):
        raise ModelFileError(f"{path} is not a knnad model file (malformed knnad header); "
                             f"{_RESTORE}")
    if header.get("kind") != kind:
        raise ModelFileError(f"{path} holds a {header.get('kind')!r}, not a {kind!r}; {_NAME_ONE}")
    version = header.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise ModelFileError(f"{path} has format version {version}; this knnad reads versions up "
                             f"to {max_version}: upgrade knnad to load it")
    expected = header.get("sha256", {})
    if set(expected) != set(names):
        raise ModelFileError(f"{path} is incomplete: arrays {sorted(set(expected) ^ set(names))} "
                             f"missing or unexpected; {_RESTORE}")
    for name, array in stored.items():
        if _digest(array) != expected[name]:
            raise ModelFileError(f"{path} is corrupted: checksum of array {name!r} does not match; "
                                 f"{_RESTORE}")
    return header["meta"], stored, version
