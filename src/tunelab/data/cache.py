"""Pre-tokenized cache: a second run on the same data, tokenizer and data settings skips tokenizing.

An entry is found by a sha256 key over everything that changes the encoded result: the data
files' bytes, the tokenizer (its whole serialisation: vocabulary, merges, normalizer, special
tokens), the chat template, every `data.*` setting, the seed (it draws the validation split),
the transformers/tokenizers versions and the source of tunelab's data code (so a change to how
examples are encoded can never read stale ids). Packing is not in the key: it happens when a
micro batch is collated, after this cache.

<cache root>/tokenized/<key>/
  arrays.npz      token ids, labels and per-example numbers, per split (numpy; loaded without pickle)
  meta.json       example sources, the examples themselves, the data report
  manifest.json   sha256 of the two files above, checked on every load
The entry is written into a temporary folder that is renamed when complete. An entry that is
unreadable or fails a check is deleted and rebuilt: the cache can cost a rebuild, never a run.
"""

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from tunelab.config.schema import DataConfig
from tunelab.data.encode import Encoded
from tunelab.data.types import Example

FORMAT_VERSION = 1  # the entry layout below; bump it when the layout changes
CODE_FILES = [*sorted((Path(__file__).parent).glob("*.py")),
              Path(__file__).parent.parent / "training" / "stages" / "pretrain.py"]


def cache_root() -> Path:
    """Where entries live: <tunelab cache>/tokenized (~/.cache/tunelab, or $TUNELAB_CACHE)."""
    from tunelab.models.load import cache_dir

    return cache_dir() / "tokenized"


def cached_prepare(cfg: DataConfig, tokenizer, seed: int, kind: str, build: Callable) -> "PreparedData":  # noqa: F821
    """`build()`'s PreparedData, from the cache when an entry for these inputs exists.

    The report gains `tokenized_cache`: "hit", "miss" (built, and written for next time) or "off".
    """
    if not cfg.cache or not _inputs_exist(cfg):  # a missing file: let build() raise its DataError
        data = build()
        data.report["tokenized_cache"] = "off"
        return data
    key = cache_key(cfg, tokenizer, seed, kind)
    entry = cache_root() / key
    data, problem = load_entry(entry) if entry.exists() else (None, None)
    if data is not None:
        data.report["tokenized_cache"] = "hit"
        return data
    data = build()
    if problem:
        shutil.rmtree(entry, ignore_errors=True)
    try:
        save_entry(entry, data)
        error = None
    except (OSError, TypeError, ValueError) as e:  # a full disk or an unwritable cache must not stop a run
        error = f"{type(e).__name__}: {e}"
    data.report["tokenized_cache"] = "miss"  # set after saving: a later hit reports "hit", and only that
    if problem:
        data.report["tokenized_cache_rebuilt"] = problem
    if error:
        data.report["tokenized_cache_error"] = error
    return data


def cache_messages(report: dict) -> list[str]:
    """What a run logs about the cache: the hit, or why an entry was rebuilt or not written."""
    out = []
    if report.get("tokenized_cache") == "hit":
        out.append("tokenized cache hit: tokenizing skipped (data.cache: false turns the cache off)")
    if report.get("tokenized_cache_rebuilt"):
        out.append(f"[yellow]warning:[/] a tokenized cache entry was damaged and has been rebuilt "
                   f"({report['tokenized_cache_rebuilt']})")
    if report.get("tokenized_cache_error"):
        out.append(f"[yellow]warning:[/] could not write the tokenized cache in {cache_root()} "
                   f"({report['tokenized_cache_error']}); the run goes on without it (free space there, set "
                   "$TUNELAB_CACHE to a writable folder, or data.cache: false)")
    return out


