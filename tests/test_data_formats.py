"""Formats: conversion to exact messages, detection, column mapping, and every error message."""

import json
from pathlib import Path

import pytest

from tunelab.data.formats import (FORMAT_KEYS, FORMATS, apply_columns, detect_format, load_examples,
                                  register_format, to_example)
from tunelab.data.types import Example
from tunelab.errors import DataError

DATA = Path(__file__).parent / "assets" / "data"
W = "d.jsonl:7"


def U(content: str) -> dict:
    return {"role": "user", "content": content}


def A(content: str) -> dict:
    return {"role": "assistant", "content": content}


def S(content: str) -> dict:
    return {"role": "system", "content": content}


def error_of(row: dict, fmt: str, **kw) -> str:
    with pytest.raises(DataError) as e:
        to_example(row, fmt, W, **kw)
    msg = str(e.value)
    assert msg.startswith(W + ": ")
    return msg


# --- conversion of the real slices -------------------------------------------------------------

def test_alpaca_real_slice():
    raw = json.loads((DATA / "alpaca_en_demo.json").read_text())
    examples, fmt = load_examples(DATA / "alpaca_en_demo.json")
    assert fmt == "alpaca" and len(examples) == 12
    assert examples[0].messages == [U("Describe a process of making crepes."), A(raw[0]["output"])]
    with_input = raw[5]
    assert with_input["input"]  # record 6 has an input: it follows the instruction after a blank line
    assert examples[5].messages == [U(with_input["instruction"] + "\n\n" + with_input["input"]),
                                    A(with_input["output"])]
    assert examples[5].source.endswith("alpaca_en_demo.json:27")


def test_sharegpt_real_slice():
    examples, fmt = load_examples(DATA / "sharegpt_dummy_conversation.json")
    assert fmt == "sharegpt" and len(examples) == 6
    assert examples[0].messages == [
        U("Who are you?"),
        A("I am Vicuna, a language model trained by researchers from Large Model Systems Organization (LMSYS)."),
        U("Have a nice day!"), A("You too!")]
    assert [len(e.messages) for e in examples] == [4, 2, 6, 4, 2, 6]


def test_messages_real_slice_ignores_extra_key():
    raw = json.loads((DATA / "messages_kto_en_demo.json").read_text())
    assert set(raw[0]) == {"messages", "label"}
    examples, fmt = load_examples(DATA / "messages_kto_en_demo.json")
    assert fmt == "messages"
    assert [e.messages for e in examples] == [r["messages"] for r in raw]
    assert examples[1].messages[0]["content"].startswith("Compare and contrast the roles of the hippocampus")


def test_text_real_slice():
    examples, fmt = load_examples(DATA / "text_c4_demo.jsonl")
    assert fmt == "text" and len(examples) == 5
    assert examples[0].messages == [] and not examples[0].is_chat
    assert examples[0].text.startswith("Don’t think you need all the bells and whistles?")
    assert examples[4].source.endswith("text_c4_demo.jsonl:5")


# --- conversion details --------------------------------------------------------------------------

def test_alpaca_system_history_and_input():
    row = {"system": "Be brief.", "history": [["Hi", "Hello!"], ["2+2?", "4"]],
           "instruction": "Translate", "input": "chat", "output": "cat"}
    ex = to_example(row, "alpaca", W)
    assert ex.messages == [S("Be brief."), U("Hi"), A("Hello!"), U("2+2?"), A("4"), U("Translate\n\nchat"), A("cat")]
    assert ex.source == W


@pytest.mark.parametrize("extra, user", [({}, "Q"), ({"input": ""}, "Q"), ({"input": None}, "Q"),
                                         ({"input": "  "}, "Q"), ({"history": ""}, "Q")])
def test_alpaca_empty_optional_fields(extra, user):
    assert to_example({"instruction": "Q", "output": "A", **extra}, "alpaca", W).messages == [U(user), A("A")]


def test_alpaca_empty_instruction_keeps_just_the_input():
    assert to_example({"instruction": "", "input": "text", "output": "A"}, "alpaca", W).messages == [U("text"), A("A")]


def test_prompt_completion_strings_and_messages():
    assert to_example({"prompt": "P", "completion": "C"}, "prompt_completion", W).messages == [U("P"), A("C")]
    row = {"prompt": [S("sys"), U("P")], "completion": [A("C")]}
    assert to_example(row, "prompt_completion", W).messages == [S("sys"), U("P"), A("C")]
    row = {"prompt": [U("P")], "completion": "C"}
    assert to_example(row, "prompt_completion", W).messages == [U("P"), A("C")]


def test_messages_under_conversations_and_content_parts():
    row = {"conversations": [U("hi"), A("yo")]}
    assert to_example(row, "messages", W).messages == [U("hi"), A("yo")]
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": [{"type": "text", "value": "c"}], "loss_weight": 1.0}]}
    assert to_example(row, "messages", W).messages == [U("ab"), A("c")]


