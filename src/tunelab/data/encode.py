"""Examples -> token ids and labels, rendered with the model's own chat template.

The whole conversation is rendered once and tokenized once, so the ids equal
`tokenizer.apply_chat_template(messages, tokenize=True)` token for token. Which tokens are
trained is decided on characters: each assistant turn spans from the end of the prompt rendered
with `add_generation_prompt=True` to the end of the conversation rendered through that turn.
That span includes the end-of-turn token (the EOS for most chat models), so the tuned model
learns to stop. Labels use -100 for untrained positions (Hugging Face convention, unshifted).
"""

from dataclasses import dataclass

from tunelab.data.types import Example
from tunelab.errors import DataError, ModelError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str
    full_length: int = 0
    """Tokens before cutting to max_seq_len."""
    truncated: bool = False
    eos_appended: bool = False

    @property
    def n_targets(self) -> int:
        # a label at position 0 is never predicted (nothing comes before it)
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template (a base model?); set model.chat_template to a "
                         "named template such as chatml or alpaca (see `tunelab models`)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raise_exception(), e.g. "System role not supported"
        raise DataError(f"the chat template refused this conversation: {e}") from None


def assistant_spans(tokenizer, messages: list[dict], source: str = "?") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn within it."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ModelError(f"{source}: the chat template renders a conversation differently depending on "
                             "where it ends, so the answer tokens cannot be located; use a named template "
                             "(model.chat_template: chatml) or train_on_prompt: true")
        spans.append((len(prompt), len(upto)))
    return text, spans


def stop_token_ids(tokenizer, model_config=None) -> set[int]:
    """Token ids that end an answer: the tokenizer's eos plus the generation config's eos list."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(getattr(model_config, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids.update(eos if isinstance(eos, list) else [eos])
    return ids


def encode_example(ex: Example, tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> list[Encoded]:
    """Encode one example. Chat examples give one Encoded (cut at max_seq_len); raw text is split
    into max_seq_len chunks (continued pretraining wastes nothing)."""
    if not ex.is_chat:
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        chunks = [ids[i:i + max_seq_len] for i in range(0, len(ids), max_seq_len)]
        return [Encoded(c, list(c), ex.source, len(c)) for c in chunks if len(c) > 1]

    text, spans = assistant_spans(tokenizer, ex.messages, ex.source)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on_prompt:
        trained = [True] * len(ids)
    else:
        trained = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    eos_appended = False
    stops = stop_token_ids(tokenizer)
    a, b = spans[-1] if spans else (0, 0)
    last_answer = {t for t, (start, _) in zip(ids, offsets) if a <= start < b}
    if stops and spans and not last_answer & stops:
        # the template does not end answers with EOS (e.g. a named template on a base model):
        # append it so the tuned model learns to stop
        ids = ids + [tokenizer.eos_token_id]
        trained = trained + [True]
        eos_appended = True
    labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
    truncated = len(ids) > max_seq_len
    return [Encoded(ids[:max_seq_len], labels[:max_seq_len], ex.source, len(ids), truncated, eos_appended)]


@dataclass
class EncodeStats:
    examples: int = 0
    sequences: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    eos_appended: int = 0
    tokens: int = 0
    target_tokens: int = 0


def encode_all(examples: list[Example], tokenizer, max_seq_len: int, train_on_prompt: bool = False,
               progress: bool = False) -> tuple[list[Encoded], EncodeStats, list[int]]:
    """Encode many examples; drop (and count) those cut so short that no answer token is left.

    Returns (encoded, stats, full_lengths), full_lengths being the token counts before cutting.
    """
    out, stats, lengths = [], EncodeStats(), []
    items = examples
    if progress and len(examples) > 2000:
        from tqdm import tqdm

        items = tqdm(examples, desc="tokenizing", unit="ex")
    for ex in items:
        stats.examples += 1
        for e in encode_example(ex, tokenizer, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt):
            lengths.append(e.full_length)
            stats.truncated += e.truncated
            stats.eos_appended += e.eos_appended
            if e.n_targets == 0:
                stats.dropped_no_target += 1
                continue
            stats.sequences += 1
            stats.tokens += len(e.input_ids)
            stats.target_tokens += e.n_targets
            out.append(e)
    return out, stats, lengths
