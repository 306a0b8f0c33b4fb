"""Engines: one loaded model that the batcher drives a decoding step at a time.

An engine turns prompts into token ids (with the model's own chat template, as training does)
and opens a *batch*: rows can join (prefill), each step samples one token per row, finished or
cancelled rows leave. TransformersEngine keeps the base model and every LoRA adapter in memory
once (peft multi-adapter); each row names its adapter and peft applies the right one per row
within one forward pass (`adapter_names`), so a batch can mix adapters and nothing reloads.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import ModelError
from tunelab.generation import SamplingConfig, prompt_ids

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass
class Row:
    """One sequence being generated (one choice of one request)."""

    prompt: list[int]
    sampling: SamplingConfig
    adapter: str | None = None
    top_logprobs: int = -1
    """-1: no logprobs; 0..20: the chosen token's logprob plus this many alternatives."""
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@dataclass
class Pick:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def served_name(model_ref: str) -> str:
    """The `model` name clients use for the main model: the alias, or the folder/file name."""
    p = Path(model_ref)
    name = p.stem if p.suffix == ".gguf" else p.name
    if name in ("final", "") or name.startswith("checkpoint"):
        name = p.resolve().parent.name if name else p.resolve().name
    return name or str(model_ref)


def adapter_dir(path: "str | Path") -> Path:
    """A LoRA adapter folder from a run directory, its final/ or a checkpoint folder."""
    from tunelab.models.load import run_model_dir

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"adapter {path}: no such folder; give a run directory (runs/<name>) or an adapter folder")
    d = run_model_dir(p)
    if not (d / "adapter_config.json").is_file():
        raise ModelError(f"adapter {path}: no adapter_config.json in {d}; --adapter takes LoRA runs "
                         "(a full fine-tuning run is a whole model: serve it on its own)")
    return d


