"""`tunelab quantize`: write a quantized model, and the table that says what each type costs and buys.

For each type (f32, bf16, bitsandbytes int8/nf4 in transformers, GGUF q8_0/q4_k_m/... in llama.cpp)
the report gives the size on disk, the RAM the loaded model takes, the perplexity on held-out text
and greedy generation speed. Every row is measured in its own fresh process, so one row's memory
never counts in another's.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.errors import TunelabError

DEFAULT_TYPES = ("f32", "bf16", "int8", "nf4", "q8_0", "q4_k_m")
TORCH_TYPES = {"f32": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
BNB_TYPES = ("int8", "nf4", "fp4")


@dataclass
class QuantRow:
    type: str
    engine: str
    size_mb: float
    ram_mb: float
    perplexity: float
    tokens_per_s: float
    load_s: float


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin")) / 1e6


def _measure_torch(kind: str, model_ref: str, text: str, gen_tokens: int, workdir: Path) -> QuantRow:
    import torch

    from tunelab.hardware import set_threads
    from tunelab.models import load_model

    set_threads(None)
    rss0, t0 = _rss_mb(), time.perf_counter()
    model, tok = (load_model(model_ref, quantization=kind) if kind in BNB_TYPES
                  else load_model(model_ref, dtype=TORCH_TYPES[kind], device="cpu"))
    load_s = time.perf_counter() - t0
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ppl = float(torch.exp(model(ids, labels=ids).loss))
        prompt = ids[:, :16]
        kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, **kw)
        tps = gen_tokens / (time.perf_counter() - t)
    ram = _rss_mb() - rss0
    model.save_pretrained(workdir / kind)
    return QuantRow(kind, "transformers", _dir_mb(workdir / kind), ram, ppl, tps, load_s)


def _measure_gguf(kind: str, gguf: Path, text: str, gen_tokens: int) -> QuantRow:
    import numpy as np

    from tunelab import llamacpp

    import llama_cpp  # noqa: F401  (imported before the baseline, like torch for the other rows)

    rss0, t0 = _rss_mb(), time.perf_counter()
    llm = llamacpp.load(gguf, n_ctx=2048)
    load_s = time.perf_counter() - t0
    ids = llamacpp.tokenize(llm, text)
    llamacpp.generate_tokens(llm, ids[:16], 4)  # warm-up
    t = time.perf_counter()
    llamacpp.generate_tokens(llm, ids[:16], gen_tokens)
    tps = gen_tokens / (time.perf_counter() - t)
    ram = _rss_mb() - rss0
    llm.close()
    llm = llamacpp.load(gguf, n_ctx=max(len(ids), 64), logits_all=True)
    logits = llamacpp.logits(llm, ids)[:-1]
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    ppl = float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
    llm.close()
    return QuantRow(kind, "llama.cpp", gguf.stat().st_size / 1e6, ram, ppl, tps, load_s)


def _run_row(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tunelab.quantization", *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise TunelabError(f"measuring {args[1]} failed:\n{tail}")
    return json.loads(lines[-1])


def quantize_report(model_ref: str, types=DEFAULT_TYPES, text: str | None = None, gen_tokens: int = 64,
                    max_text_tokens: int = 512) -> list[QuantRow]:
    """Measure each type: size on disk, RAM when loaded, perplexity on `text`, greedy tokens/s."""
    from tunelab.exporters.gguf import QUANT_TYPES, export_gguf
    from tunelab.exporters.parity import HELD_OUT_TEXT
    from tunelab.models import load_tokenizer
    from tunelab.models.load import local_folder
    from tunelab.models.resolve import resolve_model

    text = text or HELD_OUT_TEXT
    src = resolve_model(model_ref)
    tok = load_tokenizer(local_folder(src) if src.kind != "run" else src.path / "final")
    text = tok.decode(tok(text, add_special_tokens=False)["input_ids"][:max_text_tokens])
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunelab-quant-") as work:
        (Path(work) / "text.txt").write_text(text)
        for kind in types:
            args = ["--measure", kind, "--model", model_ref, "--text", str(Path(work) / "text.txt"),
                    "--gen-tokens", str(gen_tokens), "--workdir", work]
            if kind not in TORCH_TYPES and kind not in BNB_TYPES:
                gguf_type = kind.removeprefix("gguf-")  # gguf-f16: the GGUF float types
                if gguf_type not in QUANT_TYPES:
                    raise TunelabError(f"quantize type {kind!r}: use f32, bf16, int8, nf4, fp4 (transformers) or a "
                                       f"GGUF type ({', '.join(QUANT_TYPES)}; gguf-f16 for the float ones)")
                gguf = Path(work) / f"{gguf_type}.gguf"
                export_gguf(model_ref, gguf, gguf_type, check=False)
                args += ["--gguf", str(gguf)]
            rows.append(QuantRow(**_run_row(args)))
            print(f"  measured {kind}", file=sys.stderr)
    return rows


def format_table(rows: list[QuantRow]) -> str:
    base = rows[0].perplexity if rows else 1.0
    lines = ["| type | engine | size on disk | RAM loaded | perplexity | tokens/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.type} | {r.engine} | {r.size_mb:.0f} MB | {r.ram_mb:.0f} MB | "
                     f"{r.perplexity:.3f} ({r.perplexity / base - 1:+.1%}) | {r.tokens_per_s:.1f} |")
    return "\n".join(lines)


def quantize(model_ref: str, to: str | None = None, out: "str | Path | None" = None, report: bool = False,
             types: list[str] | None = None, text_file: "str | Path | None" = None) -> list[QuantRow] | None:
    """`tunelab quantize`: write `model_ref` quantized `to` a type at `out`, and/or print the report."""
    from tunelab.exporters.gguf import QUANT_TYPES, export_gguf

    if not out and not report:
        raise TunelabError("quantize: give --out PATH to write the quantized model, --report for the table, or both")
    if out:
        if not to:
            raise TunelabError("quantize --out needs --to TYPE (int8, nf4, fp4, or a GGUF type such as q4_k_m)")
        if to.removeprefix("gguf-") in QUANT_TYPES and to not in BNB_TYPES:
            print(f"wrote {export_gguf(model_ref, out, to.removeprefix('gguf-'))}")
        elif to in BNB_TYPES:
            from tunelab.models import load_model
            from tunelab.runs import atomic_dir

            model, tok = load_model(model_ref, quantization=to)
            with atomic_dir(out) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            print(f"wrote {out} (bitsandbytes {to}; transformers loads it directly)")
        else:
            raise TunelabError(f"--to {to!r}: use int8, nf4, fp4 or a GGUF type ({', '.join(QUANT_TYPES)})")
    if report:
        kinds = list(types or DEFAULT_TYPES)
        if to and to not in kinds:
            kinds.append(to)
        text = Path(text_file).read_text() if text_file else None
        rows = quantize_report(model_ref, kinds, text)
        print(format_table(rows))
        return rows
    return None


def _main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--measure", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--workdir", required=True)
    p.add_argument("--gguf", default=None)
    a = p.parse_args(argv)
    text = Path(a.text).read_text()
    if a.gguf:
        row = _measure_gguf(a.measure, Path(a.gguf), text, a.gen_tokens)
    else:
        row = _measure_torch(a.measure, a.model, text, a.gen_tokens, Path(a.workdir))
    print(json.dumps(asdict(row)))


if __name__ == "__main__":
    _main()
