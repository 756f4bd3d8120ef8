"""One file field of a multipart/form-data request, read as a stream.

Flask's request.files would first copy the whole upload into a temporary file (or
memory, when small) before the view runs. For a CSV import of any size we want the
opposite: the rows go on to PostgreSQL while the client is still sending, memory stays
flat, and the API needs no scratch disk. So the view decodes the body itself with
werkzeug's sans-IO MultipartDecoder, 64 KB at a time, and hands the file part on as a
binary stream.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from werkzeug.exceptions import BadRequest
from werkzeug.sansio.multipart import (
    NEED_DATA,
    Data,
    Epilogue,
    Field,
    File,
    MultipartDecoder,
)

from engine.errors import ValidationFailed

CHUNK_SIZE = 64 * 1024
# The decoder hands data on as it arrives and holds back at most a chunk and a boundary;
# only a part whose headers never end could grow its buffer, and that answers 413.
MAX_DECODER_BUFFER = 1024 * 1024


class MultipartFile:
    """The part named `field` of the request body, as `.stream` (a binary file object).

    Read `.stream` to its end, then call `finish()`, which drains the rest of the body
    and refuses any other part, so unknown fields answer 422 as they do in JSON.
    """

    def __init__(self, body: io.RawIOBase, content_type: str, mimetype_params: dict, field: str):
        if content_type != "multipart/form-data":
            raise ValidationFailed(
                "expected multipart/form-data",
                fields={field: ["Send the file as multipart/form-data."]},
            )
        boundary = mimetype_params.get("boundary", "").encode("latin-1")
        if not boundary:
            raise BadRequest("multipart/form-data without a boundary")
        self.field = field
        self.filename: str | None = None
        self._body = body
        self._decoder = MultipartDecoder(boundary, max_form_memory_size=MAX_DECODER_BUFFER)
        self._events = self._decode()
        self._find_file_part()
        self.stream = io.BufferedReader(_PartReader(self._part_data()), buffer_size=CHUNK_SIZE)

    def finish(self) -> None:
        for event in self._events:
            if isinstance(event, Field | File):
                raise _unknown_field(event.name)

    def _decode(self) -> Iterator:
        while True:
            chunk = self._body.read(CHUNK_SIZE)
            self._decoder.receive_data(chunk or None)
            while True:
                try:
                    event = self._decoder.next_event()
                except ValueError as exc:
                    raise BadRequest(f"malformed multipart body: {exc}") from None
                if event is NEED_DATA:
                    break
                yield event
                if isinstance(event, Epilogue):
                    return
            if not chunk:
                raise BadRequest("the multipart body ended before its closing boundary")

    def _find_file_part(self) -> None:
        for event in self._events:
            if isinstance(event, File) and event.name == self.field:
                self.filename = event.filename or None
                return
            if isinstance(event, Field | File):
                raise _unknown_field(event.name)
            if isinstance(event, Epilogue):
                break
        raise ValidationFailed(
            f"the {self.field} part is missing",
            fields={self.field: ["Missing data for required field."]},
        )

    def _part_data(self) -> Iterator[bytes]:
        for event in self._events:
            if isinstance(event, Data):
                if event.data:
                    yield event.data
                if not event.more_data:
                    return
            else:  # pragma: no cover - the decoder always closes a part with Data
                return


class _PartReader(io.RawIOBase):
    """A raw binary stream over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._pending:
            chunk = next(self._chunks, b"")
            if not chunk:
                return 0
            self._pending = memoryview(chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _unknown_field(name: str) -> ValidationFailed:
    return ValidationFailed("unknown form field", fields={name: ["Unknown field."]})
