"""Multiple-choice scoring by log-likelihood, numerically as lm-evaluation-harness 0.4.x does it.

The prompt, the tokenization and the metrics follow lm-eval exactly: context = description +
few-shot turns ("question answer\\n\\n") + question; each choice is scored as " " + choice after it
(trailing spaces of the context move into the continuation; the continuation's tokens are those of
tokenize(context + continuation) past tokenize(context)); acc takes the highest summed
log-probability, acc_norm divides it by the choice's length in characters.

What differs is the arithmetic layout, for speed: lm-eval runs every (context, choice) pair as its
own sequence, so a 4-choice HellaSwag item costs 4 context passes. Here all the token sequences of an
item are merged into a prefix tree and packed into ONE row: a token attends to its ancestors in the
tree only (a 4-D mask) and sits at its depth (position ids), so each shared token (the few-shot
prompt, the question, common starts of choices, Winogrande's common sentence start) runs once, and
log-probabilities come from the same causal computation. Rows are sorted by length to cut padding,
and the vocabulary projection runs only where a continuation token is predicted.
"""

import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from tunelab.data.read import display_name
from tunelab.errors import DataError
from tunelab.evaluation.tasks import TASKS, Item, Task, mmlu_dev_file

TOKEN_BUDGET = 8192  # padded tokens per forward pass: bounds activation memory on long prompts
HEAD_CHUNK = 1024  # positions projected to the vocabulary at once (1024 x 49k floats = 200 MB)


def run_task(model, tokenizer, task: str, path: "str | Path", *, num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 16, fewshot_path: "str | Path | None" = None,
             progress: bool = True, seed: int = 1234) -> tuple[list[dict], dict]:
    """Score a multiple-choice benchmark file with a causal LM.

    Args:
        task: a name in TASKS (arc_easy, hellaswag, mmlu, truthfulqa_mc2, winogrande, ...).
        path: the local file (for mmlu also a folder of <subject>_test.csv).
        num_fewshot: solved examples before each question (default: the task's, 5 for mmlu, else 0).
        limit: score only the first N items (for an mmlu folder: per subject, as lm-eval does).
        batch_size: items per forward pass (fewer when their prompts are long).
        fewshot_path: where the examples come from (default: mmlu's dev split beside the test file;
            other tasks draw them at random, seeded, from the evaluated file, never the item itself).
        seed: seed of that draw (lm-eval's fewshot_random_seed, 1234).

    Returns:
        (predictions, metrics): one dict per item; metrics with acc, acc_norm (each with a standard
        error), n, items_per_s, and mc2 for truthfulqa_mc2, per-subject acc for mmlu.
    """
    if task not in TASKS:
        raise DataError(f"unknown multiple-choice task {task!r}; choose one of: {', '.join(TASKS)}")
    spec = TASKS[task]
    path = Path(path)
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise DataError(f"num_fewshot must be 0 or more, got {k}")
    if k and task.startswith("truthfulqa"):
        raise DataError(f"{task}: its prompt already holds lm-eval's six fixed Q/A examples; use num_fewshot=0")
    every = spec.read(path)
    items = _limited(every, limit)
    shots = fewshot_examples(spec, items, path, k, fewshot_path, seed, pool=every)
    start = time.perf_counter()
    requests = [item_requests(item, s) for item, s in zip(items, shots)]
    lls = score_requests(model, tokenizer, requests, batch_size=batch_size, progress=progress,
                         desc=f"{task} ({len(items)} items)")
    seconds = time.perf_counter() - start
    predictions = [_prediction(spec, item, ll) for item, ll in zip(items, lls)]
    metrics = summarize(spec, predictions)
    metrics.update(task=task, data=display_name(path), num_fewshot=k, seconds=round(seconds, 3),
                   items_per_s=round(len(items) / seconds, 3) if seconds > 0 else None)
    return predictions, metrics


# ---------------------------------------------------------------- prompts

def _limited(items: list[Item], limit: int | None) -> list[Item]:
    if limit is None:
        return items
    if limit < 1:
        raise DataError(f"limit must be 1 or more, got {limit}")
    subjects = {it.subject for it in items}
    if len(subjects) > 1:  # an MMLU folder: lm-eval applies --limit to each subject task
        kept, seen = [], {}
        for it in items:
            seen[it.subject] = seen.get(it.subject, 0) + 1
            if seen[it.subject] <= limit:
                kept.append(it)
        return kept
    return items[:limit]


def _same(a: Item, b: Item) -> bool:
    return (a.text, a.choices, a.gold, a.target) == (b.text, b.choices, b.gold, b.target)


