"""The check after every GGUF export: llama.cpp must behave like the transformers model it came from.

Peers ship GGUFs that talk gibberish or never stop because the chat template or the EOS token was
lost on the way. Before an export is renamed into place we check, with llama.cpp itself:

- chat template: the GGUF's `tokenizer.chat_template` is the tokenizer's, and rendered by
  llama-cpp-python's Jinja formatter it gives the training rendering; llama.cpp's tokenizer gives
  the training token ids for it;
- stop tokens: the GGUF's EOS is a tunelab stop token, and llama.cpp ends generation at each of them;
- weights, float types (f32/f16/bf16): the greedy continuation of several prompts is the same token
  for token as transformers' (llama.cpp reads transformers' greedy sequence in one pass and its
  argmax must match at every step, which is the same as generating it; steps where transformers'
  top two logits are closer than the rounding of the type are not counted as differences);
- weights, quantized types: top-1 agreement with transformers and the perplexity change on
  held-out text, against per-type thresholds (QUANT_THRESHOLDS).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import ModelError

# type -> (min top-1 agreement with transformers, max relative perplexity increase). Loose enough
# for small models, which lose more to quantization (SmolLM2-135M, 155 tokens of HELD_OUT_TEXT:
# q8_0 98.7% / +0.8%, q6_k 94.2% / -0.3%, q5_k_m 85.8% / +11.9%, q4_k_m 88.4% / +2.4%,
# q4_0 71.6% / +11.8%), tight enough to catch a broken file (wrong layout or template: agreement
# near 0, perplexity many times higher).
QUANT_THRESHOLDS = {
    "q8_0": (0.90, 0.05), "q6_k": (0.85, 0.10),
    "q5_k_m": (0.80, 0.20), "q5_k_s": (0.80, 0.20), "q5_0": (0.80, 0.20), "q5_1": (0.80, 0.20),
    "q4_k_m": (0.70, 0.30), "q4_k_s": (0.70, 0.30), "q4_0": (0.65, 0.35), "q4_1": (0.65, 0.35),
    "q3_k_l": (0.55, 0.60), "q3_k_m": (0.55, 0.60), "q3_k_s": (0.50, 0.80), "q2_k": (0.40, 1.50),
}
# a float export may pick another token only where transformers' top two logits are this close
TIE_MARGIN = {"f32": 1e-3, "f16": 2e-2, "bf16": 1.5e-1}

CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Is this review positive? 'Great food, friendly staff.'"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about rain."}],
]
RAW_PROMPTS = ["The capital of France is", "Once upon a time,"]
# held-out text for the quantized check (written for tunelab; any plain prose will do)
HELD_OUT_TEXT = (
    "The river town woke slowly. Fishermen pushed their boats into the grey water while the baker "
    "opened his shutters and set the first loaves on the sill to cool. By eight o'clock the market "
    "square was full: farmers sold apples, cheese and honey, children ran between the stalls, and an "
    "old man played the accordion by the fountain. In the afternoon a storm came in from the west. "
    "The wind turned the awnings inside out, rain drummed on the roofs, and everyone crowded into the "
    "cafe to wait. When the sky cleared, the streets shone, and the smell of wet stone and bread "
    "filled the air. Nobody remembered a storm that passed so quickly, and by evening the square was "
    "as busy as it had been in the morning."
)


class ParityError(ModelError):
    """An exported file does not behave like its source; the export is discarded."""


@dataclass
class ParityReport:
    quant: str
    checks: list = field(default_factory=list)  # (name, ok, detail)
    metrics: dict = field(default_factory=dict)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def summary(self) -> str:
        lines = [f"parity check ({self.quant}): {'passed' if self.ok else 'FAILED'}"]
        lines += [f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}" for name, ok, detail in self.checks]
        return "\n".join(lines)


def check_export(gguf_path: "str | Path", hf_folder: "str | Path", quant: str, eval_text: str | None = None,
                 conversations: list | None = None, max_new_tokens: int = 24,
                 lora: "str | Path | None" = None) -> ParityReport:
    """Compare a GGUF with the Hugging Face folder it was exported from; raise ParityError if it differs.

    With `lora` (an adapter GGUF), llama.cpp runs gguf_path + the adapter and hf_folder is the merged model.
    """
    from tunelab import llamacpp
    from tunelab.models import load_model

    model, tok = load_model(str(hf_folder), dtype="fp32", device="cpu")
    llm = llamacpp.load(gguf_path, n_ctx=1024, logits_all=True, lora=lora)
    try:
        report = ParityReport(quant + (" + LoRA adapter" if lora else ""))
        convs = conversations or CHECK_CONVERSATIONS
        prompts = _check_template(report, llm, tok, convs)
        _check_stops(report, llm, tok, model)
        if prompts is None and report.ok:  # no chat template (a base model): plain text prompts
            prompts = [tok(t, add_special_tokens=True)["input_ids"] for t in RAW_PROMPTS]
        if prompts is not None and quant in TIE_MARGIN:
            _check_greedy(report, llm, tok, model, prompts, TIE_MARGIN[quant], max_new_tokens)
        _check_heldout(report, llm, tok, model, quant, eval_text or HELD_OUT_TEXT)
    finally:
        llm.close()
    if not report.ok:
        raise ParityError(f"the GGUF export does not behave like the model it came from, so it was not "
                          f"written:\n{report.summary()}\nIf a quantized type fails, try a larger one "
                          "(q8_0, q6_k); check=False skips this check (not recommended)")
    return report


def _check_template(report, llm, tok, convs) -> list | None:
    """Returns the training token ids of each conversation's prompt (None if there is no template)."""
    from tunelab import llamacpp
    from tunelab.data.encode import render

    meta = llm.metadata.get("tokenizer.chat_template")
    ours = getattr(tok, "chat_template", None)
    if not ours:
        report.add("chat template", meta is None, "the model has no chat template" +
                   ("" if meta is None else ", but the GGUF has one"))
        return None
    if meta != ours:
        report.add("chat template", False, "tokenizer.chat_template in the GGUF is not the model's template "
                   f"({'missing' if meta is None else repr(meta[:60]) + '...'})")
        return None
    prompts = []
    for msgs in convs:
        want = render(tok, msgs, add_generation_prompt=True)
        got = llamacpp.render_prompt(llm, msgs, add_generation_prompt=True)
        if got != want:
            report.add("chat template", False, f"llama.cpp renders {got[:80]!r}... where training renders "
                       f"{want[:80]!r}...")
            return None
        ids = tok(want, add_special_tokens=False)["input_ids"]
        got_ids = llamacpp.tokenize(llm, got)
        if got_ids != ids:
            first = next((i for i, (a, b) in enumerate(zip(ids, got_ids)) if a != b), min(len(ids), len(got_ids)))
            report.add("tokenizer", False, f"llama.cpp tokenizes the prompt differently from token {first} on "
                       f"({got_ids[first:first + 5]} vs {ids[first:first + 5]})")
            return None
        prompts.append(ids)
    report.add("chat template", True, f"{len(convs)} conversations render and tokenize as in training")
    return prompts


