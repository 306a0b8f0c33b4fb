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
    pl.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    pl.add_argument("--device", default=None, help="judge for this named device first (default: this machine)")
    pl.add_argument("--devices", default=None, help="comma list of devices to compare (default: all; 'none')")
    pl.add_argument("--steps", type=int, default=None, help="optimizer steps, for the total time")
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

    e = sub.add_parser("export", help="export a run (merged Hugging Face folder)")
    e.add_argument("model")
    e.add_argument("--format", default="merged")
    e.add_argument("--out", default=None)
    e.add_argument("--dtype", default="fp32")

    sub.add_parser("models", help="list model aliases and named chat templates")
    return p


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
                              overrides=a.set)
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

        chat_loop(a.model, _sampling(a), dtype=a.dtype, system_prompt=a.system)
    elif a.command == "generate":
        out = tunelab.generate_file(a.model, a.prompts, a.out, _sampling(a), batch_size=a.batch_size, dtype=a.dtype,
                                    system_prompt=a.system)
        print(f"wrote {out}")
    elif a.command == "export":
        out = tunelab.export(a.model, format=a.format, out=a.out, dtype=a.dtype)
        print(f"wrote {out}")
    elif a.command == "models":
        from tunelab.models import ALIASES, named_templates

        for name, al in ALIASES.items():
            print(f"{name:26} {al.hub_id:40} {al.note}")
        print("named chat templates (model.chat_template): " + ", ".join(named_templates()))
    return None


if __name__ == "__main__":
    sys.exit(main())
