"""read_records: every file type, its file:line sources, and its error messages."""

import json
from pathlib import Path

import pytest

from tunelab.data.read import display_name, read_records
from tunelab.errors import DataError

DATA = Path(__file__).parent / "assets" / "data"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path so sources read "name.jsonl:3"."""
    monkeypatch.chdir(tmp_path)


def error_of(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        read_records(path, **kw)
    return str(e.value)


def test_jsonl_rows_and_physical_line_numbers(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n\n   \n{"a": "x\u2028y"}\r\n{"a": 3}')
    rows = read_records("d.jsonl")
    # \u2028 inside a string must not count as a line break; \r\n is fine
    assert rows == [({"a": 1}, "d.jsonl:1"), ({"a": "x\u2028y"}, "d.jsonl:4"), ({"a": 3}, "d.jsonl:5")]


def test_jsonl_real_slice():
    rows = read_records(DATA / "text_c4_demo.jsonl")
    assert [w.rsplit(":", 1)[1] for _, w in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0][0]["text"].startswith("Don’t think you need all the bells and whistles?")


def test_jsonl_invalid_json_names_line_column_and_fix(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3 "b": 4}\n')
    msg = error_of("data.jsonl")
    assert msg == "data.jsonl:3: invalid JSON (Expecting ',' delimiter, column 9); fix or remove that line"


@pytest.mark.parametrize("line, kind", [("[1, 2]", "an array"), ("42", "a number"), ('"hi"', "a string")])
def test_jsonl_non_object_line(tmp_path, line, kind):
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n' + line + "\n")
    msg = error_of("d.jsonl")
    assert msg.startswith(f"d.jsonl:2: expected one JSON object {{...}} per line, got {kind}")
    assert "make each line one example object" in msg


def test_jsonl_holding_a_pretty_printed_array_suggests_json(tmp_path):
    (tmp_path / "d.jsonl").write_text('[\n  {"a": 1}\n]\n')
    msg = error_of("d.jsonl")
    assert msg.startswith("d.jsonl:1: invalid JSON") and "rename it to .json" in msg


def test_json_line_numbers_of_real_slice():
    path = DATA / "alpaca_en_demo.json"
    rows = read_records(path)
    # independently: the lines that open a record in this indent=2 file
    opening = [i for i, line in enumerate(path.read_text().split("\n"), 1) if line == "  {"]
    assert len(rows) == 12 and [int(w.rsplit(":", 1)[1]) for _, w in rows] == opening
    assert rows[0][1] == f"{display_name(path)}:2"
    assert rows[0][0]["instruction"] == "Describe a process of making crepes."


def test_json_line_numbers_with_brackets_inside_strings(tmp_path):
    text = '[{"q": "a [b] {c}", "n": [1,\n 2]},\n\n  {"q": "]"},   {"q": "x"}\n,\n{"q": "\\n"}]'
    (tmp_path / "d.json").write_text(text)
    assert [w for _, w in read_records("d.json")] == ["d.json:1", "d.json:4", "d.json:4", "d.json:6"]


def test_json_wrapper_object_and_single_object(tmp_path):
    (tmp_path / "w.json").write_text('{\n  "data": [\n    {"a": 1},\n\n    {"a": 2}\n  ]\n}')
    assert read_records("w.json") == [({"a": 1}, "w.json:3"), ({"a": 2}, "w.json:5")]
    (tmp_path / "one.json").write_text('\n\n{"instruction": "[x]", "output": "y", "history": [["q", "a"]]}')
    assert read_records("one.json") == [({"instruction": "[x]", "output": "y", "history": [["q", "a"]]},
                                          "one.json:3")]
    # a single chat has one list value too, but its items are messages, not records
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    assert read_records("chat.json") == [(chat, "chat.json:1")]


def test_json_invalid_names_line_and_column(tmp_path):
    (tmp_path / "d.json").write_text('[\n  {"a": 1},\n  {"a": 2,}\n]')
    msg = error_of("d.json")
    assert msg.startswith("d.json:3: invalid JSON (") and "column 11" in msg and "fix the file there" in msg


def test_json_that_is_really_jsonl_suggests_rename(tmp_path):
    (tmp_path / "d.json").write_text('{"a": 1}\n{"a": 2}\n')
    msg = error_of("d.json")
    assert msg.startswith("d.json:2: invalid JSON (Extra data") and "rename it to .jsonl" in msg


def test_json_bad_shapes(tmp_path):
    (tmp_path / "s.json").write_text('"just text"')
    msg = error_of("s.json")
    assert msg.startswith("s.json: expected a list of objects") and "'just text'" in msg and "JSON array" in msg
    (tmp_path / "e.json").write_text('[\n {"a": 1},\n "oops"\n]')
    msg = error_of("e.json")
    assert msg.startswith("e.json:3: expected an object {...} per record, got a string 'oops'")
    assert "make each record one example object" in msg


def test_csv_line_numbers_with_multiline_quoted_cell(tmp_path):
    (tmp_path / "d.csv").write_text(
        'instruction,input,output\n'
        'Say hi,,hi\n'
        '"Write a poem\nin two\nlines",x,"a\nb"\n'
        '\n'
        'Last,"with, comma",z\n', newline="")
    rows = read_records("d.csv")
    assert rows == [
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "d.csv:2"),
        ({"instruction": "Write a poem\nin two\nlines", "input": "x", "output": "a\nb"}, "d.csv:3"),
        ({"instruction": "Last", "input": "with, comma", "output": "z"}, "d.csv:8"),
    ]


def test_csv_bom_crlf_and_trailing_empty_rows(tmp_path):
    (tmp_path / "d.csv").write_bytes("\ufeffa,b\r\n1,2\r\n,\r\n".encode())
    assert read_records("d.csv") == [({"a": "1", "b": "2"}, "d.csv:2")]


def test_csv_cells_longer_than_csv_default_limit(tmp_path):
    long = "x" * 200_000
    (tmp_path / "d.csv").write_text(f"text\n{long}\n")
    assert read_records("d.csv")[0][0]["text"] == long


def test_tsv(tmp_path):
    (tmp_path / "d.tsv").write_text("prompt\tcompletion\nQ, with comma\tA\n")
    assert read_records("d.tsv") == [({"prompt": "Q, with comma", "completion": "A"}, "d.tsv:2")]


def test_csv_errors(tmp_path):
    (tmp_path / "n.csv").write_text("a,b\n1,2\n\"x,y\",1,2\n")
    msg = error_of("n.csv")
    assert msg.startswith("n.csv:3: 3 cells but the header has 2 columns") and "quote cells" in msg
    (tmp_path / "dup.csv").write_text("a,a\n1,2\n")
    msg = error_of("dup.csv")
    assert msg.startswith("dup.csv:1: column 'a' appears twice") and "rename one" in msg
    (tmp_path / "h.csv").write_text("a,b\n")
    assert error_of("h.csv").startswith("h.csv: no data rows")
    (tmp_path / "empty.csv").write_text("")
    msg = error_of("empty.csv")
    assert msg.startswith("empty.csv:1: no header") and "first line must name the columns" in msg


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", None]}), tmp_path / "d.parquet")
    assert read_records("d.parquet") == [({"prompt": "a", "completion": "x"}, "d.parquet:row 1"),
                                         ({"prompt": "b", "completion": None}, "d.parquet:row 2")]


def test_parquet_corrupt(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    msg = error_of("bad.parquet")
    assert msg.startswith("bad.parquet: cannot read it as Parquet") and "really Parquet" in msg


def test_saved_dataset_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(str(tmp_path / "ds"))
    assert read_records("ds") == [({"text": "one"}, "ds:row 1"), ({"text": "two"}, "ds:row 2")]
    assert read_records("ds", split="train") == read_records("ds")
    msg = error_of("ds", split="test")
    assert msg.startswith("ds: split 'test' was asked for") and "drop the split" in msg


def test_saved_dataset_dict_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "tr"}]),
                 "test": Dataset.from_list([{"text": "te1"}, {"text": "te2"}])}).save_to_disk(str(tmp_path / "dd"))
    assert read_records("dd") == [({"text": "tr"}, "dd:row 1")]
    assert read_records("dd", split="test") == [({"text": "te1"}, "dd:row 1"), ({"text": "te2"}, "dd:row 2")]
    msg = error_of("dd", split="validation")
    assert msg.startswith("dd: no split 'validation'") and "train, test" in msg
    # a split's own folder is a plain saved dataset
    assert read_records(Path("dd") / "test")[1] == ({"text": "te2"}, "dd/test:row 2")


def test_plain_folder_is_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    msg = error_of("folder")
    assert msg.startswith("folder: a folder, but not one written by datasets' save_to_disk")
    assert "pass a data file" in msg


def test_txt_is_one_record(tmp_path):
    (tmp_path / "book.txt").write_text("Chapter 1\n\nIt was a dark night.\n")
    assert read_records("book.txt") == [({"text": "Chapter 1\n\nIt was a dark night.\n"}, "book.txt")]


def test_missing_file(tmp_path):
    msg = error_of(Path("data") / "x.jsonl")
    assert msg == f"data/x.jsonl: no such file; check the path (relative to the current directory {Path.cwd()})"


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]"),
                                           ("w.json", '{"data": []}'), ("e.txt", "  \n")])
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    msg = error_of(name)
    assert msg.startswith(f"{name}: no data rows") and "check that it is the right file" in msg


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    msg = error_of("d.xlsx")
    assert msg.startswith("d.xlsx: unsupported file type '.xlsx'")
    for ext in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", "save_to_disk"):
        assert ext in msg


def test_not_utf8_names_line(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    msg = error_of("d.jsonl")
    assert msg.startswith("d.jsonl:2: not UTF-8 text (byte 0xe9)") and "re-save the file with UTF-8" in msg


def test_display_name_relative_inside_cwd_else_absolute():
    assert display_name(Path.cwd() / "sub" / "d.jsonl") == str(Path("sub") / "d.jsonl")
    outside = Path.cwd().parent / "elsewhere.jsonl"
    assert display_name(outside) == str(outside)
