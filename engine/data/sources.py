"""Where rows come from: local files (.jsonl, .json, .csv, .parquet) and folders of them.

Pure Python (pyarrow is imported only for a parquet file): the console reads and validates a
dataset with this module before it creates a run directory. Hub datasets are read in the engine
process (see `hub.py`), since only `datasets` can fetch them.

Every record carries `where`, "FILE: line N" (row N for csv/parquet, record N for a JSON array),
so any later problem names the exact place to fix.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.errors import DataError, at
from engine.paths import DATA_SUFFIXES
from engine.paths import as_path as _path
from engine.paths import is_local as is_local  # the data readers ask it too

SUPPORTED = DATA_SUFFIXES
UTF8_HINT = "re-save the file as UTF-8"


@dataclass(frozen=True)
class Record:
    where: str
    row: dict[str, Any]
    file: str = ""
    """The file (or hub dataset) the record comes from: a folder's files may differ in shape."""


def local_files(source: str) -> list[Path]:
    path = _path(source)
    if path is None or not path.exists():
        raise DataError(
            f"{source}: not found",
            "check data.source and data.val_source (paths in a preset are relative to the preset)",
        )
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED:
            raise DataError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r}",
                "use .jsonl, .json, .csv or .parquet",
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: the folder holds no .jsonl, .json, .csv or .parquet files")
    return files


def stop(error: DataError) -> None:
    raise error


def read_local(source: str, bad: Callable[[DataError], None] = stop) -> Iterator[Record]:
    """Every record of a local source. `bad` gets a line that cannot be read as a record (JSON
    Lines and CSV, where the next line can still be read): raise it to stop, or return to skip."""
    for path in local_files(source):
        yield from read_file(path, bad)


def read_file(path: Path, bad: Callable[[DataError], None] = stop) -> Iterator[Record]:
    count = skipped = 0

    def counted(error: DataError) -> None:
        nonlocal skipped
        bad(error)
        skipped += 1

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        records = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix](path, counted)
    for record in records:
        count += 1
        yield record
    if count == 0 and skipped:
        raise DataError(
            f"{path}: none of its {skipped:,} records could be read (data.bad_records: skip left out every one)",
            "fix the file; with data.bad_records: stop, `qlc data` names the first bad record",
        )
    if count == 0:
        raise DataError(
            f"{path}: the file is empty" if path.stat().st_size == 0 else f"{path}: the file holds no records"
        )


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise at(
            f"{path}: line {line}", f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {column})", UTF8_HINT
        ) from None


def _object(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise at(where, f"expected an object with named fields, got {type(value).__name__} {value!r}")
    return value


def _read_jsonl(path: Path, bad: Callable[[DataError], None]) -> Iterator[Record]:
    # Line by line, in bytes: a bad byte or bad JSON is reported at its own line, and a huge
    # file is never held in memory whole.
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}: line {number}"
            try:
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise at(
                        where, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", UTF8_HINT
                    ) from None
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise at(
                        where, _malformed(exc, one_line=True), "each line must be one JSON object"
                    ) from None
                record = Record(where, _object(where, value), str(path))
            except DataError as exc:
                bad(exc)
                continue
            yield record


def _malformed(exc: json.JSONDecodeError, one_line: bool = False) -> str:
    msg = exc.msg.removesuffix(" at")  # "Unterminated string starting at" + " at column N"
    if one_line and exc.lineno > 1:  # past the line's last character: the line stops too early
        return f"malformed JSON ({msg} at the end of the line)"
    return f"malformed JSON ({msg} at column {exc.colno})"


_SPACE = re.compile(r"[ \t\n\r]*")
# A one-key object holding a list is a wrapper ({"data": [...]}, {"train": [...]}), unless the key
# is a conversation's own: {"messages": [...]} is one record.
_RECORD_KEYS = ("messages", "conversations", "input_ids", "labels")


def _read_json(path: Path, bad: Callable[[DataError], None]) -> Iterator[Record]:
    text = _decode(path, path.read_bytes())
    start = _SPACE.match(text).end()
    if start == len(text):
        return
    if text[start] == "[":
        yield from _json_array(path, text, start, bad)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json: common, and unambiguous
            yield from _read_jsonl(path, bad)
            return
        raise at(f"{path}: line {exc.lineno}", _malformed(exc)) from None
    if isinstance(value, dict):
        lists = [(k, v) for k, v in value.items() if isinstance(v, list)]
        if len(value) == 1 and len(lists) == 1 and lists[0][0] not in _RECORD_KEYS:
            value = lists[0][1]
        else:
            yield Record(f"{path}: record 1", value, str(path))
            return
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    for number, item in enumerate(value, 1):
        yield from _record(f"{path}: record {number}", item, path, bad)


def _record(where: str, value: Any, path: Path, bad: Callable[[DataError], None]) -> Iterator[Record]:
    """One record of an array, or (not an object) one bad record."""
    try:
        record = Record(where, _object(where, value), str(path))
    except DataError as exc:
        bad(exc)
        return
    yield record


def _json_array(path: Path, text: str, start: int, bad: Callable[[DataError], None]) -> Iterator[Record]:
    """A top-level JSON array, one record at a time: the parsed records are never all held at
    once (a 200 MB file of short examples would take gigabytes as Python objects)."""
    decoder = json.JSONDecoder()

    def fail(pos: int, msg: str) -> DataError:
        exc = json.JSONDecodeError(msg, text, pos)
        return at(f"{path}: line {exc.lineno}", _malformed(exc))

    i = _SPACE.match(text, start + 1).end()
    number = 0
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            try:
                value, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise at(f"{path}: line {exc.lineno}", _malformed(exc)) from None
            number += 1
            yield from _record(f"{path}: record {number}", value, path, bad)
            i = _SPACE.match(text, i).end()
            if text.startswith(",", i):
                i = _SPACE.match(text, i + 1).end()
                continue
            if text.startswith("]", i):
                i += 1
                break
            raise fail(i, "Expecting ',' delimiter" if i < len(text) else "Expecting ']'")
    i = _SPACE.match(text, i).end()
    if i < len(text):
        raise fail(i, "Extra data")


def _read_csv(path: Path, bad: Callable[[DataError], None]) -> Iterator[Record]:
    text = _decode(path, path.read_bytes())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for number, row in enumerate(reader, 1):
            where = f"{path}: row {number}"
            if None in row:
                bad(at(where, f"has more fields than the header ({len(reader.fieldnames or [])})"))
            elif any(v is None for v in row.values()):
                bad(at(where, f"has fewer fields than the header ({len(reader.fieldnames or [])})"))
            else:
                yield Record(where, dict(row), str(path))
    except csv.Error as exc:
        raise at(f"{path}: line {reader.line_num}", f"malformed CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise DataError(f"{path}: reading parquet needs pyarrow", "pip install pyarrow") from None
    try:
        reader = pq.ParquetFile(path)
        number = 0
        for batch in reader.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield Record(f"{path}: row {number}", row, str(path))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowIOError / ArrowInvalid
        raise DataError(f"{path}: not a readable parquet file ({exc.__class__.__name__}: {exc})") from None


def count_records(source: str) -> int:
    """About how many records a local source holds, cheaply (for progress): lines of JSON Lines,
    rows of parquet (from its metadata). 0 when it cannot be known without parsing (JSON, CSV)."""
    total = 0
    for path in local_files(source):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            total += _count_lines(path)
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            except Exception:  # unreadable: reading it reports why
                return 0
        else:
            return 0
    return total


def _count_lines(path: Path) -> int:
    lines, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def local_bytes(source: str) -> int:
    return sum(p.stat().st_size for p in local_files(source))
