"""Reading the JSON, JSON-lines and text files users give llavakit, with errors that name the file, the line
and what the file should have held: never a bare "Expecting value: line 1 column 1 (char 0)", "[Errno 2]"
or KeyError "'answers'".

Rows come back as `Record`s: plain dicts that remember where they were read, so that `row["answers"]` on a
row without that key says "a.jsonl:3 has no 'answers' key (it has 'question_id', 'text'); expected ...".
"""

from __future__ import annotations

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
    """The UTF-8 text of `path`; an error that names the file and what it should be when it is missing, a
    directory, unreadable or not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFileError(f"{path} does not exist; expected {expected}") from None
    except IsADirectoryError:
        raise DataFileError(f"{path} is a directory; expected a file: {expected}") from None
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path} is not UTF-8 text (byte {e.start}); expected {expected}") from None
    except OSError as e:
        raise DataFileError(f"{path} could not be read ({e.strerror or e}); expected {expected}") from None


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
            raise DataFileError(f"{where}:{n} is a JSON {_kind(row)}, not an object; expected {expected}")
        rows.append(Record(row, f"{where}:{n}", expected))
    return rows


def read_jsonl(path: str | Path, expected: str = "one JSON object per line") -> list[Record]:
    """The objects of a JSON-lines file (see parse_jsonl)."""
    return parse_jsonl(read_text(path, expected), str(path), expected)


def read_json_or_jsonl(path: str | Path, expected: str) -> Any:
    """A .jsonl file's rows (read_jsonl), any other file as one JSON document (read_json)."""
    return read_jsonl(path, expected) if Path(path).suffix == ".jsonl" else read_json(path, expected)


def _kind(value: Any) -> str:
    names = {list: "array", dict: "object", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