def test_sharegpt_system_and_role_aliases():
    row = {"system": "sys", "conversations": [{"from": "user", "value": "a"}, {"from": "model", "value": "b"},
                                              {"from": "human", "value": "c"}, {"from": "assistant", "value": "d"},
                                              {"from": "user", "value": "e"}, {"from": "chatgpt", "value": "f"}]}
    assert to_example(row, "sharegpt", W).messages == [S("sys"), U("a"), A("b"), U("c"), A("d"), U("e"), A("f")]
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                             {"from": "gpt", "value": "b"}]}
    assert to_example(row, "sharegpt", W).messages == [S("s"), U("a"), A("b")]


def test_system_prompt_added_only_when_missing():
    ex = to_example({"prompt": "P", "completion": "C"}, "prompt_completion", W, system_prompt="Be nice.")
    assert ex.messages == [S("Be nice."), U("P"), A("C")]
    ex = to_example({"messages": [S("own"), U("P"), A("C")]}, "messages", W, system_prompt="Be nice.")
    assert ex.messages == [S("own"), U("P"), A("C")]
    assert to_example({"text": "t"}, "text", W, system_prompt="Be nice.").messages == []


# --- detection -----------------------------------------------------------------------------------

@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "i", "output": "o", "id": 3}, "alpaca"),
    ({"prompt": "p", "completion": "c", "meta": {}}, "prompt_completion"),
    ({"messages": [U("a")], "label": True}, "messages"),
    ({"conversations": [{"from": "human", "value": "a"}], "id": "x"}, "sharegpt"),
    ({"text": "t", "url": "u"}, "text"),
    # the items decide between the chat formats, whatever the key
    ({"conversations": [U("a")]}, "messages"),
    ({"messages": [{"from": "human", "value": "a"}]}, "sharegpt"),
    # ambiguity order: chat, alpaca, prompt_completion, text
    ({"messages": [U("a")], "instruction": "i", "output": "o"}, "messages"),
    ({"instruction": "i", "output": "o", "prompt": "p", "completion": "c", "text": "t"}, "alpaca"),
    ({"prompt": "p", "completion": "c", "text": "t"}, "prompt_completion"),
])
def test_detect_format(row, fmt):
    assert detect_format(row, W) == fmt


def test_detect_format_no_match_names_keys_formats_and_fix():
    with pytest.raises(DataError) as e:
        detect_format({"instruction": "q", "response": "a"}, W)
    msg = str(e.value)
    assert msg.startswith(f"{W}: cannot tell the data format from the fields instruction, response")
    assert "alpaca would also need: output" in msg
    for name, keys in FORMAT_KEYS.items():
        assert f"{name} ({', '.join(keys)})" in msg
    assert "set data.format and, if your columns have other names, data.columns" in msg


def test_register_format_is_one_call(monkeypatch):
    def qa(row: dict, where: str) -> Example:
        return Example(messages=[U(row["q"]), A(row["a"])], source=where)

    monkeypatch.setitem(FORMATS, "qa", qa)
    monkeypatch.setitem(FORMAT_KEYS, "qa", ())
    register_format("qa", qa, ("q", "a"))
    assert detect_format({"q": "x", "a": "y"}, W) == "qa"
    assert to_example({"q": "x", "a": "y"}, "qa", W).messages == [U("x"), A("y")]


def test_detection_prefers_the_format_with_more_keys(monkeypatch):
    def labelled(row: dict, where: str) -> Example:
        return Example(text=row["text"] + row["label"], source=where)

    monkeypatch.setitem(FORMATS, "labelled", labelled)
    monkeypatch.setitem(FORMAT_KEYS, "labelled", ("text", "label"))
    assert detect_format({"text": "t", "label": "l"}, W) == "labelled"
    assert detect_format({"text": "t"}, W) == "text"


# --- columns -------------------------------------------------------------------------------------

def test_apply_columns_renames():
    row = {"question": "q", "answer": "a", "id": 1}
    assert apply_columns(row, {"instruction": "question", "output": "answer"}) == {"id": 1, "instruction": "q",
                                                                                   "output": "a"}
    assert apply_columns(row, None) is row and apply_columns(row, {}) is row


def test_apply_columns_rename_decides_detection():
    # an alpaca-named file mapped to prompt_completion must not still be detected as alpaca
    row = apply_columns({"instruction": "i", "output": "o"}, {"prompt": "instruction", "completion": "output"}, W)
    assert detect_format(row, W) == "prompt_completion"


