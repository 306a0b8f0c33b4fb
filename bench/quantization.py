"""Quantization table: size on disk, RAM when loaded, perplexity on held-out text, greedy tokens/s.

Types: f32 and bf16 (transformers), int8 and nf4 (bitsandbytes in transformers), GGUF q8_0 and
q4_k_m (llama.cpp). Each row runs in its own process (RAM = RSS growth from loading the model and
generating); tokens/s is batch 1, greedy, `--gen-tokens` new tokens after a 16-token prompt, after
a 4-token warm-up. Held-out text: the first --max-text-tokens tokens of the file given by --text
(default: ../shared/data/text_corpora/war-and-peace.txt from its 20,000th character, public domain),
else tunelab's built-in paragraph.

usage: python bench/quantization.py [--model smollm2-135m-instruct] [--types f32,bf16,int8,nf4,q8_0,q4_k_m]
                                    [--text FILE] [--max-text-tokens 512] [--gen-tokens 64]
"""

import argparse
import os
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_TEXT = HERE.parent.parent / "shared" / "data" / "text_corpora" / "war-and-peace.txt"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--types", default="f32,bf16,int8,nf4,q8_0,q4_k_m")
    p.add_argument("--text", default=None)
    p.add_argument("--max-text-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    a = p.parse_args()
    from tunelab.quantization import format_table, quantize_report

    text = None
    path = Path(a.text) if a.text else SHARED_TEXT
    if path.is_file():
        text = path.read_text()[20000:60000]
    rows = quantize_report(a.model, a.types.split(","), text, a.gen_tokens, a.max_text_tokens)
    print(f"model {a.model}; held-out text: {path.name if text else 'built-in paragraph'}, "
          f"{a.max_text_tokens} tokens; {a.gen_tokens} generated tokens; {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