class TransformersEngine:
    """A transformers model (optionally with LoRA adapters) decoded in dynamic batches."""

    supports_logprobs = True
    max_batch = None  # no engine-side limit

    def __init__(self, model_ref: str, adapters: dict[str, str] | None = None, dtype: str = "auto",
                 name: str | None = None):
        from tunelab.data.encode import stop_token_ids
        from tunelab.models import load_model

        model, tok = load_model(model_ref, dtype=dtype)
        self.name = name or served_name(model_ref)
        # served name -> peft adapter name (None: the model as load_model gave it)
        self.models: dict[str, str | None] = {self.name: None}
        if adapters:
            model = self._load_adapters(model, adapters)
        self.model, self.tok = model, tok
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tok, model)
        cfg = getattr(model, "config", None) or model.get_base_model().config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def _load_adapters(self, model, adapters: dict[str, str]):
        from peft import PeftModel

        is_peft = isinstance(model, PeftModel)
        if is_peft:  # a LoRA run: its own adapter is "default"; the main name keeps using it
            self.models[self.name] = "default"
        for i, (name, path) in enumerate(adapters.items()):
            if name in self.models:
                raise ModelError(f"adapter name {name!r} is used twice (or is the main model's name); "
                                 "give each --adapter a distinct name")
            folder = adapter_dir(path)
            try:
                if not is_peft and i == 0:
                    model = PeftModel.from_pretrained(model, folder, adapter_name=name)
                else:
                    model.load_adapter(folder, adapter_name=name)
            except Exception as e:  # shape mismatch: an adapter trained on another base model
                raise ModelError(f"adapter {name}={path}: could not attach it to this base model "
                                 f"({type(e).__name__}: {str(e)[:200]}); was it trained on this base?") from None
            self.models[name] = name
        if not is_peft:
            self.models[self.name] = BASE
        model.eval()
        return model

    # prompts --------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.tok, messages)

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def open_batch(self) -> "TorchBatch":
        return TorchBatch(self)


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class TorchBatch:
    """Left-padded rows sharing one KV cache. Rows may join between steps (continuous batching)."""

    def __init__(self, engine: TransformersEngine):
        self.e = engine
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None  # (B, T) 1 = real token, 0 = left padding
        self.pos = None  # (B,) position of the next token per row
        self.logits = None  # (B, V) next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    def _adapter_kw(self, rows: list[Row]) -> dict:
        if all(r.adapter is None for r in rows):
            return {}
        return {"adapter_names": [r.adapter or BASE for r in rows]}

    @torch.no_grad()
    def add(self, rows: list[Row]) -> None:
        """Prefill new rows (one padded forward) and merge them into the running batch."""
        for r in rows:
            seed = r.sampling.seed if r.sampling.seed is not None else random.getrandbits(63)
            r.generator = torch.Generator().manual_seed(seed)
        width = max(len(r.prompt) for r in rows)
        dev, pad = self.e.device, self.e.pad_id
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.e.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **self._adapter_kw(rows))
        logits = out.logits[:, -1].float()
        pos = mask.sum(-1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.pos, self.logits = list(rows), out.cache, mask, pos, logits
            return
        t = max(self.mask.shape[1], width)
        for old, new in zip(self.cache.layers, out.cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, t, 2), _left_pad(new.keys, t, 2)])
            old.values = torch.cat([_left_pad(old.values, t, 2), _left_pad(new.values, t, 2)])
        self.mask = torch.cat([_left_pad(self.mask, t, 1), _left_pad(mask, t, 1)])
        self.pos = torch.cat([self.pos, pos])
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows

    def can_join(self) -> bool:
        """Merging caches needs plain full-attention layers (no sliding windows, no quantized cache)."""
        from transformers.cache_utils import DynamicLayer

        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def sample(self) -> list[Pick]:
        """One next token per row from the current logits (greedy when temperature is 0)."""
        picks = []
        want_lp = any(r.top_logprobs >= 0 for r in self.rows)
        logps = torch.log_softmax(self.logits, -1) if want_lp else None
        for i, r in enumerate(self.rows):
            tok = sample_token(self.logits[i], r.sampling, r.generator, r.prompt + r.generated)
            pick = Pick(tok)
            if r.top_logprobs >= 0:
                pick.logprob = float(logps[i, tok])
                if r.top_logprobs:
                    v, ix = logps[i].topk(r.top_logprobs)
                    pick.top = list(zip(ix.tolist(), v.tolist()))
            picks.append(pick)
        return picks

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; drop the left padding no remaining row needs."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            self.cache = self.mask = self.pos = self.logits = None
            return
        ix = torch.tensor(indices, device=self.e.device)
        self.mask, self.pos, self.logits = self.mask[ix], self.pos[ix], self.logits[ix]
        lead = int((self.mask.cumsum(-1) == 0).sum(-1).min())
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[ix, :, lead:], layer.values[ix, :, lead:]
        self.mask = self.mask[:, lead:]

    @torch.no_grad()
    def advance(self, tokens: list[int]) -> None:
        """Feed each row its new token (one forward for the whole batch)."""
        ids = torch.tensor(tokens, device=self.e.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        out = self.e.model(input_ids=ids, attention_mask=self.mask, position_ids=self.pos[:, None],
                           cache=self.cache, use_cache=True, **self._adapter_kw(self.rows))
        self.cache, self.logits = out.cache, out.logits[:, -1].float()
        self.pos = self.pos + 1


def sample_token(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None,
                 seen: list[int] | None = None) -> int:
    """generation.SamplingConfig semantics for one row: greedy at temperature 0, else
    temperature, top-k and top-p (nucleus) sampling; repetition_penalty as in transformers."""
    if s.repetition_penalty and s.repetition_penalty != 1.0 and seen:
        logits = logits.clone()
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if not s.temperature or s.temperature <= 0:
        return int(logits.argmax())
    scores = logits / s.temperature
    if s.top_k and s.top_k > 0:
        kth = scores.topk(min(s.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
        scores = scores.index_fill(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
