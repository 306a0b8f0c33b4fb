"""Training speed: tunelab against the peers' recipes, same model, data, LoRA and batch, in one run.

Model: SmolLM2-135M-Instruct as a plain HF folder (../shared/bench/make_smollm2_hf.py).
Data: ../shared/data/instruction/llamafactory_alpaca_en_demo.json. LoRA rank 16, alpha 32,
all-linear, dropout 0; 8 rows per optimizer step; max_seq_len 512; the same number of steps.
Peers (../shared/bench/peer_hf_trainer.py; for --method full, bench/peer_full_finetune.py, the same
recipe without the adapter): the HF Trainer recipe as documented (fp32 on a CPU), the same with bf16,
TRL SFTTrainer with bf16 and padding-free packing.
tunelab runs four ways: compiled (the headline), eager, compiled with data.train_on_prompt so
that its loss is the peers' quantity (every token, not only the answers), and compiled with
gradient checkpointing (train.gradient_checkpointing); with --method full also compiled with 8-bit
AdamW (bitsandbytes), with bf16 weights (train.weight_dtype), and with the optimizer stepped inside
backward (train.optimizer_in_backward), alone and with checkpointing: the memory-saving options.
--variant picks rows, or combines options: `--variant bf16-weights+in-backward`.
Each runs in its own process (peak RSS is per process); the first step is not timed.
--shape 360m / 1.7b runs the tunelab rows on SmolLM2's larger published shapes with random weights
(written once to bench/.cache): how MFU grows with the model, where GEMMs outweigh the memory-bound
work around them (their losses mean nothing).

usage: python bench/train_speed.py [--steps 10] [--method lora|full] [--only tunelab] [--shape 135m|360m|1.7b]
                                   [--variant compile ...] [--peer documented|bf16|trl ...] [--shared ../shared]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def flops_per_token(method: str, n_params: float, n_lora: float, n_head: float, layers: int, hidden: int,
                    seq: float, head_fraction: float = 1.0) -> float:
    """Training FLOPs per token. Full: 6N (forward 2N, backward 4N). LoRA: the frozen base needs no
    weight gradients, so 4N, plus 6 per adapter parameter. The output head's share of N (n_head)
    counts only for the tokens it runs on (head_fraction): tunelab trains on the answer tokens by
    default and never applies the head to the prompt's; the peers apply it everywhere. Causal
    attention adds 6*layers*seq*hidden for an example of seq tokens (scores and values, forward and
    backward, half the pairs for the mask); seq is the mean example length, which slightly
    undercounts batches of uneven lengths (a token costs its own example's length)."""
    per_weight = 6 if method == "full" else 4
    base = per_weight * (n_params - n_head + n_head * head_fraction) + (6 * n_lora if method == "lora" else 0)
    return base + 6 * layers * seq * hidden


PEERS = {"documented": ("HF Trainer, documented (fp32)", []), "bf16": ("HF Trainer + bf16", ["--bf16"]),
         "trl": ("TRL SFTTrainer bf16 + padding-free", ["--bf16", "--trl"])}
LORA_RANK = 16
# SmolLM2's published sizes. 135m is the real model; the larger two are its config with their
# dimensions and random weights (no hub here), for speed only: their losses mean nothing.
SHAPES = {"135m": {},
          "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                   "num_attention_heads": 15, "num_key_value_heads": 5},
          "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                   "num_attention_heads": 32, "num_key_value_heads": 32}}


def model_counts(model_dir: Path) -> tuple[float, float, float]:
    """The model's parameters (a tied head counted once), its rank-LORA_RANK all-linear adapter's
    parameters, and its output head's parameters; from the config alone (a model on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    head = model.get_output_embeddings()
    n_lora = sum(LORA_RANK * (m.in_features + m.out_features) for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    return sum(p.numel() for p in model.parameters()), n_lora, head.weight.numel()

# Each tunelab row is a variant: options joined by "+" (`in-backward+grad-checkpoint`), compiled
# unless it names eager. Each option: its label and what it sets in the run config.
OPTIONS = {"compile": ("", {}), "eager": ("", {"train.compile": False}),
           "all-tokens": ("loss on every token", {"data.train_on_prompt": True}),
           "adamw-8bit": ("8-bit AdamW", {"train.optimizer": "adamw_8bit"}),
           "bf16-weights": ("bf16 weights", {"train.weight_dtype": "bf16"}),
           "grad-checkpoint": ("gradient checkpointing", {"train.gradient_checkpointing": True}),
           "in-backward": ("optimizer in backward (no clipping)",
                           {"train.optimizer_in_backward": True, "train.max_grad_norm": 0.0}),
           # the default lora.dropout (the bench sets 0): what a config that leaves it trains at
           "dropout": ("LoRA dropout 0.05", {"lora.dropout": 0.05})}
# options of full fine-tuning's optimizer and weights; of LoRA's
FULL_ONLY = ("adamw-8bit", "bf16-weights", "in-backward")
LORA_ONLY = ("dropout",)
ROWS = ["compile", "eager", "all-tokens", "grad-checkpoint", "dropout", "adamw-8bit", "bf16-weights", "in-backward",
        "in-backward+grad-checkpoint"]


def variant_options(variant: str) -> list[str]:
    """The options of a variant name; argparse's type, so a bad name is a usage error."""
    names = variant.split("+")
    for name in names:
        if name not in OPTIONS:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(OPTIONS)} (join options with +)")
    return names


def variant_arg(variant: str) -> str:
    variant_options(variant)
    return variant


def variant_label(variant: str) -> str:
    names = variant_options(variant)
    labels = [OPTIONS[n][0] for n in names if OPTIONS[n][0]]
    return ", ".join(["(eager)" if "eager" in names else "+ compile", *labels])


def variants(method: str) -> list[str]:
    only_other = LORA_ONLY if method == "full" else FULL_ONLY
    return [v for v in ROWS if not set(variant_options(v)) & set(only_other)]


def tunelab_config(model_dir: str, data: str, steps: int, method: str, variant: str) -> dict:
    """The run config of one tunelab row: the peers' model, data, LoRA, batch and learning rate."""
    cfg = {"name": "bench", "output_dir": tempfile.mkdtemp(), "method": method, "seed": 0,
           "model": {"ref": model_dir},
           "data": {"train": data, "format": "alpaca", "val_fraction": 0, "max_seq_len": 512},
           "lora": {"rank": LORA_RANK, "alpha": 2 * LORA_RANK, "dropout": 0.0, "target_modules": "all-linear"},
           "train": {"max_steps": steps, "micro_batch_size": 8, "grad_accum_steps": 1,
                     "learning_rate": 2e-4 if method == "lora" else 2e-5, "warmup_steps": 0,
                     "lr_scheduler": "constant", "eval_every_n_steps": 0, "save_every_n_steps": 0, "compile": True,
                     # off unless the row asks: auto would turn it on where the plan's worst case does
                     # not fit (the 1.7b shape), and the row would not be what its label says
                     "gradient_checkpointing": False}}
    for name in variant_options(variant):
        for key, value in OPTIONS[name][1].items():
            section, field = key.split(".")
            cfg[section][field] = value
    return cfg


def tunelab_worker(model_dir: str, data: str, steps: int, method: str, variant: str) -> None:
    import tunelab
    from tunelab.hardware import peak_rss_mb
    from tunelab.runs import read_metrics

    # force: the memory check plans for 8 rows of max_seq_len tokens each; the alpaca rows are ~190,
    # so the 1.7b shape fits in practice where the plan's worst case does not (peak RSS is measured)
    result = tunelab.train(tunelab_config(model_dir, data, steps, method, variant), quiet=True, force=True)
    m = [r for r in read_metrics(result.run_dir) if "loss" in r]
    timed = m[1:]
    seconds = m[-1]["elapsed_s"] - m[0]["elapsed_s"]
    tokens = sum(r["tokens"] for r in timed)
    print(json.dumps({"peer": f"tunelab {method} {variant_label(variant)}", "tokens": tokens, "seconds": seconds,
                                     "tokens_per_s": tokens / seconds, "first_loss": m[0]["loss"],
                                     "last_loss": m[-1]["loss"], "peak_rss_mb": peak_rss_mb(),
                                     "mean_seq": tokens / (8 * len(timed)),
                                     "head_fraction": sum(r["target_tokens"] for r in timed) / tokens}))


def compute_peak() -> tuple[str, float]:
    """The dtype the runs compute in and its matmul peak here in GFLOP/s, which MFU is taken against:
    bf16 where the CPU is fast at it, else fp32 (an AVX2 CPU emulates bf16 matmuls at 1/50 of its
    fp32 rate or less, and trains in fp32)."""
    from tunelab.hardware import dtype_name, resolve_dtype
    from tunelab.planning.timing import matmul_peak_tflops

    compute = resolve_dtype("auto")
    return dtype_name(compute), matmul_peak_tflops(compute) * 1000


def bench_inputs(shared: Path, shape: str = "135m") -> tuple[Path, Path]:
    """The SmolLM2 folder of `shape` (see SHAPES) and the alpaca demo as JSONL, made once in bench/.cache."""
    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    model_dir = cache / "smollm2-135m-hf"
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, str(shared / "bench/make_smollm2_hf.py"), str(model_dir)], check=True)
    if shape != "135m":
        model_dir = random_model(model_dir, cache / f"smollm2-{shape}-random", SHAPES[shape])
    data = cache / "alpaca_en_demo.jsonl"
    if not data.exists():
        rows = json.loads((shared / "data/instruction/llamafactory_alpaca_en_demo.json").read_text())
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def random_model(source: Path, target: Path, dims: dict) -> Path:
    """`source`'s config and tokenizer with `dims` changed and random bf16 weights, written once."""
    if (target / "config.json").exists():
        return target
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, **dims), dtype=torch.bfloat16)
    partial = target.with_name(target.name + ".partial")  # a cut-off write never looks finished
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
    partial.rename(target)
    return target


