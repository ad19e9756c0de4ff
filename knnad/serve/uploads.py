"""Uploads read into memory, never written to disk: the file parts of a ``multipart/form-data``
body, its size limited as it arrives.

python-multipart's streaming parser, driven here (FastAPI's own form reading spools large files
to temporary files).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List

from .settings import missing_extra

try:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError as error:
    raise missing_extra(error) from error


class TooLarge(ValueError):
    """A body over the limit; ``size``: its bytes, as declared or as received so far."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the request body is {size / 2**20:.2f} MiB or more, over the "
                         f"{limit / 2**20:g} MiB limit")
        self.size, self.limit = size, limit


@dataclass
class FilePart:
    """A file part: the ``filename`` the client gave, its form ``field`` and its ``data``."""

    filename: str
    field: str
    data: bytes


def is_multipart(content_type: str) -> bool:
    """Whether a Content-Type header value is ``multipart/form-data`` with a boundary."""
    kind, options = parse_options_header(content_type)
    return kind == b"multipart/form-data" and bool(options.get(b"boundary"))


@dataclass
class _Part:
    headers: Dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False


class _Parts:
    """python-multipart's callbacks, collecting the parts: their headers and data."""

    def __init__(self) -> None:
        self.parts: List[_Part] = []
        self.name, self.value = bytearray(), bytearray()

    def on_part_begin(self) -> None:
        self.parts.append(_Part())

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.parts[-1].headers[bytes(self.name).lower()] = bytes(self.value)
        self.name.clear()
        self.value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1].data += data[start:end]

    def on_part_end(self) -> None:
        self.parts[-1].ended = True


async def read_files(chunks: AsyncIterator[bytes], content_type: str, limit: int
                     ) -> List[FilePart]:
    """The file parts (those with a ``filename``) of a ``multipart/form-data`` body arriving in
    ``chunks``, in their order, held in memory. Raises :class:`TooLarge` as soon as more than
    ``limit`` bytes arrived, and ValueError for a body that is not multipart or is malformed."""
    if not is_multipart(content_type):
        raise ValueError("not a multipart/form-data body with a boundary")
    _, options = parse_options_header(content_type)
    found = _Parts()
    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": found.on_part_begin, "on_header_field": found.on_header_field,
        "on_header_value": found.on_header_value, "on_header_end": found.on_header_end,
        "on_part_data": found.on_part_data, "on_part_end": found.on_part_end})
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise TooLarge(received, limit)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as error:
        raise ValueError(f"malformed multipart body ({error})") from None
    files = []
    for part in found.parts:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        if part.ended and b"filename" in disposition:
            files.append(FilePart(disposition[b"filename"].decode("utf-8", "replace"),
                                  disposition.get(b"name", b"").decode("utf-8", "replace"),
                                  bytes(part.data)))
    return files
