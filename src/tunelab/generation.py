"""Answers from a model: batched generation for files, streaming for chat.

Prompts go through the model's chat template (the same rendering as training), decoding stops
at the EOS / end-of-turn tokens, and sampling is greedy unless temperature > 0.
"""

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunelab.data.encode import render, stop_token_ids
from tunelab.errors import DataError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy (deterministic); 0.7 is a common choice for varied answers."""
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


def _as_messages(prompt, system_prompt: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def prompt_ids(tokenizer, prompt, system_prompt: str | None = None) -> list[int]:
    """A prompt (string or chat messages) rendered with the chat template, as token ids."""
    text = render(tokenizer, _as_messages(prompt, system_prompt), add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _generate_kwargs(tokenizer, model, s: SamplingConfig) -> dict:
    kw = {"max_new_tokens": s.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
          "eos_token_id": sorted(stop_token_ids(tokenizer, model)) or None,
          "repetition_penalty": s.repetition_penalty}
    if s.temperature and s.temperature > 0:
        kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


@torch.no_grad()
def generate(model, tokenizer, prompts: list, sampling: SamplingConfig | None = None, batch_size: int = 8,
             system_prompt: str | None = None, progress: bool = False, synced: bool = False,
             **overrides) -> list[str]:
    """Answer each prompt (a string or a list of chat messages). Returns the answers, in order.

    Keyword overrides (max_new_tokens=..., temperature=...) update `sampling`. synced: every process
    of a sharded model (FSDP, ZeRO-3) calls this with as many prompts, and each keeps running
    forwards until all are done (each forward gathers weights from all of them).
    """
    s = SamplingConfig(**{**asdict(sampling or SamplingConfig()), **overrides})
    if s.seed is not None:
        torch.manual_seed(s.seed)
    encoded = [prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch well
    answers: list[str | None] = [None] * len(encoded)
    dev = next(model.parameters()).device
    kw = {**_generate_kwargs(tokenizer, model, s), "synced_gpus": synced}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for idx in batches:
        width = max(len(encoded[i]) for i in idx)
        # left padding: every prompt ends where generation starts
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=dev)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=dev)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


def stream_chat(model, tokenizer, messages: list[dict], sampling: SamplingConfig | None = None):
    """Yield the answer to a conversation piece by piece as it is generated."""
    from transformers import TextIteratorStreamer

    s = sampling or SamplingConfig()
    if s.seed is not None:
        torch.manual_seed(s.seed)
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=dev)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kw = {**_generate_kwargs(tokenizer, model, s), "streamer": streamer}
    worker = threading.Thread(target=lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw))
    worker.start()
    yield from streamer
    worker.join()


def read_prompts(path: "str | Path") -> list[dict]:
    """Rows of a prompts file -> [{"messages": [...], "reference": str | None, "source": "file:line"}].

    Accepts {"prompt": "..."}, {"messages": [...]} (a final assistant message becomes the
    reference), or any training format (alpaca, sharegpt, ...; the answer becomes the reference).
    """
    from tunelab.data.formats import detect_format, to_example
    from tunelab.data.read import read_records

    out = []
    for row, where in read_records(path):
        if isinstance(row.get("prompt"), str) and "completion" not in row:
            out.append({"messages": [{"role": "user", "content": row["prompt"]}], "reference": None, "source": where})
            continue
        if isinstance(row.get("messages"), list) and row["messages"] and row["messages"][-1].get("role") == "user":
            out.append({"messages": row["messages"], "reference": None, "source": where})
            continue
        ex = to_example(row, detect_format(row, where), where)
        if not ex.is_chat:
            raise DataError(f"{where}: a raw text row has no prompt; give {{\"prompt\": ...}} or messages")
        out.append({"messages": ex.messages[:-1], "reference": ex.messages[-1]["content"], "source": where})
    return out


def generate_file(model_ref: str, prompts_path: "str | Path", out_path: "str | Path",
                  sampling: SamplingConfig | None = None, batch_size: int = 8, dtype: str = "auto",
                  system_prompt: str | None = None, engine: str = "auto", lora: str | None = None,
                  quantization: str | None = None) -> Path:
    """Answer every prompt of a JSONL/JSON/CSV file; write one JSON line per prompt (atomically).

    engine: auto (llama.cpp for a .gguf, else transformers) | transformers | llamacpp;
    quantization: nf4 | fp4 | int8 loads the weights quantized (transformers engine, bitsandbytes).
    """
    from tunelab import llamacpp
    from tunelab.models import load_model
    from tunelab.runs import atomic_write_text

    rows = read_prompts(prompts_path)
    if llamacpp.use_llamacpp(model_ref, engine) or lora:
        llm = llamacpp.load(llamacpp.gguf_path(model_ref), lora=lora)
        answers = llamacpp.generate(llm, [r["messages"] for r in rows], sampling, system_prompt)
        llm.close()
    else:
        model, tok = load_model(model_ref, dtype=dtype, quantization=quantization)
        answers = generate(model, tok, [r["messages"] for r in rows], sampling, batch_size, system_prompt,
                           progress=True)
    lines = []
    for r, a in zip(rows, answers):
        rec = {"source": r["source"], "prompt": r["messages"][-1]["content"], "answer": a}
        if r["reference"] is not None:
            rec["reference"] = r["reference"]
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write_text(out_path, "".join(lines))
    return Path(out_path)
