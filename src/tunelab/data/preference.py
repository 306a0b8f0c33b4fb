"""Preference, KTO and prompt-only data -> validated rows for the TRL-backed stages (file:line errors).

pairs     prompt, chosen, rejected          strings, or prompt as messages / chosen+rejected as
                                            full conversations (TRL's implicit prompt)
sharegpt  conversations, chosen, rejected   LLaMA-Factory: chosen/rejected are {from, value} turns
kto       prompt, completion, label         label true = desirable; also messages + kto_tag / label
                                            (LLaMA-Factory), the last assistant turn being the completion
prompt    prompt (or messages / instruction [+ input])   prompt-only, for grpo; other columns are
                                            passed to the reward function

Every row becomes {"prompt": [messages], "chosen": [assistant turn], ...} (TRL's conversational
form), so the model's chat template renders it exactly as in SFT and generation.
"""

from tunelab.data.formats import SHAREGPT_ROLES
from tunelab.data.read import read_records, short
from tunelab.errors import DataError

PREFERENCE_FORMATS = ("pairs", "sharegpt", "kto", "prompt")
STAGE_FORMATS = {"dpo": ("pairs", "sharegpt"), "orpo": ("pairs", "sharegpt"), "reward": ("pairs", "sharegpt"),
                 "kto": ("kto", "pairs", "sharegpt"), "grpo": ("prompt",), "ppo": ("prompt",)}


def load_preference_rows(path: str, stage: str, fmt: str = "auto", system_prompt: str | None = None,
                         columns: dict | None = None) -> tuple[list[dict], str]:
    """Rows of a file in the shape the stage's trainer wants, and the format found.

    KTO also accepts pair data: each pair gives one desirable and one undesirable row.
    """
    records = read_records(path)
    out, found = [], None
    for row, where in records:
        if columns:
            row = {columns.get(k, k): v for k, v in row.items()}
        kind = fmt if fmt != "auto" else found or _detect(row, where, stage)  # the first row decides
        if kind not in STAGE_FORMATS[stage]:
            raise DataError(f"{where}: format {kind!r} cannot be used by stage {stage}; it needs "
                            f"{' or '.join(STAGE_FORMATS[stage])} rows (see docs/stages.md)")
        found = found or kind
        if kind == "prompt":
            out.append(_prompt_row(row, where, system_prompt))
            continue
        if kind == "kto":
            out.append(_kto_row(row, where, system_prompt))
            continue
        prompt, chosen, rejected = (_sharegpt_pair if kind == "sharegpt" else _plain_pair)(row, where)
        prompt = _with_system(prompt, system_prompt)
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are the same text; a pair must differ, fix or drop the row")
        if stage == "kto":
            out.append({"prompt": prompt, "completion": _answer(chosen), "label": True})
            out.append({"prompt": prompt, "completion": _answer(rejected), "label": False})
        else:
            out.append({"prompt": prompt, "chosen": _answer(chosen), "rejected": _answer(rejected)})
    if stage == "kto" and len({r["label"] for r in out}) < 2:
        raise DataError(f"{path}: KTO needs both desirable (label true) and undesirable (label false) rows; "
                        "all rows have the same label")
    return out, found


def _detect(row: dict, where: str, stage: str) -> str:
    if stage in ("grpo", "ppo") and any(k in row for k in ("prompt", "messages", "instruction")):
        return "prompt"  # RL samples its own answers: any row with a prompt will do
    if "chosen" in row and "rejected" in row:
        return "sharegpt" if "conversations" in row or isinstance(row["chosen"], dict) else "pairs"
    if "label" in row or "kto_tag" in row:
        return "kto"
    want = {"kto": "prompt, completion, label", "grpo": "prompt", "ppo": "prompt"}.get(stage, "prompt, chosen, rejected")
    raise DataError(f"{where}: cannot tell the format of this row (fields: {', '.join(map(str, row)) or 'none'}); "
                    f"stage {stage} needs {want}; rename the fields or map them with data.columns")


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be non-empty text, got {short(value)}; fix or drop the row")
    return value


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages, got {short(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, got {short(m)}")
        if "from" in m:  # ShareGPT turn
            role = SHAREGPT_ROLES.get(str(m.get("from")).lower())
            content = m.get("value")
        else:
            role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {key}[{i}] has role {short(m.get('role', m.get('from')))}; use system, user "
                            "or assistant (ShareGPT: human, gpt)")
        out.append({"role": role, "content": _text(content, where, f"{key}[{i}].content")})
    return out


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, where, "prompt")}]
    msgs = _messages(value, where, "prompt")
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message, it ends with {msgs[-1]['role']}")
    return msgs


