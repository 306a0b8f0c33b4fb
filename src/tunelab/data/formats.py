"""Data formats -> Examples: detect a row's format, map columns, convert and validate with file:line errors.

alpaca             instruction, input?, output, system?, history?  (LLaMA-Factory's alpaca)
prompt_completion  prompt, completion                              (TRL; either may be a message list)
messages           messages: [{role, content}]                     (OpenAI chat; also under "conversations")
sharegpt           conversations: [{from, value}], system?         (ShareGPT / FastChat)
text               text                                            (raw text, continued pretraining)

A new format is one `register_format(name, converter, keys)` call.
"""

import difflib
from collections.abc import Callable
from pathlib import Path

from tunelab.data.read import read_records, short
from tunelab.data.types import ROLES, Example
from tunelab.errors import DataError

Converter = Callable[[dict, str], Example]
Turn = tuple[str, str, str]  # (role, content, label naming where in the row it came from, e.g. "messages[2]")

FORMATS: dict[str, Converter] = {}
FORMAT_KEYS: dict[str, tuple[str, ...]] = {}
FIX = ("set data.format and, if your columns have other names, data.columns "
       "(e.g. {instruction: question, output: answer})")
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
_CHAT_FORMATS = ("messages", "sharegpt")  # detected by their items' keys, not just the row's keys


def register_format(name: str, converter: Converter, keys: tuple[str, ...]) -> None:
    """Add a format.

    Args:
        name: the value of data.format that selects it.
        converter: (row, where) -> Example; raises DataError starting with `where` for bad rows.
        keys: the fields a row must have; auto-detection and error messages use them.
    """
    FORMATS[name] = converter
    FORMAT_KEYS[name] = tuple(keys)


def _missing(row: dict, key: str, where: str) -> DataError:
    return DataError(f"{where}: missing field {key!r} (the row has: {_keys(row)}); add it, or {FIX}")


def _keys(row: dict) -> str:
    return ", ".join(map(str, row)) or "no fields"


def _field(row: dict, key: str, where: str, required: bool = True) -> str:
    """A string field of the row; a missing optional one (or null, or an empty CSV cell) is ""."""
    if key not in row:
        if required:
            raise _missing(row, key, where)
        return ""
    value = row[key]
    if value is None:
        if required:
            raise DataError(f"{where}: field {key!r} is null; fill it in or remove the row")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {short(value)}; "
                        "convert it to text")
    return value


def _content(value: object, where: str, label: str) -> str:
    """Message content: a string, or typed parts [{type: text, text|value: ...}] joined."""
    if isinstance(value, list):  # OpenAI ("text") and LLaMA-Factory v1 ("value") content parts
        texts = []
        for j, part in enumerate(value):
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(text, str):
                raise DataError(f"{where}: {label}[{j}] is {short(part)}; only text parts "
                                "{type: text, text: ...} are supported; drop other parts or the row")
            texts.append(text)
        return "".join(texts)
    if not isinstance(value, str):
        raise DataError(f"{where}: {label} must be a string, got {type(value).__name__} {short(value)}; "
                        "convert it to text")
    return value