def fewshot_examples(spec: Task, items: list[Item], path: Path, k: int, fewshot_path, seed: int,
                     pool: list[Item] | None = None) -> list[list[Item]]:
    """The solved examples put before each item, chosen as lm-eval's samplers choose them.

    Without fewshot_path they are drawn from `pool` (the whole evaluated file, also under a limit).
    """
    if k == 0:
        return [[] for _ in items]
    if spec.sampler == "first_n":  # MMLU: the first k dev questions of the item's subject
        pools = _subject_pools(spec, items, path, fewshot_path)
        out = []
        for item in items:
            pool = pools[item.subject]
            if len(pool) < k:
                raise DataError(f"{pool[0].where.rsplit(':', 1)[0] if pool else path}: {len(pool)} few-shot "
                                f"examples for {item.subject}, {k} asked; lower num_fewshot")
            out.append(pool[:k])
        return out
    pool = spec.read(Path(fewshot_path)) if fewshot_path else (pool if pool is not None else items)
    rnd = random.Random(seed)  # one generator consumed item after item, as lm-eval's ContextSampler
    out = []
    for item in items:
        if fewshot_path:
            chosen = rnd.sample(pool, k) if k <= len(pool) else None
        else:  # drawn from the evaluated items: draw one more and drop the item itself
            chosen = [x for x in rnd.sample(pool, min(k + 1, len(pool))) if not _same(x, item)][:k]
            if len(chosen) < k:
                others = [x for x in pool if not _same(x, item)]
                chosen = rnd.sample(others, k) if k <= len(others) else None
        if chosen is None:
            raise DataError(f"{display_name(fewshot_path or path)}: fewer than {k} items to draw few-shot "
                            "examples from; lower num_fewshot or give a bigger fewshot_path")
        out.append(chosen)
    return out


def _subject_pools(spec: Task, items: list[Item], path: Path, fewshot_path) -> dict:
    subjects = sorted({it.subject for it in items}, key=str)
    if fewshot_path:
        shots = spec.read(Path(fewshot_path))
        pools = {s: [x for x in shots if x.subject == s or len(subjects) == 1 or x.subject is None]
                 for s in subjects}
        return pools
    pools = {}
    for s in subjects:
        dev = mmlu_dev_file(path, s) if s else None
        if dev is None:
            raise DataError(f"{display_name(path)}: no dev split for subject {s!r} to take {spec.name}'s few-shot "
                            f"examples from (looked for ../dev/{s}_dev.csv); pass fewshot_path=<dev file or "
                            "folder> or num_fewshot=0")
        pools[s] = spec.read(dev)
    return pools


def item_requests(item: Item, shots: list[Item]) -> list[tuple[str, str]]:
    """(context, continuation) per choice, as lm-eval's fewshot_context and construct_requests build them."""
    prefix = item.description + "".join(s.shot() + "\n\n" for s in shots)
    if item.target is not None:  # partial scoring: each choice completes the context, the ending is scored
        return [(prefix + c, " " + item.target) for c in item.choices]
    context = prefix + item.text
    return [(context, " " + c) for c in item.choices]


# ---------------------------------------------------------------- tokens

def _encode_all(tokenizer, strings: list[str]) -> dict[str, list[int]]:
    """Token ids of each distinct string, with the tokenizer's own special tokens (lm-eval's tok_encode)."""
    unique = list(dict.fromkeys(strings))
    bos = getattr(tokenizer, "bos_token", None)
    out = {}
    plain = [s for s in unique if not (bos and s.startswith(bos))]
    if plain:
        out.update(zip(plain, tokenizer(plain)["input_ids"]))
    marked = [s for s in unique if bos and s.startswith(bos)]
    if marked:  # the text already starts with BOS: do not add a second one
        out.update(zip(marked, tokenizer(marked, add_special_tokens=False)["input_ids"]))
    return out


def encode_requests(tokenizer, requests: list[list[tuple[str, str]]]) -> list[list[tuple[list[int], list[int]]]]:
    """lm-eval's _encode_pair for every request: context tokens and the continuation's tokens."""
    pairs = []
    for item in requests:
        row = []
        for context, continuation in item:
            if not context:
                raise DataError("an empty prompt cannot be scored; every item needs a question or context")
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            row.append((context, continuation))
        pairs.append(row)
    ids = _encode_all(tokenizer, [s for row in pairs for c, x in row for s in (c, c + x)])
    out = []
    for row in pairs:
        enc = []
        for context, continuation in row:
            ctx = ids[context]
            cont = ids[context + continuation][len(ctx):]
            if not cont:
                raise DataError(f"the answer {continuation!r} adds no token after its prompt; it cannot be scored")
            enc.append((ctx, cont))
        out.append(enc)
    return out


