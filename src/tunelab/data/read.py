"""Read data files into (row dict, "file:line") pairs: JSONL, JSON, CSV/TSV, Parquet, .txt, saved HF datasets."""

import csv
import json
import os
from pathlib import Path

from tunelab.errors import DataError

SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", "a folder saved by datasets.save_to_disk")


def display_name(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def read_records(path: "str | Path", split: str | None = None) -> list[tuple[dict, str]]:
    """All rows of a data file, each with where it came from ("data.jsonl:7")."""
    path = Path(path)
    name = display_name(path)
    if not path.exists():
        raise DataError(f"{name}: no such file; check the path (relative to {Path.cwd()})")
    if path.is_dir():
        rows = _read_saved_dataset(path, name, split)
    else:
        suffix = path.suffix.lower()
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
                  ".parquet": _read_parquet, ".txt": _read_txt}.get(suffix)
        if reader is None:
            raise DataError(f"{name}: unsupported file type {suffix!r}; use one of: {', '.join(SUPPORTED)}")
        rows = reader(path, name)
    if not rows:
        raise DataError(f"{name}: the file has no rows; check that it is the right file")
    return rows


def _read_jsonl(path: Path, name: str) -> list[tuple[dict, str]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object {{...}} per line, got {type(row).__name__}; "
                                "each line must be one example")
            rows.append((row, where))
    return rows


def _read_json(path: Path, name: str) -> list[tuple[dict, str]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); fix the file") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 and len(data) == 1 else [data]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a list of objects, got {type(data).__name__}")
    starts = _element_lines(text)
    rows = []
    for i, row in enumerate(data):
        where = f"{name}:{starts[i]}" if i < len(starts) else f"{name}:record {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object {{...}}, got {type(row).__name__}")
        rows.append((row, where))
    return rows


def _element_lines(text: str) -> list[int]:
    """The line on which each element of the top-level JSON array starts."""
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        return [1]
    starts, pos = [], pos + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return starts
        starts.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)


def _read_csv(path: Path, name: str) -> list[tuple[dict, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DataError(f"{name}: empty file; the first line must name the columns")
        start = reader.line_num + 1
        for cells in reader:
            if not any(c.strip() for c in cells):
                start = reader.line_num + 1
                continue
            where = f"{name}:{start}"
            if len(cells) != len(header):
                raise DataError(f"{where}: {len(cells)} cells but the header has {len(header)} columns; "
                                "quote cells that contain the delimiter")
            rows.append((dict(zip(header, cells)), where))
            start = reader.line_num + 1
    return rows


def _read_parquet(path: Path, name: str) -> list[tuple[dict, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [(row, f"{name}:row {i + 1}") for i, row in enumerate(table.to_pylist())]


def _read_txt(path: Path, name: str) -> list[tuple[dict, str]]:
    text = path.read_text(encoding="utf-8-sig")
    return [({"text": text}, name)] if text.strip() else []


def _read_saved_dataset(path: Path, name: str, split: str | None) -> list[tuple[dict, str]]:
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
            or (path / "state.json").exists()):
        raise DataError(f"{name}: a folder, but not one written by datasets.save_to_disk; pass a data file")
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    return [(row, f"{name}:row {i + 1}") for i, row in enumerate(ds)]
