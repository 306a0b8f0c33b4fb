"""Tokenized cache: how long preparing the data takes without the cache, on a miss, and on a hit.

Data: ../shared/data/instruction/llamafactory_alpaca_en_demo.json (999 alpaca rows). Tokenizer:
SmolLM2's (tests/assets/smollm2_tokenizer, its ChatML template). max_seq_len 1024, the default
10% validation split. Each figure is the median of --repeat runs of `prepare_data` in this process
(the tokenizer loaded once, as a run does); the cache lives in a temporary folder.

usage: python bench/tokenize_cache.py [--repeat 3] [--data FILE] [--shared ../shared]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # this tree's tunelab


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    p.add_argument("--data", default=None, help="default: the shared alpaca demo file")
    a = p.parse_args()
    data = a.data or str(Path(a.shared) / "data/instruction/llamafactory_alpaca_en_demo.json")
    os.environ["TUNELAB_CACHE"] = tempfile.mkdtemp(prefix="tunelab-bench-cache-")

    from tunelab.config.schema import DataConfig
    from tunelab.data.cache import cache_root
    from tunelab.data.prepare import prepare_data
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(HERE.parent / "tests/assets/smollm2_tokenizer")
    cfg = replace(DataConfig(), train=data, format="alpaca", max_seq_len=1024)
    off, miss, hit = [], [], []
    for _ in range(a.repeat):
        off.append(timed(lambda: prepare_data(replace(cfg, cache=False), tok, 42, progress=False)))
        shutil.rmtree(cache_root(), ignore_errors=True)  # a cold cache for every miss
        miss.append(timed(lambda: prepare_data(cfg, tok, 42, progress=False)))
        hit.append(timed(lambda: prepare_data(cfg, tok, 42, progress=False)))
    result = prepare_data(cfg, tok, 42, progress=False)
    assert result.report["tokenized_cache"] == "hit"
    size = sum(f.stat().st_size for f in cache_root().rglob("*") if f.is_file())
    tokens = result.report["train"]["tokens"] + result.report["val"]["tokens"]
    med = statistics.median
    print(f"{Path(data).name}: {len(result.train)} train + {len(result.val)} validation examples, {tokens} tokens; "
          f"cache entry {size / 1e6:.1f} MB; median of {a.repeat}")
    print(f"{'no cache (data.cache: false)':34} {med(off):7.3f} s")
    print(f"{'cold cache (tokenize + write)':34} {med(miss):7.3f} s")
    print(f"{'warm cache (hit)':34} {med(hit):7.3f} s   {med(off) / med(hit):.1f}x faster than no cache")
    shutil.rmtree(os.environ["TUNELAB_CACHE"], ignore_errors=True)


if __name__ == "__main__":
    main()