def test_apply_columns_missing_column():
    with pytest.raises(DataError) as e:
        apply_columns({"question": "q", "answr": "a"}, {"output": "answer"}, W)
    msg = str(e.value)
    assert msg.startswith(f"{W}: data.columns maps 'output' to the column 'answer', but the row has no 'answer'")
    assert "(it has: question, answr)" in msg and "did you mean 'answr'?" in msg
    with pytest.raises(DataError) as e:  # {your column: format field}, the wrong way round
        apply_columns({"question": "q", "answer": "a"}, {"answer": "output"}, W)
    assert "it has 'answer': did you swap them? data.columns goes {format field: your column}" in str(e.value)
    with pytest.raises(DataError) as e:
        apply_columns({"a": 1}, {"output": "zzz"}, W)
    assert "fix data.columns.output" in str(e.value)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, fmt, field", [
    ({"instruction": "i"}, "alpaca", "output"),
    ({"output": "o", "input": "x"}, "alpaca", "instruction"),
    ({"prompt": "p"}, "prompt_completion", "completion"),
    ({"label": True}, "messages", "messages"),
    ({"id": 1}, "sharegpt", "conversations"),
    ({"content": "t"}, "text", "text"),
])
def test_missing_required_field(row, fmt, field):
    msg = error_of(row, fmt)
    assert f"missing field {field!r} (the row has: {', '.join(row)})" in msg
    assert "add it, or set data.format" in msg


def test_null_required_field():
    msg = error_of({"instruction": "i", "output": None}, "alpaca")
    assert "field 'output' is null" in msg and "fill it in or remove the row" in msg


@pytest.mark.parametrize("row, fmt, what", [
    ({"instruction": "i", "output": 5}, "alpaca", "field 'output' must be a string, got int 5"),
    ({"instruction": ["i"], "output": "o"}, "alpaca", "field 'instruction' must be a string, got list ['i']"),
    ({"instruction": "i", "output": "o", "history": [["q", 3]]}, "alpaca", "history[0][1] must be a string, got int"),
    ({"prompt": "p", "completion": {"x": 1}}, "prompt_completion", "field 'completion' must be a string, got dict"),
    ({"messages": [U("a"), {"role": "assistant", "content": None}]}, "messages",
     "messages[1].content must be a string, got NoneType None"),
    ({"conversations": [{"from": "human", "value": 1.5}, {"from": "gpt", "value": "b"}]}, "sharegpt",
     "conversations[0].value must be a string, got float 1.5"),
    ({"text": 7}, "text", "field 'text' must be a string, got int 7"),
])
def test_non_string_content(row, fmt, what):
    msg = error_of(row, fmt)
    assert what in msg and "convert it to text" in msg


def test_long_bad_values_are_abbreviated():
    msg = error_of({"instruction": "i", "output": list(range(1000))}, "alpaca")
    assert "..." in msg and len(msg) < 300


@pytest.mark.parametrize("row, fmt, label", [
    ({"instruction": "i", "output": ""}, "alpaca", "output"),
    ({"instruction": "i", "output": " \n\t"}, "alpaca", "output"),
    ({"prompt": "p", "completion": "  "}, "prompt_completion", "completion"),
    ({"messages": [U("a"), A("b"), U("c"), A("")]}, "messages", "messages[3]"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": " "}]}, "sharegpt",
     "conversations[1] (from 'gpt')"),
])
def test_empty_assistant_answer(row, fmt, label):
    msg = error_of(row, fmt)
    assert f"{label} is an empty assistant answer" in msg and "fill in the answer or remove the row" in msg


def test_empty_text():
    assert "field 'text' is empty; fill it in or remove the row" in error_of({"text": "   "}, "text")


def test_unknown_role_lists_allowed():
    msg = error_of({"messages": [{"role": "human", "content": "a"}, A("b")]}, "messages")
    assert "messages[0] has unknown role 'human'; use one of: system, user, assistant" in msg


@pytest.mark.parametrize("role", ["tool", "function"])
def test_tool_role_in_messages(role):
    msg = error_of({"messages": [U("a"), {"role": role, "content": "{}"}, A("b")]}, "messages")
    assert f"messages[1] has role {role!r}: tool-calling data is not supported yet; drop those rows" in msg


@pytest.mark.parametrize("who", ["function_call", "observation"])
def test_sharegpt_tool_roles(who):
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": who, "value": "{}"},
                             {"from": "gpt", "value": "b"}]}
    msg = error_of(row, "sharegpt")
    assert f"conversations[1] is from {who!r}: tool-calling data is not supported yet; drop those rows" in msg


def test_sharegpt_unknown_from_lists_allowed():
    msg = error_of({"conversations": [{"from": "bot", "value": "a"}]}, "sharegpt")
    assert "conversations[0] has unknown 'from' 'bot'; use one of: human, user, gpt, assistant, model" in msg


