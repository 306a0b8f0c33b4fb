"""The llama.cpp engine: chat with and generate from a .gguf through llama-cpp-python.

Same semantics as generation.py (the transformers engine): prompts go through the model's chat
template (here the GGUF's `tokenizer.chat_template`, rendered by llama-cpp-python's Jinja
formatter, which the export check proves equal to the training rendering), the rendered text is
tokenized without adding BOS (the template writes it if the model wants it), decoding stops at the
end-of-generation tokens llama.cpp knows, and sampling is greedy unless temperature > 0.

One difference: llama.cpp's repetition penalty looks at the last 64 tokens, transformers' at all.

    llm = load("model.gguf")
    generate(llm, ["What is the capital of France?"])
    for piece in stream_chat(llm, [{"role": "user", "content": "Hi"}]): print(piece, end="")
"""

import atexit
import threading
import weakref
from dataclasses import asdict
from pathlib import Path

from tunelab.errors import ModelError
from tunelab.generation import SamplingConfig, _as_messages


def load(path: "str | Path", n_ctx: int = 4096, n_threads: int | None = None, logits_all: bool = False,
         lora: "str | Path | None" = None, lora_scale: float = 1.0, verbose: bool = False):
    """Load a .gguf with llama.cpp (threads = physical cores; n_ctx tokens of context, 0 = the model's).

    `lora` applies a LoRA adapter GGUF (tunelab export --format gguf-adapter) on top.
    """
    from tunelab.exporters.gguf import require_llama_cpp
    from tunelab.hardware import physical_cores

    llama_cpp = require_llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path}: no such .gguf file")
    try:
        with _model_params(use_extra_bufts=not _cpu_reports_amx()):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or physical_cores(),
                                  logits_all=logits_all, lora_path=str(lora) if lora else None,
                                  lora_scale=lora_scale, verbose=verbose)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"model {path}: llama.cpp could not load it ({e}); is it a complete GGUF model "
                         "file (not an adapter) of an architecture this llama-cpp-python supports?") from None
    # free it before interpreter shutdown: llama-cpp-python's __del__ fails noisily once modules are gone
    atexit.register(_close, weakref.ref(llm))
    return llm


def _close(ref) -> None:
    llm = ref()
    if llm is not None:
        llm.close()


_PARAMS_LOCK = threading.Lock()


class _model_params:
    """Set llama_model_params fields that llama_cpp.Llama() has no argument for, while it is built."""

    def __init__(self, **fields):
        self.fields = fields

    def __enter__(self):
        import llama_cpp.llama_cpp as lib

        _PARAMS_LOCK.acquire()
        self.lib, self.orig = lib, lib.llama_model_default_params

        def patched():
            params = self.orig()
            for k, v in self.fields.items():
                setattr(params, k, v)
            return params

        lib.llama_model_default_params = patched

    def __exit__(self, *exc):
        self.lib.llama_model_default_params = self.orig
        _PARAMS_LOCK.release()


def _cpu_reports_amx() -> bool:
    """llama.cpp's AMX weight buffers crash (SIGSEGV) on CPUs that report AMX in a VM (AMD Zen 5 here,
    llama.cpp issues 20824, 28756); without those extra buffers the plain CPU kernels run fine."""
    from tunelab.hardware import cpu_flags

    return "amx_int8" in cpu_flags()


def tokenize(llm, text: str) -> list[int]:
    """Token ids as in training: special tokens parsed, no BOS added (the chat template has it)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def is_stop(llm, token: int) -> bool:
    """True if llama.cpp ends generation at this token (EOS, end-of-turn, ...)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))


def render_prompt(llm, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation rendered by the GGUF's own chat template (as llama-cpp-python does)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ModelError("this GGUF has no chat template (tokenizer.chat_template); export it with tunelab, "
                         "which carries the template, or use a prompt without chat formatting")
    tok_text = llm._model.token_get_text
    fmt = Jinja2ChatFormatter(template, eos_token=tok_text(llm.token_eos()),
                              bos_token=tok_text(llm.token_bos()) if llm.token_bos() >= 0 else "",
                              add_generation_prompt=add_generation_prompt)
    try:
        return fmt(messages=messages).prompt
    except Exception as e:  # jinja raise_exception(), e.g. "System role not supported"
        raise ModelError(f"the chat template refused this conversation: {e}") from None


def logits(llm, ids: list[int]):
    """Logits at every position of `ids` (numpy, len(ids) x vocab); needs load(..., logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)].copy()


def _completion_kwargs(s: SamplingConfig) -> dict:
    kw = {"max_tokens": s.max_new_tokens, "repeat_penalty": s.repetition_penalty, "seed": s.seed,
          "min_p": 0.0, "typical_p": 1.0, "stop": []}  # no samplers transformers does not have
    if s.temperature and s.temperature > 0:
        kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0)
    else:
        kw.update(temperature=0.0, top_p=1.0, top_k=1)  # llama.cpp's greedy sampler
    return kw


def generate(llm, prompts: list, sampling: SamplingConfig | None = None, system_prompt: str | None = None,
             **overrides) -> list[str]:
    """Answer each prompt (a string or a list of chat messages), one after the other. Returns the answers."""
    s = SamplingConfig(**{**asdict(sampling or SamplingConfig()), **overrides})
    answers = []
    for p in prompts:
        ids = tokenize(llm, render_prompt(llm, _as_messages(p, system_prompt)))
        out = llm.create_completion(ids, **_completion_kwargs(s))
        answers.append(out["choices"][0]["text"].strip())
    return answers


def stream_chat(llm, messages: list[dict], sampling: SamplingConfig | None = None):
    """Yield the answer to a conversation piece by piece as llama.cpp generates it."""
    s = sampling or SamplingConfig()
    ids = tokenize(llm, render_prompt(llm, messages))
    for chunk in llm.create_completion(ids, stream=True, **_completion_kwargs(s)):
        piece = chunk["choices"][0]["text"]
        if piece:
            yield piece


def generate_tokens(llm, ids: list[int], n: int) -> list[int]:
    """Exactly n greedy tokens after ids, ignoring stop tokens (for speed measurements)."""
    out = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, top_p=1.0, min_p=0.0, reset=True):
        out.append(tok)
        if len(out) >= n:
            break
    return out


def use_llamacpp(model_ref: str, engine: str = "auto") -> bool:
    """Which engine answers: `auto` picks llama.cpp for a .gguf path, transformers otherwise.

    (The alias smollm2-135m-instruct ships as a .gguf but stays on transformers under `auto`, as
    training and evaluation use it; pass engine="llamacpp" to chat with the shipped file.)
    """
    if engine not in ("auto", "transformers", "llamacpp"):
        raise ModelError(f"--engine {engine!r}: use auto, transformers or llamacpp")
    if engine == "auto":
        return str(model_ref).endswith(".gguf")
    return engine == "llamacpp"


def gguf_path(model_ref: str) -> Path:
    """The .gguf file of a reference, for the llama.cpp engine."""
    from tunelab.models.resolve import resolve_model

    source = resolve_model(model_ref)
    if source.kind == "gguf":
        return source.path / source.gguf_file
    raise ModelError(f"model {model_ref}: the llama.cpp engine runs .gguf files; export one first: "
                     f"tunelab export {model_ref} --format gguf --quant q8_0 --out model.gguf")