def _check_stops(report, llm, tok, model) -> None:
    from tunelab import llamacpp
    from tunelab.data.encode import stop_token_ids

    stops = stop_token_ids(tok, model)
    eos = llm.token_eos()
    not_eog = [i for i in sorted(stops) if not llamacpp.is_stop(llm, i)]
    ok = eos in stops and not not_eog
    detail = (f"EOS {eos} ({tok.convert_ids_to_tokens(eos)!r}); llama.cpp stops at all of {sorted(stops)}" if ok else
              f"GGUF EOS is {eos}, tunelab stops at {sorted(stops)}; llama.cpp would not stop at {not_eog or [eos]}")
    report.add("stop tokens", ok, detail)


@torch.no_grad()
def _check_greedy(report, llm, tok, model, prompts, margin, max_new_tokens) -> None:
    from tunelab import llamacpp
    from tunelab.data.encode import stop_token_ids

    stops = sorted(stop_token_ids(tok, model))
    compared = ties = stopped = 0
    for ids in prompts:
        inp = torch.tensor([ids])
        seq = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)[0].tolist()
        ref_logits = model(torch.tensor([seq])).logits[0].float().numpy()
        cpp_logits = llamacpp.logits(llm, seq)
        stopped += seq[-1] in stops
        for pos in range(len(ids) - 1, len(seq) - 1):
            want = seq[pos + 1]
            got = int(cpp_logits[pos].argmax())
            compared += 1
            if got == want:
                continue
            top2 = np.sort(ref_logits[pos])[-2:]
            if top2[1] - top2[0] < margin:
                ties += 1
                continue
            text = tok.decode(seq[len(ids):pos + 1])
            report.add("greedy tokens", False, f"after {text!r} llama.cpp picks {tok.convert_ids_to_tokens(got)!r} "
                       f"where transformers picks {tok.convert_ids_to_tokens(want)!r} (prompt {prompts.index(ids)})")
            return
    report.metrics.update(greedy_tokens=compared, greedy_ties=ties)
    report.add("greedy tokens", True, f"{compared} greedy tokens of {len(prompts)} prompts equal transformers'"
               + (f" ({ties} near-ties)" if ties else "") + f"; {stopped} of {len(prompts)} answers ended at a stop token")


@torch.no_grad()
def _check_heldout(report, llm, tok, model, quant, text) -> None:
    from tunelab import llamacpp

    ids = tok(text, add_special_tokens=False)["input_ids"][: llm.n_ctx()]
    ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
    cpp = llamacpp.logits(llm, ids)
    cpp = cpp - _logsumexp(cpp)
    targets = np.array(ids[1:])
    rows = np.arange(len(targets))
    ppl_ref = math.exp(-ref[rows, targets].mean())
    ppl_cpp = math.exp(-cpp[rows, targets].mean())
    agree = float((ref[:-1].argmax(-1) == cpp[:-1].argmax(-1)).mean())
    change = ppl_cpp / ppl_ref - 1
    report.metrics.update(top1_agreement=agree, ppl_transformers=ppl_ref, ppl_gguf=ppl_cpp, ppl_change=change)
    detail = (f"{len(targets)} tokens: top-1 agreement {agree:.1%}, perplexity {ppl_ref:.3f} -> {ppl_cpp:.3f} "
              f"({change:+.2%})")
    if quant in QUANT_THRESHOLDS:
        min_agree, max_change = QUANT_THRESHOLDS[quant]
        ok = agree >= min_agree and change <= max_change
        report.add("held-out text", ok, detail + f" (needs >= {min_agree:.0%} and <= {max_change:+.0%})")
    else:  # float types: already checked token for token; perplexity must not move
        report.add("held-out text", abs(change) < 0.01, detail + " (needs within 1%)")


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