def _plain_pair(row: dict, where: str) -> tuple[list[dict], object, object]:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (the row has: {', '.join(map(str, row))})")
    if "prompt" in row:
        return _prompt(row["prompt"], where), row["chosen"], row["rejected"]
    # implicit prompt: chosen and rejected are whole conversations sharing everything but the last turn
    chosen, rejected = _messages(row["chosen"], where, "chosen"), _messages(row["rejected"], where, "rejected")
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise DataError(f"{where}: without a 'prompt' field, chosen and rejected must be conversations that differ "
                        "only in their last (assistant) turn; add a prompt field otherwise")
    return _prompt(chosen[:-1], where), chosen[-1:], rejected[-1:]


def _sharegpt_pair(row: dict, where: str) -> tuple[list[dict], object, object]:
    if "conversations" not in row:
        raise DataError(f"{where}: missing field 'conversations' (ShareGPT preference rows have conversations, "
                        "chosen, rejected)")
    prompt = _prompt(row["conversations"], where)
    if isinstance(row.get("system"), str) and row["system"].strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": row["system"]}] + prompt
    return prompt, row.get("chosen"), row.get("rejected")


def _answer(value) -> list[dict]:
    """chosen / rejected / completion as one assistant turn (from text, a turn, or a message list)."""
    if isinstance(value, list):
        return value  # already checked by _plain_pair
    if isinstance(value, dict):
        content = value.get("value", value.get("content"))
    else:
        content = value
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"answer {short(value)} must be non-empty text or a {{from, value}} / {{role, content}} turn")
    return [{"role": "assistant", "content": content}]


def _kto_row(row: dict, where: str, system_prompt: str | None) -> dict:
    label = row.get("label", row.get("kto_tag"))
    if not isinstance(label, bool):
        raise DataError(f"{where}: KTO label must be true (desirable) or false (undesirable), got {short(label)}")
    if "messages" in row or "conversations" in row:
        msgs = _messages(row.get("messages", row.get("conversations")), where, "messages")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise DataError(f"{where}: a KTO conversation must end with the assistant answer being judged")
        prompt, completion = _prompt(msgs[:-1], where), msgs[-1:]
    else:
        if "prompt" not in row or "completion" not in row:
            raise DataError(f"{where}: KTO rows need prompt, completion and label (or messages and label)")
        prompt = _prompt(row["prompt"], where)
        completion = _answer(_text(row["completion"], where, "completion")
                             if isinstance(row["completion"], str) else row["completion"])
    return {"prompt": _with_system(prompt, system_prompt), "completion": completion, "label": label}


def _prompt_row(row: dict, where: str, system_prompt: str | None) -> dict:
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages", "instruction", "input")}
    if "prompt" in row:
        prompt = _prompt(row["prompt"], where)
    elif "messages" in row:
        msgs = _messages(row["messages"], where, "messages")
        prompt = _prompt(msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs, where)
    else:
        text = _text(row["instruction"], where, "instruction")
        if isinstance(row.get("input"), str) and row["input"].strip():
            text = f"{text}\n\n{row['input']}"
        prompt = _prompt(text, where)
    return {"prompt": _with_system(prompt, system_prompt), **extra}


def _with_system(prompt: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + prompt
    return prompt
