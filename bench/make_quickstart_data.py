"""Rebuild src/tunelab/assets/quickstart/ from ../shared/data (UCI sentiment labelled sentences).

usage: python bench/make_quickstart_data.py [SHARED_DATA_DIR]
"""
import json
import random
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data") / "social_science/uci_sentiment_labelled_sentences"
out = Path(__file__).resolve().parent.parent / "src/tunelab/assets/quickstart"
rows = []
for site in ["amazon_cells", "imdb", "yelp"]:
    for line in open(src / f"{site}_labelled.txt", encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        text, label = line.rsplit("\t", 1)
        rows.append({"instruction": "Is the sentiment of this review positive or negative? Answer with one word.",
                     "input": text.strip(), "output": "positive" if label.strip() == "1" else "negative",
                     "source": site})
# the source repeats a few sentences; keep one of each so no test sentence is also a training one
seen, unique = set(), []
for r in rows:
    if r["input"].lower() not in seen:
        seen.add(r["input"].lower())
        unique.append(r)
rows = unique
random.Random(0).shuffle(rows)
for name, part in [("sentiment_train.jsonl", rows[300:]), ("sentiment_test.jsonl", rows[:300])]:
    with open(out / name, "w") as f:
        for r in part:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(f"{len(rows)} rows -> {out}")
