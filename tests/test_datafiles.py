"""Text files in the wrong encoding: one line naming the file, where the first bad byte is and what to do;
a UTF-8 byte-order mark is accepted."""

import codecs
import json

import pytest

from llavakit.datafiles import DataFileError, read_json, read_jsonl, read_text

ROWS = [{"id": "a", "text": "plain"}, {"id": "b", "text": "très bien"}]


def test_latin1_names_the_byte_line_and_column(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS).encode("latin-1"))
    with pytest.raises(DataFileError) as e:
        read_jsonl(path, "questions, one JSON object per line")
    # line 2 is {"id": "b", "text": "très bien"}: è is the 24th character
    assert str(e.value) == (f"{path}: not UTF-8 text (byte 0xe8 at line 2, column 24); save it as UTF-8 "
                            "(expected questions, one JSON object per line)")


def test_the_column_counts_characters_before_the_bad_byte(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("élan\nnaïve café\n".encode("utf-8") + "señor".encode("latin-1"))
    with pytest.raises(DataFileError, match=r"byte 0xf1 at line 3, column 3\)"):
        read_text(path, "text")


@pytest.mark.parametrize("encoding, bom, name", [
    ("utf-16-le", codecs.BOM_UTF16_LE, "UTF-16"), ("utf-16-be", codecs.BOM_UTF16_BE, "UTF-16"),
    ("utf-32-le", codecs.BOM_UTF32_LE, "UTF-32"),
])
def test_utf16_and_utf32_with_a_byte_order_mark_are_named(tmp_path, encoding, bom, name):
    path = tmp_path / "d.json"
    path.write_bytes(bom + json.dumps(ROWS, ensure_ascii=False).encode(encoding))
    with pytest.raises(DataFileError) as e:
        read_json(path, "rows")
    assert str(e.value) == (f"{path}: not UTF-8 text ({name}: it starts with a {name} byte-order mark); "
                            "save it as UTF-8 (expected rows)")


def test_utf16_without_a_mark_is_not_taken_for_text(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps(ROWS).encode("utf-16-le"))
    with pytest.raises(DataFileError, match=r"d.json: not UTF-8 text \(NUL bytes: UTF-16 without a byte-order mark"):
        read_json(path, "rows")


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8-sig")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS), encoding="utf-8-sig")
    assert read_json(tmp_path / "d.json", "rows") == ROWS == read_jsonl(tmp_path / "d.jsonl")
    assert read_text(tmp_path / "d.json", "rows")[0] == "["
