"""Reading the JSON, JSON-lines and text files users give llavakit, with errors that name the file, the line
and what the file should have held: never a bare "Expecting value: line 1 column 1 (char 0)", "[Errno 2]"
or KeyError "'answers'".

Rows come back as `Record`s: plain dicts that remember where they were read, so that `row["answers"]` on a
row without that key says "a.jsonl:3 has no 'answers' key (it has 'question_id', 'text'); expected ...".
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A file that is missing, unreadable or not in the expected format; the message names it."""


class Record(dict):
    """A JSON object read from a file. A missing key raises DataFileError naming the file (and line), the
    keys the object has and what was expected, instead of a bare KeyError; `get` and `in` work as usual."""

    def __init__(self, data: dict, where: str, expected: str):
        super().__init__(data)
        self.where, self.expected = where, expected

    def __missing__(self, key: Any):
        keys = ", ".join(repr(k) for k in list(self)[:8]) or "no keys"
        raise DataFileError(f"{self.where} has no {key!r} key (it has {keys}); expected {self.expected}")


def read_text(path: str | Path, expected: str) -> str:
    """The UTF-8 text of `path` (a leading UTF-8 byte-order mark dropped, as Windows editors write one); an
    error that names the file and what it should be when it is missing, a directory, unreadable or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFileError(f"{path} does not exist; expected {expected}") from None
    except IsADirectoryError:
        raise DataFileError(f"{path} is a directory; expected a file: {expected}") from None
    except OSError as e:
        raise DataFileError(f"{path} could not be read ({e.strerror or e}); expected {expected}") from None
    return _decode_utf8(data, path, expected)


# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
               (codecs.BOM_UTF16_BE, "UTF-16"))


def _decode_utf8(data: bytes, path: Path, expected: str) -> str:
    """`data` as UTF-8, or a DataFileError saying where it is not (line and column of the first bad byte)."""
    fix = f"save it as UTF-8 (expected {expected})"
    for bom, encoding in _OTHER_BOMS:
        if data.startswith(bom):
            raise DataFileError(f"{path}: not UTF-8 text ({encoding}: it starts with a {encoding} byte-order mark); "
                                f"{fix}")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, line_start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        column = len(data[line_start:e.start].decode("utf-8")) + 1  # in characters, as editors count
        raise DataFileError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, column {column}); "
                            f"{fix}") from None
    if "\0" in text[:4096]:  # a NUL never belongs in a text file; every other byte NUL is UTF-16 without a mark
        raise DataFileError(f"{path}: not UTF-8 text (NUL bytes: UTF-16 without a byte-order mark, or binary); "
                            f"{fix}")
    return text


def parse_json(text: str, where: str, expected: str) -> Any:
    """json.loads with an error naming `where`, the line and column, and what was expected; the objects down
    to the rows come back as Records (see _records)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                            f"expected {expected}") from None
    return _records(data, where, expected)


def _records(data: Any, where: str, expected: str, level: int = 0) -> Any:
    """Objects as Records down to the rows: the top-level object, the objects in a top-level array or under a
    top-level key, and those in an array under a top-level key ({"annotations": [rows]}). Deeper objects
    stay plain dicts, which keeps large files fast."""
    if isinstance(data, list):
        return [_records(v, f"{where}, item {i}", expected, max(level, 1)) for i, v in enumerate(data)]
    if isinstance(data, dict) and level == 1:
        return Record(data, where, expected)
    if isinstance(data, dict) and level == 0:
        return Record({k: _records(v, f"{where}: {k!r}", expected, 1) for k, v in data.items()}, where, expected)
    return data


def read_json(path: str | Path, expected: str) -> Any:
    """A JSON file (see parse_json); `expected` describes what it should hold, for the error messages."""
    return parse_json(read_text(path, expected), str(path), expected)


def parse_jsonl(text: str, where: str, expected: str) -> list[Record]:
    """The objects of JSON-lines text, blank lines skipped; each a Record that knows its line."""
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{where}:{n} is not valid JSON ({e.msg} at column {e.colno}); expected "
                                f"{expected}") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{where}:{n} is a JSON {json_kind(row)}, not an object; expected {expected}")
        rows.append(Record(row, f"{where}:{n}", expected))
    return rows


def read_jsonl(path: str | Path, expected: str = "one JSON object per line") -> list[Record]:
    """The objects of a JSON-lines file (see parse_jsonl)."""
    return parse_jsonl(read_text(path, expected), str(path), expected)


def read_json_or_jsonl(path: str | Path, expected: str) -> Any:
    """A .jsonl file's rows (read_jsonl), any other file as one JSON document (read_json)."""
    return read_jsonl(path, expected) if Path(path).suffix == ".jsonl" else read_json(path, expected)


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type ("array", "object", ...), for error messages."""
    kinds = ((list, "array"), (dict, "object"), (str, "string"), (bool, "boolean"), (type(None), "null"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "number")  # a Record is an object
