"""Data formats -> Examples. Each converter validates its row and names file:line, field and fix.

alpaca             instruction, input?, output, system?, history?  (LLaMA-Factory's alpaca)
prompt_completion  prompt, completion                              (TRL's prompt-completion)
messages           messages: [{role, content}]                     (OpenAI chat)
sharegpt           conversations: [{from, value}], system?         (ShareGPT / FastChat)
text               text                                            (raw text, continued pretraining)
A new format is one `register_format(name, converter, required_keys)` call.
"""

import difflib
from collections.abc import Callable
from pathlib import Path

from tunelab.data.read import read_records
from tunelab.data.types import ROLES, Example
from tunelab.errors import DataError

FORMATS: dict[str, Callable[[dict, str], Example]] = {}
REQUIRED: dict[str, tuple[str, ...]] = {}
FIX = "set data.format and, if your columns have other names, data.columns (e.g. {instruction: question, output: answer})"


def register_format(name: str, converter: Callable[[dict, str], Example], required: tuple[str, ...]) -> None:
    FORMATS[name] = converter
    REQUIRED[name] = required


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r} (the row has: {', '.join(map(str, row)) or 'nothing'}); "
                            f"add it, or {FIX}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__} "
                        f"({str(value)[:40]!r}); convert it to text")
    return value


def _alpaca(row: dict, where: str) -> Example:
    instruction = _text(row, "instruction", where)
    extra = _text(row, "input", where, required=False)
    messages = []
    system = _text(row, "system", where, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise DataError(f"{where}: field 'history' must be a list of [user, assistant] pairs")
    for i, (q, a) in enumerate(history):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]
    return _checked(messages, where)


def _prompt_completion(row: dict, where: str) -> Example:
    prompt, completion = row.get("prompt"), row.get("completion")
    for key in ("prompt", "completion"):
        if key not in row:
            _text(row, key, where)
    if isinstance(prompt, list):
        messages = [_message(m, where, i) for i, m in enumerate(prompt)]
    else:
        messages = [{"role": "user", "content": _text(row, "prompt", where)}]
    if isinstance(completion, list):
        if len(completion) != 1:
            raise DataError(f"{where}: field 'completion' as a list must hold exactly one assistant message")
        messages.append(_message(completion[0], where, len(messages)))
    else:
        messages.append({"role": "assistant", "content": _text(row, "completion", where)})
    return _checked(messages, where)


def _message(m, where: str, i: int) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {str(m)[:60]!r}")
    content = m["content"]
    if isinstance(content, list):  # typed content parts: keep the text ones
        if not all(isinstance(p, dict) for p in content):
            raise DataError(f"{where}: message {i} content parts must be objects with 'type' and 'text'")
        content = "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {i} 'content' must be a string, got {type(content).__name__}")
    return {"role": m["role"], "content": content}


def _messages(row: dict, where: str) -> Example:
    key = "messages" if "messages" in row else "conversations"
    items = row.get(key)
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{role, content}} messages")
    return _checked([_message(m, where, i) for i, m in enumerate(items)], where)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}


def _sharegpt(row: dict, where: str) -> Example:
    items = row.get("conversations")
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    messages = []
    system = _text(row, "system", where, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(items):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {i} must be an object with 'from' and 'value', got {str(turn)[:60]!r}")
        who = turn["from"]
        if who in ("function_call", "observation", "tool"):
            raise DataError(f"{where}: turn {i} has role {who!r}: tool-calling data is not supported yet; "
                            "drop those rows")
        if who not in SHAREGPT_ROLES:
            raise DataError(f"{where}: turn {i} has unknown 'from' {who!r}; use one of: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise DataError(f"{where}: turn {i} 'value' must be a string, got {type(turn['value']).__name__}")
        messages.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
    return _checked(messages, where)


def _raw_text(row: dict, where: str) -> Example:
    text = _text(row, "text", where)
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty; remove the row")
    return Example(text=text, source=where)


def _checked(messages: list[dict], where: str) -> Example:
    """Roles must be: an optional system message, then user/assistant alternating, ending with assistant."""
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r}; use one of: {', '.join(ROLES)}"
                            + ("; tool-calling data is not supported yet, drop those rows"
                               if m["role"] in ("tool", "function", "ipython") else ""))
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{where}: message {i + offset} is {m['role']!r} but {expected!r} was expected: after an "
                            "optional system message, user and assistant must alternate, starting with user")
    if not body or body[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant answer to learn from")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {i} (assistant) is empty; there is nothing to learn from it — "
                            "fill in the answer or remove the row")
    return Example(messages=messages, source=where)


register_format("alpaca", _alpaca, ("instruction", "output"))
register_format("prompt_completion", _prompt_completion, ("prompt", "completion"))
register_format("messages", _messages, ("messages",))
register_format("sharegpt", _sharegpt, ("conversations",))
register_format("text", _raw_text, ("text",))


def detect_format(row: dict, where: str) -> str:
    """Guess the format from one row's keys."""
    conv = row.get("conversations")
    if isinstance(row.get("messages"), list):
        return "messages"
    if isinstance(conv, list) and conv and isinstance(conv[0], dict):
        return "sharegpt" if "from" in conv[0] else "messages"
    for name in ("alpaca", "prompt_completion", "text"):
        if all(k in row for k in REQUIRED[name]):
            return name
    known = "; ".join(f"{n}: {', '.join(k)}" for n, k in REQUIRED.items())
    raise DataError(f"{where}: cannot tell the data format from the fields {', '.join(map(str, row)) or '(none)'}. "
                    f"Known formats and their fields: {known}. {FIX[0].upper() + FIX[1:]}")


def apply_columns(row: dict, columns: dict[str, str] | None, where: str = "?") -> dict:
    """Rename the user's columns to a format's field names ({canonical: theirs})."""
    if not columns:
        return row
    out = dict(row)
    for canonical, theirs in columns.items():
        if theirs not in row:
            raise DataError(f"{where}: data.columns maps {canonical!r} to {theirs!r}, but the row has no "
                            f"{theirs!r} (it has: {', '.join(map(str, row))})")
        out[canonical] = row[theirs]
    return out


def to_example(row: dict, fmt: str, where: str, system_prompt: str | None = None) -> Example:
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"unknown data format {fmt!r}; {hint}known: auto, {', '.join(FORMATS)}")
    ex = FORMATS[fmt](row, where)
    if system_prompt and ex.is_chat and ex.messages[0]["role"] != "system":
        ex.messages.insert(0, {"role": "system", "content": system_prompt})
    return ex


def load_examples(path: "str | Path", fmt: str = "auto", columns: dict | None = None,
                  system_prompt: str | None = None, split: str | None = None) -> tuple[list[Example], str]:
    """Read a data file and convert every row; returns (examples, format name)."""
    if fmt != "auto" and fmt not in FORMATS:
        to_example({}, fmt, "")
    records = read_records(path, split)
    rows = [(apply_columns(r, columns, w), w) for r, w in records]
    if fmt == "auto":
        fmt = detect_format(*rows[0])
    return [to_example(r, fmt, w, system_prompt) for r, w in rows], fmt