@pytest.mark.parametrize("messages, label, role, expected", [
    ([A("a"), U("b")], "messages[0]", "assistant", "user"),
    ([U("a"), U("b"), A("c")], "messages[1]", "user", "assistant"),
    ([S("s"), U("a"), S("again"), A("c")], "messages[2]", "system", "assistant"),
    ([U("a"), S("late"), A("c")], "messages[1]", "system", "assistant"),
    ([S("s"), A("a")], "messages[1]", "assistant", "user"),
])
def test_bad_role_order(messages, label, role, expected):
    msg = error_of({"messages": messages}, "messages")
    assert f"{label} is {role!r} but {expected!r} was expected there" in msg
    assert "an optional system message, then user and assistant alternating, starting with user" in msg


def test_bad_order_in_sharegpt_names_the_turn():
    row = {"system": "s", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}
    assert "conversations[0] (from 'gpt') is 'assistant' but 'user' was expected" in error_of(row, "sharegpt")


def test_must_end_with_assistant():
    msg = error_of({"messages": [U("a"), A("b"), U("c")]}, "messages")
    assert "the last message (messages[2]) is from the user" in msg and "add the answer or drop the last message" in msg
    msg = error_of({"messages": [S("only system")]}, "messages")
    assert "no user or assistant messages" in msg and "add a user message and an assistant answer" in msg


@pytest.mark.parametrize("row, fmt, what", [
    ({"messages": []}, "messages", "field 'messages' must be a non-empty list of {role, content} messages"),
    ({"messages": "hi"}, "messages", "field 'messages' must be a non-empty list"),
    ({"messages": [U("a"), "b"]}, "messages", "messages[1] must be an object with 'role' and 'content', got 'b'"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "conversations[0] must be an object with 'from' and 'value'"),
    ({"instruction": "i", "output": "o", "history": "q a"}, "alpaca",
     "field 'history' must be a list of [user, assistant] pairs, got str 'q a'"),
    ({"instruction": "i", "output": "o", "history": [["q"]]}, "alpaca",
     "history[0] must be a [user, assistant] pair, got ['q']"),
    ({"prompt": "p", "completion": [A("a"), A("b")]}, "prompt_completion", "field 'completion' holds 2 messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, A("b")]}, "messages",
     "messages[0].content[0] is"),
])
def test_bad_shapes(row, fmt, what):
    msg = error_of(row, fmt)
    assert what in msg and ";" in msg.split(what, 1)[1]  # a fix follows


def test_wrong_chat_format_suggests_the_other():
    msg = error_of({"messages": [{"from": "human", "value": "a"}]}, "messages")
    assert "this looks like ShareGPT {from, value}: set data.format: sharegpt" in msg
    msg = error_of({"conversations": [U("a")]}, "sharegpt")
    assert "this looks like OpenAI {role, content}: set data.format: messages" in msg


# --- load_examples ---------------------------------------------------------------------------------

def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_examples_detects_once_and_validates_every_row(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value).endswith(":2: missing field 'instruction' (the row has: prompt, completion); add it, or "
                                 "set data.format and, if your columns have other names, data.columns "
                                 "(e.g. {instruction: question, output: answer})")


def test_load_examples_explicit_format_and_columns(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    examples, fmt = load_examples(path, "prompt_completion", {"prompt": "question", "completion": "answer"},
                                  system_prompt="sys")
    assert fmt == "prompt_completion"
    assert [e.messages for e in examples] == [[S("sys"), U("q1"), A("a1")], [S("sys"), U("q2"), A("a2")]]
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "2"]
    examples, fmt = load_examples(path, columns={"instruction": "question", "output": "answer"})
    assert fmt == "alpaca" and examples[1].messages == [U("q2"), A("a2")]


def test_load_examples_unknown_format_suggests(tmp_path):
    with pytest.raises(DataError) as e:
        load_examples(tmp_path / "not-read-first.jsonl", "sharegtp")
    msg = str(e.value)
    assert msg.startswith("data.format: unknown format 'sharegtp'; did you mean 'sharegpt'?")
    assert "use one of: auto, alpaca, prompt_completion, messages, sharegpt, text" in msg


def test_load_examples_split_of_saved_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "tr"}]),
                 "test": Dataset.from_list([{"text": "te"}])}).save_to_disk(str(tmp_path / "dd"))
    examples, fmt = load_examples(tmp_path / "dd", split="test")
    assert fmt == "text" and [e.text for e in examples] == ["te"]
    assert load_examples(tmp_path / "dd")[0][0].text == "tr"


def test_load_examples_csv_empty_input_cell(tmp_path):
    (tmp_path / "d.csv").write_text('instruction,input,output\nQ,,A\n"Q2\nmore",ctx,\n')
    with pytest.raises(DataError) as e:
        load_examples(tmp_path / "d.csv")
    assert str(e.value).endswith("d.csv:3: output is an empty assistant answer; there is nothing to learn from "
                                 "it: fill in the answer or remove the row")
