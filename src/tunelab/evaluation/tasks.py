"""Multiple-choice benchmark tasks: read a local file into items, as lm-evaluation-harness 0.4.x phrases them.

Each task turns rows of a local file (its Hugging Face layout, or the layout of the copies in
shared/data/benchmarks: llm-foundry ICL JSONL, rowanz HellaSwag, MMLU CSV, TruthfulQA CSV) into
`Item`s whose `text`, `choices` and `gold` are exactly lm-eval's `doc_to_text`, `doc_to_choice` and
`doc_to_target` for that task (lm_eval/tasks/<task>/*.yaml and utils.py, version 0.4.13). The
scoring engine (mc.py) builds the prompt from these: description + few-shot turns + text, and
scores " " + choice after it. docs/eval_tasks.md documents every accepted layout.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunelab.data.read import display_name, read_records, short
from tunelab.errors import DataError


@dataclass
class Item:
    """One question. For partial scoring (Winogrande) `choices` are the contexts and `target` the shared ending."""

    id: str
    where: str  # file:line, for errors and predictions
    text: str  # lm-eval's doc_to_text (empty for partial scoring)
    choices: list[str]  # lm-eval's doc_to_choice; acc_norm divides by their character lengths
    gold: int
    target: str | None = None  # partial scoring: the continuation scored after each choice
    labels: list[int] | None = None  # TruthfulQA MC2: 1 for every true answer
    description: str = ""  # put once before the few-shot examples (MMLU: the subject line)
    subject: str | None = None

    def shot(self) -> str:
        """This item as a solved few-shot example: question, target delimiter, answer."""
        if self.target is not None:
            return f"{self.choices[self.gold]} {self.target}"
        return f"{self.text} {self.choices[self.gold]}"


@dataclass
class Task:
    name: str
    summary: str
    read: Callable[[Path], list[Item]]
    num_fewshot: int = 0  # default k
    sampler: str = "random"  # lm-eval's fewshot sampler: random (seeded) or first_n
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # what lm-eval reports for this task


# ---------------------------------------------------------------- helpers

def _rows(path: Path) -> list[tuple[dict, str]]:
    return read_records(path)


def _need(row: dict, where: str, keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing {', '.join(map(repr, missing))}; expected {fmt} "
                        f"(got keys {sorted(row)}; docs/eval_tasks.md lists the accepted layouts)")


def _str(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string, got {short(value)}")
    return value


def _str_list(row: dict, key: str, where: str, n: int | None = None) -> list[str]:
    value = row[key]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v for v in value):
        raise DataError(f"{where}: {key!r} must be a list of at least two non-empty strings, got {short(value)}")
    if n is not None and len(value) != n:
        raise DataError(f"{where}: {key!r} must hold {n} strings, got {len(value)}")
    return value


def _index(value, n: int, where: str, key: str, base: int = 0) -> int:
    """A gold index given as int or digit string, checked against the number of choices."""
    try:
        i = int(value) - base
    except (TypeError, ValueError):
        i = -1
    if isinstance(value, bool) or not 0 <= i < n:
        raise DataError(f"{where}: {key!r} must be an index from {base} to {n - 1 + base}, got {short(value)}")
    return i


def _pick(rows: list[tuple[dict, str]], formats: dict[str, tuple[tuple[str, ...], Callable]], task: str):
    """Choose the layout whose keys the first row has; every row is then read with it."""
    first, where = rows[0]
    for fmt, (keys, read_row) in formats.items():
        if all(k in first for k in keys):
            return [read_row(row, w, fmt, keys) for row, w in rows]
    layouts = "; ".join(f"{{{', '.join(keys)}}}" for keys, _ in formats.values())
    raise DataError(f"{where}: not a {task} row (keys {sorted(first)}); expected one of: {layouts} "
                    "(docs/eval_tasks.md)")


def _checked(read_row):
    """Wrap a row reader so a missing key names the row, the layout and its keys."""
    def wrapped(row, where, fmt, keys):
        _need(row, where, keys, f"the {fmt} layout {{{', '.join(keys)}}}")
        return read_row(row, where)
    return wrapped


def _ident(where: str) -> str:
    return where.rsplit("/", 1)[-1]


# ---------------------------------------------------------------- ARC

def _arc_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def read_arc(path: Path) -> list[Item]:
    def foundry(row, where):  # query is "Question: <question>"
        query = _str(row, "query", where)
        question = query[len("Question: "):] if query.startswith("Question: ") else query
        choices = _str_list(row, "choices", where)
        return Item(_ident(where), where, _arc_text(question), choices, _index(row["gold"], len(choices), where, "gold"))

    def hf(row, where):  # allenai/ai2_arc
        question = _str(row, "question", where)
        ch = row["choices"]
        if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
            raise DataError(f"{where}: 'choices' must be {{'text': [...], 'label': [...]}}, got {short(ch)}")
        choices = _str_list(ch, "text", where)
        if row["answerKey"] not in ch["label"]:
            raise DataError(f"{where}: answerKey {short(row['answerKey'])} is not one of the labels {ch['label']}")
        return Item(str(row.get("id", _ident(where))), where, _arc_text(question), choices,
                    ch["label"].index(row["answerKey"]))

    return _pick(_rows(path), {"llm-foundry": (("query", "choices", "gold"), _checked(foundry)),
                               "ai2_arc": (("question", "choices", "answerKey"), _checked(hf))}, "ARC")


# ---------------------------------------------------------------- HellaSwag

def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py: strip, WikiHow [title] -> '. ', drop [bracketed] artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[Item]:
    def rowanz(row, where):  # rowanz/hellaswag and Rowan/hellaswag
        for key in ("activity_label", "ctx_a", "ctx_b"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {short(row[key])}")
        endings = _str_list(row, "endings", where)
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return Item(str(row.get("ind", _ident(where))), where, hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                    [hellaswag_preprocess(e) for e in endings], _index(row["label"], len(endings), where, "label"))

    def foundry(row, where):  # already preprocessed by llm-foundry: used as they are
        choices = _str_list(row, "choices", where)
        return Item(_ident(where), where, _str(row, "query", where), choices,
                    _index(row["gold"], len(choices), where, "gold"))

    return _pick(_rows(path), {"rowanz": (("activity_label", "ctx_a", "ctx_b", "endings", "label"), _checked(rowanz)),
                               "llm-foundry": (("query", "choices", "gold"), _checked(foundry))}, "HellaSwag")


# ---------------------------------------------------------------- MMLU

LETTERS = "ABCDEFGHIJKLMNOP"


def _mmlu_text(question: str, options: list[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_description(subject: str | None) -> str:
    if not subject:
        return ""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _mmlu_item(ident, where, question, options, gold, subject) -> Item:
    return Item(ident, where, _mmlu_text(question, options), list(LETTERS[:len(options)]), gold,
                description=_mmlu_description(subject), subject=subject)


def _subject_of(path: Path) -> str | None:
    m = re.match(r"(.+?)_(test|dev|val|validation)$", path.stem)
    return m.group(1) if m else None


def _read_mmlu_file(path: Path) -> list[Item]:
    file_subject = _subject_of(path)

    def csv_row(row, where):  # question,choice0..choice3,answer (answer 0-3 or A-D)
        options = [row[f"choice{i}"] for i in range(4)]
        answer = row["answer"].strip()
        gold = LETTERS.index(answer) if answer in LETTERS[:4] else _index(answer, 4, where, "answer")
        return _mmlu_item(_ident(where), where, _str(row, "question", where), options, gold, file_subject)

    def hf(row, where):  # cais/mmlu: question, choices[4], answer int, subject
        options = row["choices"]
        if not isinstance(options, list) or len(options) < 2:
            raise DataError(f"{where}: 'choices' must be a list of the answer texts, got {short(options)}")
        return _mmlu_item(_ident(where), where, _str(row, "question", where), [str(o) for o in options],
                          _index(row["answer"], len(options), where, "answer"), row.get("subject") or file_subject)

    def foundry(row, where):  # query "Question: ...\nChoices\nA. ...", choices, gold, category
        query = _str(row, "query", where)
        body = query[len("Question: "):] if query.startswith("Question: ") else query
        question, sep, listing = body.partition("\nChoices\n")
        options = re.split(r"\n(?=[B-P]\. )", listing[3:]) if sep and listing.startswith("A. ") else []
        if len(options) < 2:  # no letter listing: the choices field holds the options
            options = _str_list(row, "choices", where)
        else:  # the listing survives choices that hold newlines (llm-foundry split one such row)
            options = [o[3:] if i else o for i, o in enumerate(options)]
        return _mmlu_item(_ident(where), where, question, options, _index(row["gold"], len(options), where, "gold"),
                          row.get("category") or file_subject)

    return _pick(_rows(path), {
        "csv": (("question", "choice0", "choice1", "choice2", "choice3", "answer"), _checked(csv_row)),
        "cais/mmlu": (("question", "choices", "answer"), _checked(hf)),
        "llm-foundry": (("query", "choices", "gold"), _checked(foundry))}, "MMLU")


def read_mmlu(path: Path) -> list[Item]:
    """One file, or a folder of <subject>_test.csv files (every subject, in name order)."""
    if path.is_dir():
        files = sorted(path.glob("*_test.csv")) or sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl"))
        if not files:
            raise DataError(f"{display_name(path)}: no <subject>_test.csv files in this folder")
        return [item for f in files for item in _read_mmlu_file(f)]
    return _read_mmlu_file(path)


def mmlu_dev_file(path: Path, subject: str) -> Path | None:
    """The dev split beside a test file or folder: ../dev/<subject>_dev.csv or ./<subject>_dev.csv."""
    base = path if path.is_dir() else path.parent
    for folder in (base.parent / "dev", base):
        candidate = folder / f"{subject}_dev.csv"
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------- TruthfulQA

TRUTHFULQA_PREFIX = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _truthfulqa(path: Path, mc: str) -> list[Item]:
    def answers(row, key, where):
        parts = [a.strip() for a in row[key].split(";") if a.strip()]
        if not parts:
            raise DataError(f"{where}: {key!r} is empty; it must list answers separated by ';'")
        return parts

    def csv_row(row, where):  # the original TruthfulQA.csv
        question = _str(row, "Question", where)
        best = _str(row, "Best Answer", where).strip()
        wrong = answers(row, "Incorrect Answers", where)
        if mc == "mc1":
            choices, labels = [best] + wrong, [1] + [0] * len(wrong)
        else:
            right = answers(row, "Correct Answers", where)
            choices, labels = right + wrong, [1] * len(right) + [0] * len(wrong)
        return choices, labels, question

    def hf(row, where):  # truthfulqa/truthful_qa, multiple_choice config
        targets = row[f"{mc}_targets"]
        if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
            raise DataError(f"{where}: '{mc}_targets' must be {{'choices': [...], 'labels': [...]}}, "
                            f"got {short(targets)}")
        choices = _str_list(targets, "choices", where)
        labels = targets["labels"]
        if not isinstance(labels, list) or len(labels) != len(choices) or set(labels) - {0, 1} or 1 not in labels:
            raise DataError(f"{where}: '{mc}_targets.labels' must be 0/1 per choice with at least one 1, "
                            f"got {short(labels)}")
        return choices, labels, _str(row, "question", where)

    def make(read_row):
        def item(row, where):
            choices, labels, question = read_row(row, where)
            text = TRUTHFULQA_PREFIX + "\n\nQ: " + question + "\nA:"
            return Item(_ident(where), where, text, choices, labels.index(1),
                        labels=labels if mc == "mc2" else None)
        return _checked(item)

    return _pick(_rows(path), {
        "TruthfulQA.csv": (("Question", "Best Answer", "Correct Answers", "Incorrect Answers"), make(csv_row)),
        "truthful_qa": (("question", f"{mc}_targets"), make(hf))}, "TruthfulQA")


# ---------------------------------------------------------------- PIQA, BoolQ, Winogrande, generic

def read_piqa(path: Path) -> list[Item]:
    def foundry(row, where):  # query "Question: <goal>\n"
        query = _str(row, "query", where)
        goal = query[len("Question: "):] if query.startswith("Question: ") else query
        goal = goal[:-1] if goal.endswith("\n") else goal
        choices = _str_list(row, "choices", where)
        return Item(_ident(where), where, f"Question: {goal}\nAnswer:", choices,
                    _index(row["gold"], len(choices), where, "gold"))

    def hf(row, where):
        choices = [_str(row, "sol1", where), _str(row, "sol2", where)]
        return Item(_ident(where), where, f"Question: {_str(row, 'goal', where)}\nAnswer:", choices,
                    _index(row["label"], 2, where, "label"))

    return _pick(_rows(path), {"llm-foundry": (("query", "choices", "gold"), _checked(foundry)),
                               "piqa": (("goal", "sol1", "sol2", "label"), _checked(hf))}, "PIQA")


def read_boolq(path: Path) -> list[Item]:
    def foundry(row, where):  # query "Passage: <passage>\nQuestion: <question>?", choices ["no", "yes"]
        query = _str(row, "query", where)
        passage, sep, question = query.rpartition("\nQuestion: ")
        if not sep:
            raise DataError(f"{where}: 'query' must read 'Passage: ...\\nQuestion: ...', got {short(query)}")
        passage = passage[len("Passage: "):] if passage.startswith("Passage: ") else passage
        question = question if question.endswith("?") else question + "?"
        if [c.lower() for c in _str_list(row, "choices", where)] != ["no", "yes"]:
            raise DataError(f"{where}: 'choices' must be ['no', 'yes'], got {short(row['choices'])}")
        return Item(_ident(where), where, f"{passage}\nQuestion: {question}\nAnswer:", ["no", "yes"],
                    _index(row["gold"], 2, where, "gold"))

    def hf(row, where):  # super_glue boolq: label 1 = yes; lm-eval appends "?" to the question
        label = row["label"]
        gold = int(label) if isinstance(label, bool) else _index(label, 2, where, "label")
        return Item(str(row.get("idx", _ident(where))), where,
                    f"{_str(row, 'passage', where)}\nQuestion: {_str(row, 'question', where)}?\nAnswer:",
                    ["no", "yes"], gold)

    return _pick(_rows(path), {"llm-foundry": (("query", "choices", "gold"), _checked(foundry)),
                               "super_glue": (("passage", "question", "label"), _checked(hf))}, "BoolQ")


def read_winogrande(path: Path) -> list[Item]:
    def foundry(row, where):
        contexts = _str_list(row, "context_options", where)
        return Item(_ident(where), where, "", contexts, _index(row["gold"], len(contexts), where, "gold"),
                    target=_str(row, "continuation", where).strip())

    def hf(row, where):  # allenai/winogrande: the blank "_" splits the sentence
        sentence = _str(row, "sentence", where)
        if "_" not in sentence:
            raise DataError(f"{where}: 'sentence' has no '_' blank to fill: {short(sentence)}")
        cut = sentence.index("_")
        options = [_str(row, "option1", where), _str(row, "option2", where)]
        return Item(_ident(where), where, "", [sentence[:cut] + o for o in options],
                    _index(row["answer"], 2, where, "answer", base=1), target=sentence[cut + 1:].strip())

    return _pick(_rows(path), {"llm-foundry": (("context_options", "continuation", "gold"), _checked(foundry)),
                               "winogrande": (("sentence", "option1", "option2", "answer"), _checked(hf))},
                 "Winogrande")


def read_generic(path: Path) -> list[Item]:
    """Any {query, choices, gold} file (COPA, OpenBookQA, ...): the query is the whole prompt."""
    def foundry(row, where):
        choices = _str_list(row, "choices", where)
        return Item(str(row.get("id", _ident(where))), where, _str(row, "query", where), choices,
                    _index(row["gold"], len(choices), where, "gold"))

    return _pick(_rows(path), {"query/choices/gold": (("query", "choices", "gold"), _checked(foundry))},
                 "multiple-choice")


TASKS: dict[str, Task] = {
    "arc_easy": Task("arc_easy", "AI2 ARC, easy set: science questions, 4 answers", read_arc),
    "arc_challenge": Task("arc_challenge", "AI2 ARC, challenge set", read_arc),
    "hellaswag": Task("hellaswag", "HellaSwag: pick the ending of a story (lm-eval preprocessing)", read_hellaswag),
    "mmlu": Task("mmlu", "MMLU: 4-choice exam questions, answer letter scored, k-shot from the dev split",
                 read_mmlu, num_fewshot=5, sampler="first_n", metrics=("acc",)),
    "truthfulqa_mc1": Task("truthfulqa_mc1", "TruthfulQA MC1: the best answer among wrong ones",
                           lambda p: _truthfulqa(p, "mc1"), metrics=("acc",)),
    "truthfulqa_mc2": Task("truthfulqa_mc2", "TruthfulQA MC2: probability mass on the true answers",
                           lambda p: _truthfulqa(p, "mc2"), metrics=("mc2",)),
    "piqa": Task("piqa", "PIQA: physical commonsense, 2 solutions", read_piqa),
    "boolq": Task("boolq", "BoolQ: yes/no question about a passage", read_boolq, metrics=("acc",)),
    "winogrande": Task("winogrande", "Winogrande: fill the blank, partial scoring of the ending", read_winogrande,
                       metrics=("acc",)),
    "multiple_choice": Task("multiple_choice", "any {query, choices, gold} JSONL: query is the prompt",
                            read_generic),
}
