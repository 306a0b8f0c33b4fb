"""Peer baseline for full fine-tuning: ../shared/bench/peer_hf_trainer.py without the LoRA adapter.

The shared peer script is LoRA only; this is the same recipe (transformers.Trainer as documented:
truncate, pad each batch to its longest row, TrainingArguments defaults, so fp32 on a CPU; or
TRL's SFTTrainer with padding-free packing) training every weight, at tunelab's full fine-tuning
learning rate (2e-5). Prints one JSON line of figures, as the shared script does.

usage: python bench/peer_full_finetune.py MODEL_DIR DATA.jsonl [--steps N] [--batch B] [--max-len L] [--bf16] [--trl]
"""

import argparse
import json
import resource
import tempfile
import time

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainerCallback, TrainingArguments)

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("data")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--max-len", type=int, default=512)
p.add_argument("--bf16", action="store_true")
p.add_argument("--trl", action="store_true")
a = p.parse_args()
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a.model_dir)
tok.pad_token = tok.pad_token or tok.eos_token
model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
rows = [json.loads(line) for line in open(a.data) if line.strip()]


def to_messages(r):
    user = r["instruction"] + (("\n\n" + r["input"]) if r.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **k):
        if state.global_step == 1:
            self.t0 = time.perf_counter()


clock = Clock()
common = dict(output_dir=tempfile.mkdtemp(), max_steps=a.steps, per_device_train_batch_size=a.batch, bf16=a.bf16,
              report_to=[], logging_steps=1, save_strategy="no", learning_rate=2e-5, use_cpu=True)
if a.trl:
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_list([{"messages": to_messages(r)} for r in rows])
    cfg = SFTConfig(**common, max_length=a.max_len, packing=True, padding_free=True, assistant_only_loss=False,
                    completion_only_loss=None)
    tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
else:
    texts = [tok.apply_chat_template(to_messages(r), tokenize=False) for r in rows]
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"], truncation=True, max_length=a.max_len),
                                                 batched=True, remove_columns=["text"])
    tr = Trainer(model=model, args=TrainingArguments(**common), train_dataset=ds,
                 data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[clock])

seen = {"tok": 0}  # real (non-pad) tokens of the timed steps
original = tr.compute_loss


def counting(model, inputs, *x, **k):
    if tr.state.global_step >= 1:
        m = inputs.get("attention_mask")
        seen["tok"] += int(m.sum()) if m is not None else int(inputs["input_ids"].numel())
    return original(model, inputs, *x, **k)


tr.compute_loss = counting
tr.train()
elapsed = time.perf_counter() - clock.t0
losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
print(json.dumps({"peer": "trl" if a.trl else "hf-trainer", "bf16": a.bf16, "timed_steps": a.steps - 1,
                  "tokens": seen["tok"], "seconds": round(elapsed, 2), "tokens_per_s": round(seen["tok"] / elapsed, 1),
                  "first_loss": losses[0], "last_loss": losses[-1],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