def cache_key(cfg: DataConfig, tokenizer, seed: int, kind: str = "sft") -> str:
    """sha256 over every input that changes the encoded examples (see the module docstring)."""
    from tunelab.runs import sha256_file

    settings = {k: v for k, v in asdict(cfg).items() if k != "cache"}  # every data.* setting, now and later
    parts = {"layout": FORMAT_VERSION, "kind": kind, "seed": seed, "data": settings,
             "train_sha256": sha256_file(cfg.train),
             "validation_sha256": sha256_file(cfg.validation) if cfg.validation else None,
             "tokenizer": tokenizer_fingerprint(tokenizer), "code": _code_hash(), "versions": _versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its full serialisation, special tokens, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: vocabulary, merges, normalizer, pre/post-processors, added tokens
        h.update(backend.to_str().encode())
    else:  # slow (Python) tokenizer: its vocabulary and settings
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    h.update(json.dumps([tokenizer.special_tokens_map, tokenizer.eos_token_id, tokenizer.bos_token_id],
                        sort_keys=True, default=str).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    return h.hexdigest()


def save_entry(entry: Path, data) -> None:
    """Write `data` as a cache entry: a temporary folder renamed into place (first writer wins)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        arrays, meta = {}, {"report": data.report,
                            "train_examples": [asdict(e) for e in data.train_examples],
                            "val_examples": [asdict(e) for e in data.val_examples]}
        for split, items in (("train", data.train), ("val", data.val)):
            arrays.update(_pack(split, items))
            meta[f"{split}_sources"] = [e.source for e in items]
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta))
        manifest = {"layout": FORMAT_VERSION, "sha256": {n: _sha256(tmp / n) for n in ("arrays.npz", "meta.json")}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "manifest.json").is_file():  # not "another process got there first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_entry(entry: Path) -> "tuple[PreparedData | None, str | None]":  # noqa: F821
    """(data, None) from a sound entry; (None, what is wrong) from a broken one."""
    from tunelab.data.prepare import PreparedData

    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest["layout"] != FORMAT_VERSION:
            raise ValueError(f"layout {manifest['layout']}, expected {FORMAT_VERSION}")
        for name, digest in manifest["sha256"].items():
            if _sha256(entry / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
        meta = json.loads((entry / "meta.json").read_text())
        with np.load(entry / "arrays.npz", allow_pickle=False) as z:  # no pickle: a cache file cannot run code
            train = _unpack(z, "train", meta["train_sources"])
            val = _unpack(z, "val", meta["val_sources"])
        examples = {s: [Example(**e) for e in meta[f"{s}_examples"]] for s in ("train", "val")}
        return PreparedData(train, val, examples["train"], examples["val"], meta["report"]), None
    except Exception as e:  # noqa: BLE001 -- any damage at all means "rebuild", never a crash
        return None, f"{entry}: {type(e).__name__}: {str(e)[:200]}"


def _pack(split: str, items: list[Encoded]) -> dict[str, np.ndarray]:
    lengths = np.array([len(e.input_ids) for e in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = lambda rows: np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))  # noqa: E731
    return {f"{split}_ids": flat(e.input_ids for e in items), f"{split}_labels": flat(e.labels for e in items),
            f"{split}_offsets": offsets,
            f"{split}_full_length": np.array([e.full_length for e in items], dtype=np.int64),
            f"{split}_truncated": np.array([e.truncated for e in items], dtype=bool),
            f"{split}_eos_appended": np.array([e.eos_appended for e in items], dtype=bool)}


def _unpack(z, split: str, sources: list[str]) -> list[Encoded]:
    ids, labels, offsets = z[f"{split}_ids"], z[f"{split}_labels"], z[f"{split}_offsets"]
    full, cut, eos = z[f"{split}_full_length"], z[f"{split}_truncated"], z[f"{split}_eos_appended"]
    n = len(sources)
    if not (len(offsets) == n + 1 and len(full) == len(cut) == len(eos) == n
            and int(offsets[-1]) == len(ids) == len(labels)):
        raise ValueError(f"{split}: array sizes disagree")
    ids, labels, bounds = ids.tolist(), labels.tolist(), offsets.tolist()
    return [Encoded(ids[a:b], labels[a:b], src, int(f), bool(c), bool(e))
            for a, b, src, f, c, e in zip(bounds[:-1], bounds[1:], sources, full, cut, eos)]


def _inputs_exist(cfg: DataConfig) -> bool:
    return Path(cfg.train).exists() and (not cfg.validation or Path(cfg.validation).exists())


def _sha256(path: Path) -> str:
    from tunelab.runs import sha256_file

    return sha256_file(path)


def _code_hash() -> str:
    h = hashlib.sha256()
    for f in CODE_FILES:
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "tokenizers"):  # chat-template rendering and tokenization live there
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
