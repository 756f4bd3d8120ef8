"""Streaming CSV for spreadsheets: rows go out as they are read, so memory stays flat
however long the per-message log is.

Cells are neutralised against formula injection (OWASP "CSV injection"): an address or
a provider's error text is data from outside, and a cell starting with =, +, -, @, a tab
or a carriage return would be evaluated by Excel, LibreOffice or Google Sheets. Such
cells get a leading apostrophe, which spreadsheets show as text and never evaluate.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    if isinstance(value, str) and text.startswith(_FORMULA_STARTS):
        return "'" + text
    return text


def csv_lines(columns: Sequence[str], chunks: Iterable[Sequence[Any]]) -> Iterator[str]:
    """The header, then one string per chunk of rows (attribute access by column)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(columns)
    yield flush()
    for rows in chunks:
        writer.writerows([spreadsheet_cell(getattr(row, c)) for c in columns] for row in rows)
        yield flush()
