"""Read a data file into (row dict, "file:line") pairs: JSONL, JSON, CSV/TSV, Parquet, .txt, saved datasets."""

import csv
import io
import json
import os
import sys
from pathlib import Path

from tunelab.errors import DataError

SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet, .txt, or a folder written by datasets' save_to_disk"
_JSON_WS = " \t\r\n"  # the only whitespace JSON allows between tokens


def display_name(path: "str | Path") -> str:
    """The path relative to the current directory when it lies inside it (short, clickable), else absolute."""
    absolute = Path(os.path.abspath(path))  # abspath, not resolve: keep the user's symlink names
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def short(value: object, limit: int = 60) -> str:
    """A repr of value cut to about `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_records(path: "str | Path", *, split: str | None = None) -> list[tuple[dict, str]]:
    """Read every row of a data file, each with where it came from.

    Args:
        path: a .jsonl/.json/.csv/.tsv/.parquet/.txt file, or a folder written by
            `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        split: which split of a saved DatasetDict folder to read (default "train"); ignored for files.

    Returns:
        (row, where) pairs; where is "name.jsonl:LINE", "name.parquet:row N", "folder:row N" or "name.txt".

    Raises:
        DataError: the path is missing, unreadable, of an unknown type, malformed, or has no rows.
    """
    path = Path(path)
    name = display_name(path)
    if not path.exists():
        raise DataError(f"{name}: no such file; check the path (relative to the current directory {Path.cwd()})")
    try:
        if path.is_dir():
            rows = _read_saved_dataset(path, name, split)
        else:
            suffix = path.suffix.lower()
            reader = _READERS.get(suffix)
            if reader is None:
                raise DataError(f"{name}: unsupported file type {suffix or '(no extension)'!r}; "
                                f"convert it to one of: {SUPPORTED}")
            rows = reader(path, name)
    except OSError as e:
        raise DataError(f"{name}: cannot read the file ({e.strerror or e}); "
                        "check that it exists and is readable") from None
    if not rows:
        raise DataError(f"{name}: no data rows (the file is empty, blank or only a header); "
                        "check that it is the right file")
    return rows


def _decode(path: Path, name: str) -> str:
    """The file's text; a byte order mark is dropped, and bytes that are not UTF-8 are reported by line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "re-save the file with UTF-8 encoding") from None


def _read_jsonl(path: Path, name: str) -> list[tuple[dict, str]]:
    rows = []
    # split("\n"), not splitlines(): splitlines also breaks on \u2028 etc., which JSON strings may hold raw,
    # and the line numbers must match what an editor shows.
    for lineno, line in enumerate(_decode(path, name).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ("; the file looks like one JSON document spread over lines: rename it to .json"
                    if line.strip() in ("[", "{") else "")
            raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno}); "
                            f"fix or remove that line{hint}") from None
        if not isinstance(row, dict):
            hint = "; if the whole file is one JSON array, rename it to .json" if isinstance(row, list) else ""
            raise DataError(f"{where}: expected one JSON object {{...}} per line, got {_kind(row)} "
                            f"{short(row)}; make each line one example object{hint}")
        rows.append((row, where))
    return rows


def _read_json(path: Path, name: str) -> list[tuple[dict, str]]:
    text = _decode(path, name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("; the file looks like JSON Lines (one object per line): rename it to .jsonl"
                if e.msg == "Extra data" else "")
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                        f"fix the file there{hint}") from None
    start = _skip(text, 0)
    if isinstance(data, dict) and len(data) == 1 and _is_record_list(next(iter(data.values()))):
        # a wrapper such as {"data": [...]}: the records are the list's items
        (key, items), = data.items()
        offsets = _element_offsets(text, _member_offsets(text, start)[key])
    elif isinstance(data, dict):
        items, offsets = [data], [start]
    elif isinstance(data, list):
        items, offsets = data, _element_offsets(text, start)
    else:
        raise DataError(f"{name}: expected a list of objects [{{...}}, ...], got {_kind(data)} {short(data)}; "
                        "put the examples in a JSON array")
    rows = []
    for item, line in zip(items, _line_numbers(text, offsets)):
        where = f"{name}:{line}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object {{...}} per record, got {_kind(item)} {short(item)}; "
                            "make each record one example object")
        rows.append((item, where))
    return rows


def _is_record_list(value: object) -> bool:
    """Whether a lone list value is the records of a wrapper ({"data": [...]}), not one chat's messages."""
    if not isinstance(value, list):
        return False
    return not any(isinstance(v, dict) and ("role" in v or "from" in v) for v in value)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WS:
        pos += 1
    return pos


def _element_offsets(text: str, pos: int) -> list[int]:
    """Offsets where each element of the JSON array starting at text[pos] == "[" begins (text is valid JSON)."""
    decoder = json.JSONDecoder()
    offsets = []
    pos = _skip(text, pos + 1)
    while text[pos] != "]":
        offsets.append(pos)
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
    return offsets


def _member_offsets(text: str, pos: int) -> dict[str, int]:
    """Offsets where each member value of the JSON object starting at text[pos] == "{" begins."""
    decoder = json.JSONDecoder()
    members = {}
    pos = _skip(text, pos + 1)
    while text[pos] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, _skip(text, pos) + 1)  # past the ":"
        members[key] = pos  # a repeated key keeps the last value, as json.loads does
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
    return members


def _line_numbers(text: str, offsets: list[int]) -> list[int]:
    """1-based line of each (ascending) offset, counting newlines incrementally so big files stay linear."""
    lines, line, last = [], 1, 0
    for offset in offsets:
        line += text.count("\n", last, offset)
        last = offset
        lines.append(line)
    return lines


def _read_csv(path: Path, name: str) -> list[tuple[dict, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # training texts easily exceed csv's default 128 KiB cell limit
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(_decode(path, name), newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{name}:1: no header; the first line must name the columns, "
                            "e.g. instruction,input,output")
        seen = set()
        for column in header:
            if column in seen:
                raise DataError(f"{name}:1: column {column!r} appears twice in the header; rename one of them")
            seen.add(column)
        rows = []
        start = reader.line_num + 1
        for cells in reader:
            # reader.line_num is the record's last physical line; a quoted cell may span several
            where = f"{name}:{start}"
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):  # blank lines and spreadsheet exports' trailing ",,," rows
                continue
            if len(cells) != len(header):
                raise DataError(f"{where}: {len(cells)} cells but the header has {len(header)} columns; "
                                f"quote cells that contain {delimiter!r} or line breaks")
            rows.append((dict(zip(header, cells)), where))
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: invalid CSV ({e}); fix that line") from None
    return rows


def _read_parquet(path: Path, name: str) -> list[tuple[dict, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:
        raise DataError(f"{name}: cannot read it as Parquet ({short(str(e), 120)}); "
                        "check that the file is complete and really Parquet") from None
    return [(row, f"{name}:row {i}") for i, row in enumerate(table.to_pylist(), 1)]


def _read_txt(path: Path, name: str) -> list[tuple[dict, str]]:
    text = _decode(path, name)
    return [({"text": text}, name)] if text.strip() else []


def _read_saved_dataset(path: Path, name: str, split: str | None) -> list[tuple[dict, str]]:
    is_dict = (path / "dataset_dict.json").exists()
    if not is_dict and not (path / "state.json").exists():
        raise DataError(f"{name}: a folder, but not one written by datasets' save_to_disk (it has no state.json "
                        "or dataset_dict.json); pass a data file, or save the dataset with save_to_disk")
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises assorted types for a damaged folder
        raise DataError(f"{name}: cannot load the saved dataset ({type(e).__name__}: {short(str(e), 120)}); "
                        "save it again with save_to_disk") from None
    if is_dict:
        split = split or "train"
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; it has {', '.join(ds)}; choose one of those")
        ds = ds[split]
    elif split not in (None, "train"):
        raise DataError(f"{name}: split {split!r} was asked for, but this folder holds a single dataset "
                        "without splits; drop the split or point at the DatasetDict folder")
    return [(row, f"{name}:row {i}") for i, row in enumerate(ds.to_list(), 1)]


def _kind(value: object) -> str:
    """JSON's name for a value's type."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
            ".parquet": _read_parquet, ".txt": _read_txt}
