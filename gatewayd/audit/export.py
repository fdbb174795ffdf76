"""Exporting audit records as CSV or JSON Lines, streamed in chunks (CLI file and console download).

Owns `iter_csv`, `iter_jsonl` and the CSV column order `CSV_COLUMNS`. Both take any iterable of
records (e.g. `query.query_records`, or a console search) and yield text chunks of about
`CHUNK_CHARS` characters, never the whole output, so an HTTP response can stream them and a
10 GB export uses the memory of one chunk. Encode the chunks as UTF-8.

**CSV** (RFC 4180: comma-separated, fields quoted with ``"`` when they contain a comma, quote,
CR or LF, quotes doubled, rows end with CRLF). The column order is stable — a change is a
breaking change for the spreadsheets and scripts of security staff — and is:

``ts, seq, node, event, user, device, source_ip, session, frontend, service, method, path,
dest, rule, reason, status, bytes_up, bytes_down, duration_ms, other, prev, hash``

* The first row is that header. A field a record does not have is an empty cell.
* ``other`` holds every remaining field of the record (``operator``, ``error``, ``serial``,
  checkpoint fields, and any field a later version adds) as compact JSON with sorted keys, or
  is empty — so no field is ever lost from an export.
* Values are written as the log holds them (already escaped by the writer, see
  `events.escape_text`); characters a display must not receive raw (controls, bidi
  overrides, lone surrogates — only a tampered file can hold them) are escaped the same way
  the CLI and the console show them (`events.display_text`).
* **Formula injection** (CWE-1236): spreadsheets run a cell that starts with ``=``, ``+``,
  ``-``, ``@``, TAB or CR as a formula, and user names, paths and reasons are chosen by the
  people being audited (``=HYPERLINK(...)`` as a user name). Excel on Japanese Windows also
  takes the full-width equals, plus, hyphen-minus and at sign (U+FF1D, U+FF0B, U+FF0D,
  U+FF20) for their ASCII forms, and a starter after leading whitespace (``" =1+1"``, or after an
  ideographic space U+3000) counts too (`looks_like_formula`). Such a text cell is written
  with a leading ``'`` (which Excel and LibreOffice do not show). Integer cells (``seq``,
  ``status`` codes, byte counts) are never prefixed. To recover an exact value, drop one
  leading ``'`` from a text cell that starts with ``'`` followed by (whitespace and) one of
  those characters, or use JSON Lines. (CSV cannot tell the text ``"200"`` from the integer
  200 either; JSON Lines is the exact format.) `safe_cell` is also what the usage report's
  CSV (`gatewayd.report.render`) writes its cells with.
* **Encoding**: UTF-8 **with a byte order mark** (U+FEFF as the first character). Excel on
  Japanese Windows opens a CSV without a BOM as Shift_JIS (CP932) and shows names such as
  ``田中`` as mojibake; with the BOM it reads UTF-8. LibreOffice, Python
  (``encoding="utf-8-sig"``) and pandas skip the BOM. Pass ``bom=False`` for tools that do
  not (the CLI's ``--no-bom``).

**JSON Lines**: one record per line, exactly the record's fields and values (sorted keys),
UTF-8 without a BOM, ``\\n`` line ends; the characters above are written as ``\\u`` escapes,
which JSON readers decode to the same value (`query.json_line`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from gatewayd.audit.events import display_text
from gatewayd.audit.query import json_line

CSV_COLUMNS: Final[tuple[str, ...]] = (
    "ts", "seq", "node", "event", "user", "device", "source_ip", "session", "frontend",
    "service", "method", "path", "dest", "rule", "reason", "status", "bytes_up", "bytes_down",
    "duration_ms", "other", "prev", "hash",
)
OTHER_COLUMN: Final = "other"
BOM: Final = "\ufeff"
CHUNK_CHARS: Final = 64 * 1024
FORMULA_STARTERS: Final = ("=", "+", "-", "@", "\t", "\r",
                           "\uff1d", "\uff0b", "\uff0d", "\uff20")  # full-width = + - @

_NAMED_COLUMNS: Final = frozenset(CSV_COLUMNS) - {OTHER_COLUMN}


def looks_like_formula(text: str) -> bool:
    """Whether a spreadsheet could run ``text`` as a formula: it starts with one of
    `FORMULA_STARTERS` (ASCII or full-width), possibly after whitespace (any ``str.isspace``
    character: space, NBSP, the ideographic space U+3000, LF, …).
    """
    return text.startswith(FORMULA_STARTERS) or text.lstrip().startswith(FORMULA_STARTERS)


def safe_cell(value: object) -> str:
    """One CSV cell: text escaped for display and defused against formula injection
    (a leading ``'`` when `looks_like_formula`). Integers are written as they are.
    """
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = value if isinstance(value, str) else str(value)
    # Checked before escaping too: display_text turns a leading TAB/CR into "\x09"/"\x0d".
    if looks_like_formula(text):
        return "'" + display_text(text)
    return display_text(text)


def csv_row(record: Mapping[str, Any]) -> list[str]:
    """The cells of one record in `CSV_COLUMNS` order."""
    rest = {key: value for key, value in record.items() if key not in _NAMED_COLUMNS}
    cells: list[str] = []
    for column in CSV_COLUMNS:
        if column == OTHER_COLUMN:
            # json_line escapes what display_text would; "{" never starts a formula.
            cells.append(json_line(rest, compact=True) if rest else "")
        else:
            cells.append(safe_cell(record.get(column)))
    return cells


def iter_csv(records: Iterable[Mapping[str, Any]], *, bom: bool = True) -> Iterator[str]:
    """Yield the CSV export of ``records`` (header first) in chunks; see the module docstring."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, dialect="excel", lineterminator="\r\n",
                        quoting=csv.QUOTE_MINIMAL)
    if bom:
        buffer.write(BOM)
    writer.writerow(CSV_COLUMNS)
    for record in records:
        writer.writerow(csv_row(record))
        if buffer.tell() >= CHUNK_CHARS:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def iter_jsonl(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """Yield the JSON Lines export of ``records`` in chunks (nothing at all for no records)."""
    parts: list[str] = []
    size = 0
    for record in records:
        line = json_line(record) + "\n"
        parts.append(line)
        size += len(line)
        if size >= CHUNK_CHARS:
            yield "".join(parts)
            parts.clear()
            size = 0
    if parts:
        yield "".join(parts)