def max_length(model, tokenizer) -> int:
    """lm-eval's resolve_max_length: the config's context length, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(getattr(config, "text_config", None), attr, None) or getattr(config, attr, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1e9 else 2048


class Packed:
    """One item's token sequences merged into a prefix tree, in depth-first order."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], max_len: int):
        tokens, parent, depth, child = [], [], [], {}
        self.targets = []  # per request: (tree nodes whose logits predict the continuation, its tokens)
        self.paths = []
        for ctx, cont in pairs:
            seq = (ctx + cont)[-(max_len + 1):][:-1]  # lm-eval truncates long inputs from the left
            node, path = -1, []
            for t in seq:
                nxt = child.get((node, t))
                if nxt is None:
                    nxt = len(tokens)
                    child[(node, t)] = nxt
                    tokens.append(t)
                    parent.append(node)
                    depth.append(depth[node] + 1 if node >= 0 else 0)
                node = nxt
                path.append(node)
            self.targets.append((path[-len(cont):], cont))
            self.paths.append(path)
        self.tokens, self.parent, self.depth = tokens, parent, depth
        # leading tokens every sequence runs through before its first scored position: the part
        # another item with the same start (MMLU's dev shots, TruthfulQA's fixed examples) can share
        shared = min(len(p) - len(c) for p, (_, c) in zip(self.paths, self.targets))
        for p in self.paths:
            shared = min(shared, next((i for i, n in enumerate(p[:shared]) if n != i), shared))
        self.shared = shared

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors(self) -> np.ndarray:
        """T x T: token i sees token j iff j is i or one of its ancestors (parents come first)."""
        n = len(self.tokens)
        seen = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parent):
            if p >= 0:
                seen[i, :p + 1] = seen[p, :p + 1]
            seen[i, i] = True
        return seen


# ---------------------------------------------------------------- model

