"""Chat-template rendering, answer masks, EOS, truncation: the heart of supervised fine-tuning."""

import pytest

from tunelab.data.encode import IGNORE, encode_all, encode_example
from tunelab.data.types import Example
from tunelab.errors import ModelError
from tunelab.models import load_tokenizer
from tests.conftest import TOKENIZER_DIR

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Ünïcödé — 日本語 ✓"}, {"role": "assistant", "content": "  spaces and\nnewlines  "}],
]


def trained_text(e, tok) -> str:
    return tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE])


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ids_equal_apply_chat_template(tokenizer, messages):
    (e,) = encode_example(Example(messages=messages), tokenizer, max_seq_len=4096)
    expected = tokenizer.apply_chat_template(messages, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert e.input_ids == list(expected)


def test_only_answers_and_their_end_of_turn_are_trained(tokenizer):
    (e,) = encode_example(Example(messages=CONVERSATIONS[1]), tokenizer, max_seq_len=4096)
    assert trained_text(e, tokenizer) == "4<|im_end|>\n6, of course.<|im_end|>\n"
    # the EOS (<|im_end|>) that closes the last answer is learned, so the tuned model stops
    eos_positions = [i for i, t in enumerate(e.input_ids) if t == tokenizer.eos_token_id]
    assert e.labels[eos_positions[-1]] == tokenizer.eos_token_id
    # the prompt's <|im_end|> tokens are not trained even though pad == eos for this tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert e.labels[eos_positions[0]] == IGNORE


def test_train_on_prompt_trains_everything(tokenizer):
    (e,) = encode_example(Example(messages=CONVERSATIONS[0]), tokenizer, 4096, train_on_prompt=True)
    assert e.labels == e.input_ids


def test_truncation_is_counted_and_answerless_examples_dropped(tokenizer):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "short"}]
    ok = CONVERSATIONS[0]
    encoded, stats, lengths = encode_all([Example(messages=long), Example(messages=ok)], tokenizer, max_seq_len=64)
    assert stats.truncated == 1 and stats.dropped_no_target == 1
    assert len(encoded) == 1 and max(lengths) > 64
    (cut,) = encode_example(Example(messages=[{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "word " * 200}]), tokenizer, 64)
    assert len(cut.input_ids) == 64 and cut.truncated and cut.n_targets > 0


def test_named_template_on_a_base_model_appends_eos(tmp_path):
    tok = load_tokenizer(TOKENIZER_DIR, chat_template="alpaca")
    (e,) = encode_example(Example(messages=CONVERSATIONS[0]), tok, 4096)
    text = tok.decode(e.input_ids)
    assert "### Instruction:\nHi there" in text and "### Response:\nHello!" in text
    # the alpaca template writes eos_token itself
    assert trained_text(e, tok).startswith("Hello!<|im_end|>")
    # a template that never writes EOS gets it appended (and trained)
    tpl = tmp_path / "plain.jinja"
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")
    tok2 = load_tokenizer(TOKENIZER_DIR, chat_template=str(tpl))
    (e2,) = encode_example(Example(messages=CONVERSATIONS[0]), tok2, 4096)
    assert e2.eos_appended and e2.input_ids[-1] == tok2.eos_token_id and e2.labels[-1] == tok2.eos_token_id


def test_missing_chat_template_is_a_clear_error():
    tok = load_tokenizer(TOKENIZER_DIR)
    tok.chat_template = None
    with pytest.raises(ModelError, match="model.chat_template"):
        encode_example(Example(messages=CONVERSATIONS[0]), tok, 128)


def test_unknown_named_template():
    with pytest.raises(ModelError, match="named templates: .*chatml"):
        load_tokenizer(TOKENIZER_DIR, chat_template="chatmll")


def test_raw_text_is_chunked_not_cut(tokenizer):
    encoded = encode_example(Example(text="word " * 300), tokenizer, max_seq_len=100)
    assert len(encoded) >= 3 and all(len(e.input_ids) <= 100 for e in encoded)
    assert sum(len(e.input_ids) for e in encoded) >= 300
    assert encoded[-1].input_ids[-1] == tokenizer.eos_token_id
