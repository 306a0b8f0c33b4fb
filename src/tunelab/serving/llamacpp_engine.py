"""A llama.cpp engine: a .gguf model served through llama-cpp-python, one request at a time.

The model loads through tunelab.llamacpp (the loader chat and generate use). Prompts are rendered
with the model's Hugging Face tokenizer read from the same .gguf (the same chat template and token
ids as training and the transformers engine); llama.cpp only decodes.
llama.cpp keeps one sequence state per Llama object, so this engine runs one row at a time
(max_batch 1, n = 1); the batcher still queues, cancels and answers 503 as usual.
"""

import random
from pathlib import Path

from tunelab.errors import ModelError
from tunelab.generation import prompt_ids
from tunelab.serving.engines import Pick, Row, served_name


class LlamaCppEngine:
    supports_logprobs = False
    max_batch = 1
    max_n = 1

    def __init__(self, model_ref: str, name: str | None = None, n_ctx: int = 4096, n_threads: int | None = None):
        from tunelab import llamacpp
        from tunelab.data.encode import stop_token_ids

        path = llamacpp.gguf_path(model_ref)
        self.tok = _gguf_tokenizer(path)
        self.llm = llamacpp.load(path, n_ctx=n_ctx, n_threads=n_threads)  # with the CPU workarounds it needs
        self.name = name or served_name(model_ref)
        self.models = {self.name: None}
        self.context_length = self.llm.n_ctx()
        self.vocab_size = self.llm.n_vocab()
        self.stop_ids = stop_token_ids(self.tok) | {self.llm.token_eos()}

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.tok, messages)

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def open_batch(self) -> "LlamaBatch":
        return LlamaBatch(self)


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise ModelError(f"model {path}: could not read its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class LlamaBatch:
    """At most one row: llama.cpp's own generator decodes it token by token."""

    def __init__(self, engine: LlamaCppEngine):
        self.e = engine
        self.rows: list[Row] = []
        self._gen = None

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self) -> bool:
        return False

    def add(self, rows: list[Row]) -> None:
        if self.rows or len(rows) != 1:
            raise RuntimeError("the llama.cpp engine decodes one row at a time")
        r = rows[0]
        s = r.sampling
        self.e.llm.set_seed(s.seed if s.seed is not None else random.getrandbits(31))
        greedy = not s.temperature or s.temperature <= 0
        self._gen = self.e.llm.generate(r.prompt, temp=0.0 if greedy else s.temperature, top_p=s.top_p or 1.0,
                                        top_k=s.top_k if s.top_k else 0, repeat_penalty=s.repetition_penalty,
                                        reset=True)
        self.rows = [r]

    def sample(self) -> list[Pick]:
        return [Pick(int(next(self._gen)))]

    def keep(self, indices: list[int]) -> None:
        if not indices:
            if self._gen is not None:
                self._gen.close()
            self._gen, self.rows = None, []

    def advance(self, tokens: list[int]) -> None:
        pass  # llama.cpp's generator evaluates the sampled token when asked for the next one
