"""Reading record files: one JSON document (an array or an object) or JSON lines, in UTF-8/16/32; a record that
cannot be used is yielded as an error (bad bytes, not an object, not JSON) instead of stopping the pass."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BAD_ENCODING = "bad_encoding"  # a record with bytes that are not UTF-8
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8 (decoded with surrogateescape)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_NEITHER = "the file is neither one JSON document nor JSON lines"


class DataError(ValueError):
    """Data that cannot be used as given (a file that is neither JSON nor JSONL, a filter that keeps nothing);
    the message names the file, its line or the setting."""


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is a short machine-readable key, `sample_id` names it."""

    def __init__(self, reason: str, message: str = "", *, sample_id: str | None = None) -> None:
        self.reason = reason
        self.sample_id = sample_id
        where = f" [{sample_id}]" if sample_id is not None else ""
        super().__init__(f"{reason}{where}: {message}" if message else f"{reason}{where}")


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """(index, record) for a JSON file holding one array (or one object), or for JSONL (index = line number - 1).

    UTF-8 (with or without a BOM), UTF-16 and UTF-32 (by their BOM, or by the NUL bytes of JSON text without
    one) are read. A record that cannot be used yields (index, exception) instead of stopping the pass: a JSONL
    line that is not valid JSON (a `json.JSONDecodeError`), a record that is not an object, a record holding
    bytes that are not UTF-8 (`SampleError` reason `bad_encoding`, sample id `line N`). A file that is neither
    one JSON document nor JSON lines (text after the array, a syntax error inside it, no JSON line at all)
    raises `DataError` naming the first bad line.
    """
    path = Path(path)
    text = _decode(path.read_bytes(), path)
    start = _JSON_SPACE.match(text).end()
    head = text[start : start + 1]
    if head == "[":
        yield from _array_records(text, start + 1, path)
        return
    if head == "{":
        try:
            record, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            record, end = None, start
        if record is not None and _JSON_SPACE.match(text, end).end() == len(text):  # one object: one record
            yield 0, _checked(record, text, start, end)
            return
    yield from _jsonl_records(text, path)


def _decode(data: bytes, path: Path) -> str:
    """The text of a data file: UTF-16 / UTF-32 by BOM or by NUL bytes (strictly), else UTF-8 with any bad bytes
    kept as lone surrogates (`_UNDECODABLE`), so that only the records holding them are rejected."""
    boms = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"))
    boms += ((codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
    codec = next((name for bom, name in boms if data.startswith(bom)), None)
    if codec is None and b"\x00" in data[:4]:  # JSON text starts with ASCII: NULs mean UTF-16/32 without BOM
        if data[1:4] == b"\x00\x00\x00":
            codec = "utf-32-le"
        elif data[:3] == b"\x00\x00\x00":
            codec = "utf-32-be"
        else:
            codec = "utf-16-le" if data[1:2] == b"\x00" else "utf-16-be"
    if codec is None:
        return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    try:
        return data.decode(codec).removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[: err.start].decode(codec, errors="replace").count("\n") + 1
        raise DataError(
            f"{path}:{line}: read as {codec.upper()} (its BOM or NUL bytes say so), but byte {err.start} is not "
            f"{codec.upper()} ({err.reason}); save the file as UTF-8"
        ) from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _checked(record: Any, text: str, start: int, end: int) -> dict[str, Any] | Exception:
    """`record` (parsed from text[start:end]), or the error that rejects it: bytes that were not UTF-8, or not
    an object."""
    bad = _UNDECODABLE.search(text, start, end)
    if bad is not None:
        byte = ord(bad.group()) - 0xDC00
        return SampleError(
            BAD_ENCODING,
            f"byte 0x{byte:02x} is not UTF-8 (the file mixes encodings); this record is skipped: re-encode the "
            "file as UTF-8 to keep it",
            sample_id=f"line {_line_of(text, bad.start())}",
        )
    if not isinstance(record, dict):
        return SampleError(
            "bad_schema", "a record must be a JSON object", sample_id=f"line {_line_of(text, start)}"
        )
    return record


def _array_records(text: str, pos: int, path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """The elements of the JSON array opened just before `pos`, one at a time (each checked by `_checked`)."""
    decoder = json.JSONDecoder()
    index = 0
    pos = _JSON_SPACE.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{err.lineno}: not valid JSON in record {index + 1} of the array ({err.msg}, column "
                    f"{err.colno}); {_NEITHER}"
                ) from None
            yield index, _checked(record, text, pos, end)
            index += 1
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise DataError(
                f"{path}:{_line_of(text, pos)}: expected ',' or ']' after record {index} of the array, found "
                f"{text[pos : pos + 20]!r}; {_NEITHER}"
            )
    rest = _JSON_SPACE.match(text, pos).end()
    if rest < len(text):
        raise DataError(
            f"{path}:{_line_of(text, rest)}: text after the JSON array that ends on line {_line_of(text, pos)} "
            f"({text[rest : rest + 30]!r}); {_NEITHER}"
        )


def _jsonl_records(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """One record per non-empty line; a file none of whose lines is JSON raises `DataError`."""
    parsed, first_error = 0, None
    offset = 0
    for i, line in enumerate(text.split("\n")):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        if _UNDECODABLE.search(line):
            yield i, _checked(None, text, start, start + len(line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            first_error = first_error or (i, err)
            yield i, err
            continue
        parsed += 1
        yield i, record if isinstance(record, dict) else _not_object(i)
    if not parsed and first_error is not None:
        i, err = first_error
        raise DataError(f"{path}:{i + 1}: not valid JSON ({err.msg}, column {err.colno}); {_NEITHER}")


def _not_object(index: int) -> SampleError:
    return SampleError("bad_schema", "a record must be a JSON object", sample_id=f"line {index + 1}")