def _body_and_head(model):
    """The decoder and the vocabulary projection, so logits are computed only where needed.

    None when the model post-processes its logits (soft-capping, scaling): then the full forward runs.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    config = getattr(base, "config", None)
    if any(getattr(config, a, None) not in (None, 1, 1.0) for a in ("final_logit_softcapping", "logit_scale",
                                                                     "logits_scaling")):
        return None
    body = getattr(base, "base_model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or body is base or head is None:
        return None
    return body, head


@torch.inference_mode()
def score_requests(model, tokenizer, requests: list[list[tuple[str, str]]], *, batch_size: int = 16,
                   progress: bool = True, desc: str = "scoring") -> list[list[float]]:
    """Summed log-probability of each continuation given its context; requests[i] are item i's pairs."""
    encoded = encode_requests(tokenizer, requests)
    limit = max_length(model, tokenizer)
    packed = [Packed(pairs, limit) for pairs in encoded]
    buckets = _buckets(packed)
    # items with a common start together (their start runs once), the rest longest first
    order = sorted(range(len(packed)), key=lambda i: (buckets[i] is None, buckets[i] or (), -len(packed[i])))
    results: list[list[float]] = [[] for _ in packed]
    split = _body_and_head(model)
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(packed), desc=desc, unit="item")
    pos = 0
    while pos < len(order):
        width = len(packed[order[pos]])
        rows = max(1, min(batch_size, TOKEN_BUDGET // max(width, 1)))
        batch = [order[pos]]
        while len(batch) < rows and pos + len(batch) < len(order) and \
                buckets[order[pos + len(batch)]] == buckets[order[pos]]:
            batch.append(order[pos + len(batch)])
        pos += len(batch)
        items = [packed[i] for i in batch]
        for i, lls in zip(batch, _score_batch(model, split, items, _common_start(items), device, dtype)):
            results[i] = lls
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results


MIN_SHARED = 16  # a common start shorter than this is not worth a separate pass


def _buckets(packed: list[Packed]) -> list[tuple | None]:
    """Items whose first MIN_SHARED shareable tokens equal another item's get that start as a key."""
    keys = [tuple(p.tokens[:MIN_SHARED]) if p.shared >= MIN_SHARED else None for p in packed]
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return [k if k is not None and counts[k] > 1 else None for k in keys]


def _common_start(items: list[Packed]) -> int:
    """How many leading tokens all items of a batch share before any scored position (0: none worth it)."""
    if len(items) < 2:
        return 0
    n = min(p.shared for p in items)
    first = items[0].tokens
    for p in items[1:]:
        n = next((i for i in range(n) if p.tokens[i] != first[i]), n)
    return n if n >= MIN_SHARED else 0


def _cache_kwarg(module) -> str:
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x


def _score_batch(model, split, items: list[Packed], shared: int, device, dtype) -> list[list[float]]:
    """Log-likelihoods of a batch of packed items; their first `shared` tokens (identical) run once."""
    n, s = len(items), shared
    width = max(len(p) for p in items) - s
    ids = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    visible = torch.zeros((n, 1, width, s + width), dtype=torch.bool)
    visible[:, 0, :, :s] = True  # the shared start is every token's ancestor
    visible[:, 0, :, s:] = torch.eye(width, dtype=torch.bool)  # padding sees itself: no empty softmax rows
    for r, p in enumerate(items):
        t = len(p) - s
        ids[r, :t] = torch.tensor(p.tokens[s:])
        positions[r, :t] = torch.tensor(p.depth[s:])
        visible[r, 0, :t, s:s + t] = torch.from_numpy(p.ancestors()[s:, s:])
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    # the (row, column) of every tree node whose logits predict some continuation token, each once
    nodes: dict[tuple[int, int], int] = {}
    wanted = []  # per item, per request: (node indices, target tokens)
    for r, p in enumerate(items):
        wanted.append([([nodes.setdefault((r, c - s), len(nodes)) for c in cols], toks) for cols, toks in p.targets])
    where = torch.tensor(list(nodes), dtype=torch.long)
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  use_cache=False)
    if s:  # run the shared start once, then give every row its keys and values
        runner = split[0] if split is not None else model
        start = torch.tensor([items[0].tokens[:s]], device=device)
        out = runner(input_ids=start, position_ids=torch.arange(s, device=device)[None], use_cache=True)
        # transformers 5.x names it `cache` (reading the old name warns); earlier ones past_key_values
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        cache.batch_repeat_interleave(n)
        kwargs.update({_cache_kwarg(runner): cache, "use_cache": True})
    if split is not None:
        body, head = split
        hidden = body(**kwargs).last_hidden_state[where[:, 0].to(device), where[:, 1].to(device)]
        project = head
    else:  # full forward: logits for the union of needed columns, then pick rows
        cols = torch.unique(where[:, 1])
        logits = model(**kwargs, logits_to_keep=cols.to(device)).logits
        lookup = {c: j for j, c in enumerate(cols.tolist())}
        hidden = logits[where[:, 0].to(device), torch.tensor([lookup[c] for c in where[:, 1].tolist()], device=device)]
        project = None
    node_idx = torch.tensor([j for item in wanted for js, _ in item for j in js], dtype=torch.long)
    token_idx = torch.tensor([t for item in wanted for _, ts in item for t in ts], dtype=torch.long)
    picked = torch.empty(len(node_idx), dtype=torch.float32)
    for a in range(0, len(nodes), HEAD_CHUNK):  # log-softmax over the vocabulary, chunk by chunk
        rows = hidden[a:a + HEAD_CHUNK]
        logits = (project(rows) if project is not None else rows).float()
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        sel = (node_idx >= a) & (node_idx < a + HEAD_CHUNK)
        picked[sel] = logprobs[node_idx[sel] - a, token_idx[sel]]
    out, k = [], 0
    for item in wanted:
        lls = []
        for js, _ in item:
            lls.append(float(picked[k:k + len(js)].double().sum()))
            k += len(js)
        out.append(lls)
    return out


# ---------------------------------------------------------------- metrics

def _prediction(spec: Task, item: Item, lls: list[float]) -> dict:
    ll = np.array(lls)
    lengths = np.array([float(len(c)) for c in item.choices])  # characters, not tokens (lm-eval's acc_norm)
    pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
    true = set(i for i, v in enumerate(item.labels) if v) if item.labels else {item.gold}
    row = {"id": item.id, "source": item.where, "subject": item.subject, "choices": item.choices,
           "gold": item.gold, "pred": pred, "pred_norm": pred_norm, "correct": pred in true,
           "correct_norm": pred_norm in true, "loglikelihoods": [round(x, 6) for x in lls]}
    if item.target is not None:
        row["continuation"] = item.target
    if item.labels:  # TruthfulQA MC2: normalized probability mass on the true answers
        probs = np.exp(ll - ll.max())
        row["labels"] = item.labels
        row["mc2"] = float(probs[np.array(item.labels) == 1].sum() / probs.sum())
    return row


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and lm-eval's standard error of it: sample standard deviation (n-1) / sqrt(n)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def summarize(spec: Task, predictions: list[dict]) -> dict:
    metrics: dict = {"n": len(predictions), "reported_by_lm_eval": list(spec.metrics)}
    for name, key in (("acc", "correct"), ("acc_norm", "correct_norm"), ("mc2", "mc2")):
        if key in predictions[0]:
            mean, stderr = _mean_stderr([float(p[key]) for p in predictions])
            metrics[name], metrics[f"{name}_stderr"] = mean, stderr
    metrics["primary"] = spec.metrics[0]
    subjects = sorted({p["subject"] for p in predictions if p["subject"]})
    if len(subjects) > 1:  # MMLU: lm-eval's group acc is this size-weighted mean; per subject too
        metrics["subjects"] = {s: {"acc": float(np.mean([p["correct"] for p in predictions if p["subject"] == s])),
                                   "n": sum(p["subject"] == s for p in predictions)} for s in subjects}
    return metrics