def _message(m: object, where: str, label: str) -> Turn:
    """An OpenAI-style {role, content} message."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        hint = ("this looks like ShareGPT {from, value}: set data.format: sharegpt"
                if isinstance(m, dict) and "from" in m else "give each message a role and a content")
        raise DataError(f"{where}: {label} must be an object with 'role' and 'content', got {short(m)}; {hint}")
    return m["role"], _content(m["content"], where, f"{label}.content"), label


def _checked(turns: list[Turn], where: str) -> Example:
    """An Example, if the roles are: optional system, then user/assistant alternating, ending with assistant."""
    for role, _, label in turns:
        if role not in ROLES:
            if role in TOOL_ROLES:
                raise DataError(f"{where}: {label} has role {role!r}: tool-calling data is not supported yet; "
                                "drop those rows")
            raise DataError(f"{where}: {label} has unknown role {short(role)}; use one of: {', '.join(ROLES)}")
    start = 1 if turns and turns[0][0] == "system" else 0
    for i, (role, _, label) in enumerate(turns[start:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"{where}: {label} is {role!r} but {expected!r} was expected there; the order must be "
                            "an optional system message, then user and assistant alternating, starting with user; "
                            "fix the order or remove the row")
    if len(turns) == start:
        raise DataError(f"{where}: no user or assistant messages; add a user message and an assistant answer")
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message ({turns[-1][2]}) is from the user; the conversation must end "
                        "with an assistant answer to learn from; add the answer or drop the last message")
    for role, content, label in turns:
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: {label} is an empty assistant answer; there is nothing to learn from it: "
                            "fill in the answer or remove the row")
    return Example(messages=[{"role": r, "content": c} for r, c, _ in turns], source=where)


def _alpaca(row: dict, where: str) -> Example:
    instruction = _field(row, "instruction", where)
    extra = _field(row, "input", where, required=False)
    output = _field(row, "output", where)
    system = _field(row, "system", where, required=False)
    turns: list[Turn] = [("system", system, "system")] if system.strip() else []
    history = row.get("history")
    if history not in (None, ""):  # "" is an empty CSV cell
        if not isinstance(history, list):
            raise DataError(f"{where}: field 'history' must be a list of [user, assistant] pairs, got "
                            f"{type(history).__name__} {short(history)}; fix it or drop the field")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair, got {short(pair)}; "
                                "fix it or drop the field")
            turns.append(("user", _content(pair[0], where, f"history[{i}][0]"), f"history[{i}][0]"))
            turns.append(("assistant", _content(pair[1], where, f"history[{i}][1]"), f"history[{i}][1]"))
    # an empty instruction with an input is kept as just the input, not "\n\n" + input
    user = "\n\n".join(p for p in (instruction, extra) if p.strip()) or instruction
    turns += [("user", user, "instruction"), ("assistant", output, "output")]
    return _checked(turns, where)


def _prompt_completion(row: dict, where: str) -> Example:
    for key in ("prompt", "completion"):
        if key not in row:
            raise _missing(row, key, where)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        turns = [_message(m, where, f"prompt[{i}]") for i, m in enumerate(prompt)]
    else:
        turns = [("user", _field(row, "prompt", where), "prompt")]
    if isinstance(completion, list):
        if len(completion) != 1:
            raise DataError(f"{where}: field 'completion' holds {len(completion)} messages; give exactly one "
                            "assistant message, or a plain string")
        turns.append(_message(completion[0], where, "completion[0]"))
    else:
        turns.append(("assistant", _field(row, "completion", where), "completion"))
    return _checked(turns, where)


def _chat_items(row: dict, where: str, keys: tuple[str, str], shape: str) -> tuple[str, list]:
    """The message list under the first of `keys` the row has."""
    key = keys[0] if keys[0] in row else keys[1] if keys[1] in row else None
    if key is None:
        raise _missing(row, keys[0], where)
    items = row[key]
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {shape} messages, got {short(items)}; "
                        "fix it or remove the row")
    return key, items


def _messages(row: dict, where: str) -> Example:
    key, items = _chat_items(row, where, ("messages", "conversations"), "{role, content}")
    return _checked([_message(m, where, f"{key}[{i}]") for i, m in enumerate(items)], where)


def _sharegpt(row: dict, where: str) -> Example:
    key, items = _chat_items(row, where, ("conversations", "messages"), "{from, value}")
    system = _field(row, "system", where, required=False)
    turns: list[Turn] = [("system", system, "system")] if system.strip() else []
    for i, turn in enumerate(items):
        label = f"{key}[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            hint = ("this looks like OpenAI {role, content}: set data.format: messages"
                    if isinstance(turn, dict) and "role" in turn else "give each turn a from and a value")
            raise DataError(f"{where}: {label} must be an object with 'from' and 'value', got {short(turn)}; {hint}")
        who = turn["from"]
        if who in TOOL_ROLES:
            raise DataError(f"{where}: {label} is from {who!r}: tool-calling data is not supported yet; "
                            "drop those rows")
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise DataError(f"{where}: {label} has unknown 'from' {short(who)}; use one of: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        turns.append((SHAREGPT_ROLES[who], _content(turn["value"], where, f"{label}.value"), f"{label} (from {who!r})"))
    return _checked(turns, where)


def _raw_text(row: dict, where: str) -> Example:
    text = _field(row, "text", where)
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty; fill it in or remove the row")
    return Example(text=text, source=where)


register_format("alpaca", _alpaca, ("instruction", "output"))
register_format("prompt_completion", _prompt_completion, ("prompt", "completion"))
register_format("messages", _messages, ("messages",))
register_format("sharegpt", _sharegpt, ("conversations",))
register_format("text", _raw_text, ("text",))


def detect_format(row: dict, where: str) -> str:
    """The format a row is in, judged by its keys (extra keys are ignored).

    Chat rows are told apart by their items' keys ({role, content} vs {from, value}); then the
    other formats are tried, the one with the most required keys first, ties in registration
    order (alpaca, prompt_completion, text).

    Raises:
        DataError: no format fits; names the row's keys, the known formats and the fix.
    """
    for key, default in (("messages", "messages"), ("conversations", "sharegpt")):
        if key in row:
            items = row[key] if isinstance(row[key], list) else []
            first = next((m for m in items if isinstance(m, dict)), {})
            if "from" in first or "value" in first:
                return "sharegpt"
            return "messages" if "role" in first or "content" in first else default
    others = [n for n in FORMATS if n not in _CHAT_FORMATS]
    matches = [n for n in others if all(k in row for k in FORMAT_KEYS[n])]
    if matches:
        return max(matches, key=lambda n: len(FORMAT_KEYS[n]))  # max keeps the first of equals
    known = "; ".join(f"{n} ({', '.join(FORMAT_KEYS[n])})" for n in FORMATS)
    partial = [(n, [k for k in FORMAT_KEYS[n] if k not in row])
               for n in others if any(k in row for k in FORMAT_KEYS[n])]
    closest = "".join(f" ({n} would also need: {', '.join(missing)})" for n, missing in partial[:1])
    raise DataError(f"{where}: cannot tell the data format from the fields {_keys(row)}{closest}. "
                    f"Known formats and their fields: {known}. To fix, {FIX}")


def apply_columns(row: dict, columns: dict[str, str] | None, where: str = "?") -> dict:
    """Rename the user's columns to a format's field names.

    Args:
        row: one record.
        columns: {format field: the user's column}, e.g. {"output": "answer"}; None or {} leaves the row as is.
        where: "file:line" of the row, for errors.

    Returns:
        A new row; the mapped columns are renamed (not copied) so they cannot make detection pick another format.
    """
    if not columns:
        return row
    for canonical, theirs in columns.items():
        if theirs not in row:
            close = difflib.get_close_matches(str(theirs), [str(k) for k in row], n=1)
            if canonical in row:
                hint = f"; it has {canonical!r}: did you swap them? data.columns goes {{format field: your column}}"
            elif close:
                hint = f"; did you mean {close[0]!r}?"
            else:
                hint = f"; fix data.columns.{canonical}"
            raise DataError(f"{where}: data.columns maps {canonical!r} to the column {theirs!r}, but the row has "
                            f"no {theirs!r} (it has: {_keys(row)}){hint}")
    sources = set(columns.values())
    out = {k: v for k, v in row.items() if k not in sources}
    out.update({canonical: row[theirs] for canonical, theirs in columns.items()})
    return out


def _unknown_format(fmt: str) -> DataError:
    close = difflib.get_close_matches(fmt, list(FORMATS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return DataError(f"data.format: unknown format {fmt!r}; {hint}use one of: auto, {', '.join(FORMATS)}")


def to_example(row: dict, fmt: str, where: str, system_prompt: str | None = None) -> Example:
    """Convert and validate one row.

    Args:
        row: the record, after apply_columns.
        fmt: a name in FORMATS.
        where: "file:line", the start of every error message and the Example's source.
        system_prompt: added as the first message of a chat example that has no system message.

    Raises:
        DataError: the format is unknown or the row is invalid for it.
    """
    if fmt not in FORMATS:
        raise _unknown_format(fmt)
    example = FORMATS[fmt](row, where)
    if system_prompt and example.is_chat and example.messages[0]["role"] != "system":
        example.messages.insert(0, {"role": "system", "content": system_prompt})
    return example


def load_examples(path: "str | Path", fmt: str = "auto", columns: dict[str, str] | None = None,
                  system_prompt: str | None = None, split: str | None = None) -> tuple[list[Example], str]:
    """Read a data file and convert every row.

    Args:
        path: a data file or saved dataset folder (see read_records).
        fmt: a format name, or "auto" to detect it from the first row (every row is then checked against it).
        columns: {format field: your column} renames, applied before detection.
        system_prompt: see to_example.
        split: the split of a saved DatasetDict folder (default "train").

    Returns:
        (examples, format name).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise _unknown_format(fmt)  # before reading: a typo should not wait for a big file
    examples = []
    for row, where in read_records(path, split=split):
        row = apply_columns(row, columns, where)
        if fmt == "auto":
            fmt = detect_format(row, where)
        examples.append(to_example(row, fmt, where, system_prompt))
    return examples, fmt
