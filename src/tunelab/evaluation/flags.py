"""Error analysis: flag each answer that is empty, cut off, too long, repetitive or misspelled.

The rules, stated so a reader can check them:
  empty        the answer is blank after stripping.
  cut_off      generation stopped at max_new_tokens (the answer has >= max_new_tokens - 1 tokens
               when re-tokenized; decoding drops special tokens, so one token of slack).
  too_long     more than `ratio` (2) times the reference's words and at least 10 words more.
  repetitive   some word n-gram (n = 3) occurs 3 or more times.
  misspelled   words of 3+ letters unknown to pyspellchecker's English dictionary and absent
               from the prompt and the reference (names, jargon and copied words are not typos).
"""

import re
from collections import Counter

FLAGS = ("empty", "cut_off", "too_long", "repetitive", "misspelled")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_spell = None


def repeated_ngram(text: str, n: int = 3, times: int = 3) -> str | None:
    words = text.lower().split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    top = grams.most_common(1)
    return " ".join(top[0][0]) if top and top[0][1] >= times else None


def misspelled_words(text: str, known_text: str = "") -> list[str]:
    global _spell
    if _spell is None:
        try:
            from spellchecker import SpellChecker
        except ImportError:
            from tunelab.errors import TunelabError

            raise TunelabError("the misspelling flag needs pyspellchecker: pip install pyspellchecker") from None
        _spell = SpellChecker()
    known = {w.lower() for w in _WORD.findall(known_text)}
    words = [w.lower() for w in _WORD.findall(text) if len(w) >= 3 and w.lower() not in known]
    return sorted(_spell.unknown(words)) if words else []


def flag_answer(answer: str, reference: str | None = None, prompt: str = "", answer_tokens: int | None = None,
                max_new_tokens: int | None = None, ratio: float = 2.0) -> dict:
    """{flag: detail} for the flags that apply (detail: True, a list of words, or the n-gram)."""
    out: dict = {}
    if not answer.strip():
        out["empty"] = True
        return out
    if answer_tokens is not None and max_new_tokens and answer_tokens >= max_new_tokens - 1:
        out["cut_off"] = True
    if reference is not None:
        a, r = len(answer.split()), len(reference.split())
        if a > ratio * r and a >= r + 10:
            out["too_long"] = f"{a} words vs {r} in the reference"
    gram = repeated_ngram(answer)
    if gram:
        out["repetitive"] = gram
    typos = misspelled_words(answer, f"{prompt} {reference or ''}")
    if typos:
        out["misspelled"] = typos
    return out


def flag_counts(predictions: list[dict]) -> dict:
    return {f: sum(f in p.get("flags", {}) for p in predictions) for f in FLAGS}
