"""Reward functions for examples/grpo.yaml: fn(prompts, completions, **columns) -> list of floats.

prompts and completions are plain text (the last user message, the sampled answer); columns holds
the data file's other fields, one list per field. Anything importable works, e.g. a sentiment
classifier's positive score, as in TRL's IMDB example.
"""


def concise(prompts, completions, **columns):
    """1 for a complete sentence of 5-30 words; less for rambling, fragments or empty answers."""
    scores = []
    for text in completions:
        words = len(text.split())
        if words == 0:
            scores.append(0.0)
            continue
        score = 1.0 if 5 <= words <= 30 else 0.5 if words < 5 else max(0.0, 1 - (words - 30) / 30)
        if text.rstrip().endswith((".", "!", "?")):
            score += 0.5
        scores.append(score)
    return scores
