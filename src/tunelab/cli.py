"""The `tunelab` command: each subcommand parses its arguments and calls one public API function."""

import argparse
import json
import sys


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--quantization", default=None, help="nf4 | fp4 | int8: load the weights quantized (bitsandbytes)")
    p.add_argument("--engine", default="auto", choices=["auto", "transformers", "llamacpp"],
                   help="auto: llama.cpp for a .gguf, transformers otherwise")
    p.add_argument("--lora", default=None, help="a LoRA adapter .gguf to apply (llama.cpp engine)")


def _sampling(a):
    from tunelab.generation import SamplingConfig

    return SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, repetition_penalty=a.repetition_penalty, seed=a.seed)


def _columns(items) -> dict:
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune an open LLM on your own machine.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="fine-tune the embedded SmolLM2 on a shipped dataset, base vs tuned")
    q.add_argument("--steps", type=int, default=60)
    q.add_argument("--output-dir", default="runs")

    t = sub.add_parser("train", help="fine-tune as a YAML config says")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=50")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the newest run of this config (or RUN_DIR) from its last checkpoint")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--force", action="store_true", help="train even if the plan predicts it does not fit in memory")

    from tunelab.planning.memory import STRATEGIES  # the plan's own list (a light import)

    pl = sub.add_parser("plan", help="will a run fit (memory by term), where, how long, and what to change")
    pl.add_argument("config", nargs="?", default=None, help="a run config (YAML) or a model's config.json")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pl.add_argument("--model", default=None, help="alias, folder, .gguf, hub id, config.json, or a size: 7b, 70b")
    pl.add_argument("--method", default=None, choices=["full", "lora", "qlora"])
    pl.add_argument("--max-seq-len", type=int, default=None)
    pl.add_argument("--micro-batch-size", type=int, default=None)
    pl.add_argument("--grad-accum-steps", type=int, default=None)
    pl.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    pl.add_argument("--lora-rank", type=int, default=None)
    pl.add_argument("--dtype", default=None, help="auto | bf16 | fp16 | fp32")
    pl.add_argument("--optimizer", default=None, choices=["adamw", "adamw_8bit"],
                    help="default: the config's train.optimizer (adamw)")
    pl.add_argument("--device", default=None, help="judge for this named device first (default: this machine)")
    pl.add_argument("--devices", default=None, help="comma list of devices to compare (default: all; 'none')")
    pl.add_argument("--steps", type=int, default=None, help="optimizer steps, for the total time")
    pl.add_argument("--data", action=argparse.BooleanOptionalAction, default=None,
                    help="read and encode the config's data: time and memory for its real batches (default where "
                         "data.train is a local file); --no-data: the worst case, every row max_seq_len long")
    pl.add_argument("--strategy", default="single", choices=STRATEGIES,
                    help="how `accelerate launch` splits the run over its processes (examples/accelerate/)")
    pl.add_argument("--world", type=int, default=1, help="the run's processes on all machines (fsdp, zero split over them)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="formats, token lengths, truncation, duplicates, one marked example")
    di.add_argument("file")
    di.add_argument("--model", default="smollm2-135m-instruct")
    di.add_argument("--format", default="auto")
    di.add_argument("--column", action="append", metavar="NAME=YOURS", help="e.g. output=answer")
    di.add_argument("--max-seq-len", type=int, default=1024)
    di.add_argument("--train-on-prompt", action="store_true")
    di.add_argument("--chat-template", default=None)
    di.add_argument("--json", action="store_true", help="print the report as JSON")

    c = sub.add_parser("chat", help="chat with a model or a run in the terminal")
    c.add_argument("model")
    _sampling_args(c)
    c.set_defaults(temperature=0.7, max_new_tokens=512)

    g = sub.add_parser("generate", help="answer a file of prompts (batched) into a JSONL file")
    g.add_argument("model")
    g.add_argument("--prompts", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--batch-size", type=int, default=8)
    _sampling_args(g)

    e = sub.add_parser("export", help="export a run: merged Hugging Face folder, GGUF, LoRA adapter GGUF, Ollama folder")
    e.add_argument("model")
    e.add_argument("--format", default="merged", help="merged | gguf | gguf-adapter | ollama")
    e.add_argument("--out", default=None)
    e.add_argument("--dtype", default="fp32")
    e.add_argument("--quant", default="q4_k_m", help="GGUF type (gguf, ollama): f16 bf16 q8_0 q6_k q5_k_m q4_k_m q4_0 ...")
    e.add_argument("--no-check", action="store_true", help="skip the llama.cpp parity check (not recommended)")

    qz = sub.add_parser("quantize", help="quantize a model (bitsandbytes int8/nf4/fp4 or GGUF) and compare types")
    qz.add_argument("model")
    qz.add_argument("--to", default=None, help="int8 | nf4 | fp4 | f16 | q8_0 | q4_k_m | ... (with --out: write it)")
    qz.add_argument("--out", default=None)
    qz.add_argument("--report", action="store_true", help="table: size, RAM, perplexity, tokens/s per type")
    qz.add_argument("--types", default=None, help="comma-separated types for --report (default: f32,bf16,int8,nf4,q8_0,q4_k_m)")
    qz.add_argument("--text", default=None, help="held-out text file for the perplexity column")

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a model, a run or a .gguf")
    s.add_argument("model")
    s.add_argument("--adapter", action="append", metavar="NAME=RUN_DIR",
                   help="serve a LoRA run on the same base under NAME (repeatable)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require this key (default: env TUNELAB_API_KEY, else none)")
    s.add_argument("--engine", default="auto", choices=["auto", "transformers", "llamacpp"])
    s.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together (1 = one at a time)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    s.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")

    sub.add_parser("models", help="list model aliases and named chat templates")
    _eval_parsers(sub)
    return p


def _eval_args(p: argparse.ArgumentParser, labels: bool = True) -> None:
    p.add_argument("--data", required=True, help="test file (any training format; the answer is the reference)")
    if labels:
        p.add_argument("--metrics", default=None, help="exact_match,f1,rouge_l,bleu (default: all)")
        p.add_argument("--labels", default=None, help="label task: the label set, e.g. none,against,favor")
    p.add_argument("--limit", type=int, default=None, help="the first N items only")
    p.add_argument("--out", default=None, help="output folder (default <run>/eval/<name> or evals/<name>)")
    p.add_argument("--batch-size", type=int, default=8)
    _sampling_args(p)
    p.set_defaults(max_new_tokens=None)


def _eval_parsers(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model on a test file: metrics, labels or a multiple-choice task")
    e.add_argument("model")
    e.add_argument("--task", default=None, help="multiple-choice task by log-likelihood (hellaswag, arc, mmlu, ...)")
    e.add_argument("--num-fewshot", type=int, default=None, help="default: the task's own (5 for mmlu, else 0)")
    _eval_args(e)
    c = sub.add_parser("compare", help="two models on the same items: paired bootstrap, McNemar, differences")
    c.add_argument("a")
    c.add_argument("b")
    _eval_args(c)
    j = sub.add_parser("judge", help="blind pairwise A/B judgments (you or a judge model); Elo, Bradley-Terry")
    j.add_argument("models", nargs="+", help="two or more models")
    j.add_argument("--judge", default=None, help="judge model (default: you, at the terminal)")
    j.add_argument("--judge-seed", type=int, default=0, help="seed of the random order")
    _eval_args(j, labels=False)
    cu = sub.add_parser("curve", help="learning curve: train on nested subsets, evaluate each")
    cu.add_argument("config")
    cu.add_argument("--fractions", default="0.1,0.25,0.5,1")
    cu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cu.add_argument("--metric", default=None, help="metric to plot (default accuracy / f1)")
    _eval_args(cu)


def _eval_sampling(a, labels=None):
    s = _sampling(a)
    if a.max_new_tokens is None:
        s.max_new_tokens = 32 if labels else 256
    return s


def _dispatch_eval(a) -> None:
    import tunelab

    common = {"limit": a.limit, "out": a.out, "batch_size": a.batch_size}
    if a.command == "eval":
        r = tunelab.evaluate(a.model, a.data, metrics=a.metrics, labels=a.labels, task=a.task,
                             num_fewshot=a.num_fewshot, sampling=_eval_sampling(a, a.labels), dtype=a.dtype,
                             system_prompt=a.system, **common)
        shown = {k: v for k, v in r.metrics["metrics"].items() if isinstance(v, (int, float))}
    elif a.command == "compare":
        r = tunelab.compare(a.a, a.b, a.data, metrics=a.metrics, labels=a.labels, sampling=_eval_sampling(a, a.labels),
                            dtype=a.dtype, system_prompt=a.system, **common)
        shown = {k: f"{v['a']:.4f} -> {v['b']:.4f} (p={v['paired_bootstrap']['p_value']})"
                 for k, v in r.summary["metrics"].items()}
    elif a.command == "judge":
        r = tunelab.judge(a.models, a.data, judge=a.judge, seed=a.judge_seed, sampling=_eval_sampling(a), dtype=a.dtype,
                          system_prompt=a.system, **common)
        shown = {m: f"Elo {v['rating']} {v['ci95']}" for m, v in r.ratings["elo"].items()}
    else:
        r = tunelab.learning_curve(a.config, a.data, [float(f) for f in a.fractions.split(",")], overrides=a.set,
                                   metrics=a.metrics, labels=a.labels, metric=a.metric,
                                   sampling=_eval_sampling(a, a.labels), **common)
        shown = {f"{p['examples']} examples": f"{r.metric} {p['value']:.4f}" for p in r.points}
    for k, v in shown.items():
        print(f"{k:24} {v}")
    print(f"wrote {r.out_dir}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tunelab.errors import TunelabError
    from tunelab.log import console

    try:
        return _dispatch(args) or 0
    except TunelabError as e:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def _dispatch(a) -> int | None:
    import tunelab

    if a.command == "quickstart":
        tunelab.quickstart(output_dir=a.output_dir, max_steps=a.steps)
    elif a.command == "train":
        result = tunelab.train(a.config, a.set, resume=a.resume, quiet=a.quiet, force=a.force)
        return 130 if result.interrupted else 0
    elif a.command == "plan":
        devices = None if a.devices is None else [d for d in a.devices.split(",") if d and d != "none"]
        result = tunelab.plan(a.config, model=a.model, method=a.method, max_seq_len=a.max_seq_len,
                              micro_batch_size=a.micro_batch_size, grad_accum_steps=a.grad_accum_steps,
                              gradient_checkpointing=a.gradient_checkpointing, lora_rank=a.lora_rank, dtype=a.dtype,
                              optimizer=a.optimizer, device=a.device, devices=devices, steps=a.steps,
                              overrides=a.set, data=a.data, strategy=a.strategy, world=a.world)
        print(json.dumps(result.to_dict(), indent=2) if a.json else result)
        return 0 if result.fits_here else 1
    elif a.command == "data":
        report = tunelab.inspect_data(a.file, model=a.model, format=a.format, columns=_columns(a.column),
                                      max_seq_len=a.max_seq_len, train_on_prompt=a.train_on_prompt,
                                      chat_template=a.chat_template)
        if a.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            from tunelab.data.inspect import print_inspection

            print_inspection(report)
    elif a.command == "chat":
        from tunelab.chat import chat_loop

        chat_loop(a.model, _sampling(a), dtype=a.dtype, system_prompt=a.system, engine=a.engine, lora=a.lora,
                  quantization=a.quantization)
    elif a.command == "generate":
        out = tunelab.generate_file(a.model, a.prompts, a.out, _sampling(a), batch_size=a.batch_size, dtype=a.dtype,
                                    system_prompt=a.system, engine=a.engine, lora=a.lora,
                                    quantization=a.quantization)
        print(f"wrote {out}")
    elif a.command == "export":
        out = tunelab.export(a.model, format=a.format, out=a.out, dtype=a.dtype, quant=a.quant, check=not a.no_check)
        print(f"wrote {out}")
        if a.format == "ollama":
            from tunelab.exporters.ollama import ollama_command

            print(f"register it with Ollama:\n  {ollama_command(out)}")
    elif a.command in ("eval", "compare", "judge", "curve"):
        _dispatch_eval(a)
    elif a.command == "quantize":
        from tunelab.quantization import quantize

        quantize(a.model, to=a.to, out=a.out, report=a.report, types=a.types.split(",") if a.types else None,
                 text_file=a.text)
    elif a.command == "serve":
        import os

        from tunelab.errors import ConfigError

        adapters = {}
        for item in a.adapter or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--adapter {item!r}: write NAME=RUN_DIR, e.g. --adapter stance=runs/stance")
            adapters[name] = path
        tunelab.serve(a.model, adapters or None, host=a.host, port=a.port,
                      api_key=a.api_key or os.environ.get("TUNELAB_API_KEY") or None, engine=a.engine,
                      dtype=a.dtype, max_batch=a.max_batch, max_queue=a.max_queue, max_tokens=a.max_tokens)
    elif a.command == "models":
        from tunelab.models import ALIASES, named_templates

        for name, al in ALIASES.items():
            print(f"{name:26} {al.hub_id:40} {al.note}")
        print("named chat templates (model.chat_template): " + ", ".join(named_templates()))
    return None


if __name__ == "__main__":
    sys.exit(main())