def run(cmd: list[str], env=None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--only", default=None, help="tunelab: skip the peers")
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    p.add_argument("--shape", default="135m", choices=list(SHAPES),
                   help="SmolLM2's size; 360m and 1.7b have random weights (speed and memory only)")
    p.add_argument("--variant", action="append", type=variant_arg,
                   help=f"only these tunelab rows (repeatable; default: every row of --method): options of "
                        f"{', '.join(OPTIONS)}, joined by +")
    p.add_argument("--peer", action="append", choices=list(PEERS),
                   help="only these peers (repeatable; default: all). Without AVX512-BF16 or AMX the bf16 "
                        "peers run at a few tokens/s: time them with fewer --steps")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "DATA", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return tunelab_worker(*a.worker[:2], a.steps, a.method, a.worker[2])

    model_dir, data = bench_inputs(Path(a.shared), a.shape)

    compute, peak = compute_peak()
    results = []
    for variant in a.variant or variants(a.method):  # compiled first: the headline
        results.append(run([sys.executable, __file__, "--steps", str(a.steps), "--method", a.method,
                            "--worker", str(model_dir), str(data), variant]))
        results[-1].setdefault("peer", f"tunelab {a.method} {variant_label(variant)}")
    if not a.only:
        peer = str(Path(a.shared) / "bench/peer_hf_trainer.py") if a.method == "lora" else str(HERE / "peer_full_finetune.py")
        base = [sys.executable, peer, str(model_dir), str(data), "--steps", str(a.steps), "--batch", "8",
                "--max-len", "512"]
        for key, (name, extra) in PEERS.items():
            if a.peer and key not in a.peer:
                continue
            r = run(base + extra)
            r["peer"] = name
            results.append(r)

    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(model_dir)
    n_params, n_lora, n_head = model_counts(model_dir)
    print(f"\nmodel: {model_dir.name}, {n_params / 1e6:.1f}M parameters")
    print(f"{compute} matmul peak here: {peak:.0f} GFLOP/s (best n x n matmul, n 1024-3072); {a.steps} steps of 8 rows, first step untimed "
          "(it holds the one-time compile)\n")
    head = f"{'setup':48} {'tokens/s':>9} {'peak RSS MB':>12} {'loss step 1 -> N':>18} {'MFU':>6} {'tunelab is':>11}"
    print(head)
    print("-" * len(head))
    ours = results[0].get("tokens_per_s")
    for r in results:
        if "error" in r:
            print(f"{r['peer']:48} failed: {r['error'][:80]}")
            continue
        seq = r.get("mean_seq", 200)
        fpt = flops_per_token(a.method, n_params, n_lora, n_head, conf.num_hidden_layers, conf.hidden_size, seq,
                              r.get("head_fraction", 1.0))
        mfu = r["tokens_per_s"] * fpt / (peak * 1e9)
        ratio = "" if r["peer"].startswith("tunelab") or not ours else f"{ours / r['tokens_per_s']:.2f}x"
        print(f"{r['peer']:48} {r['tokens_per_s']:9.1f} {r['peak_rss_mb']:12.0f} "
              f"{r['first_loss']:8.3f} -> {r['last_loss']:6.3f} {mfu:6.1%} {ratio:>11}")
    print("\nThe peers train on every token (prompt included); tunelab by default on answer tokens only, so\n"
          "compare losses with the 'loss on every token' row. MFU counts 4N+6N_lora FLOPs/token for LoRA, 6N for full,\n"
          "the head's share only where it runs (tunelab: answer tokens), and causal attention.")
    print_targets(results)


def print_targets(results: list[dict]) -> None:
    """Each tunelab row against the issue's targets: 5x the documented recipe's tokens/s, 1.5x the
    best peer's, at most 1/4 of the documented recipe's peak RSS."""
    peers = [r for r in results if not r["peer"].startswith("tunelab") and "error" not in r]
    documented = next((r for r in peers if "documented" in r["peer"]), None)
    if documented is None:
        return
    best = max(r["tokens_per_s"] for r in peers)
    print("\nagainst the targets (5x the documented recipe, 1.5x the best peer, <= 25% of its peak RSS):")
    for r in results:
        if r["peer"].startswith("tunelab") and "error" not in r:
            print(f"  {r['peer']:46} {r['tokens_per_s'] / documented['tokens_per_s']:5.2f}x "
                  f"{r['tokens_per_s'] / best:5.2f}x {r['peak_rss_mb'] / documented['peak_rss_mb']:6.1%}")


if __name__ == "__main__":
    main()
