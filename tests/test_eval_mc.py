"""Multiple-choice evaluation: lm-eval's prompts, packed scoring equal to a per-choice loop, file formats."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.errors import DataError
from tunelab.evaluation import mc
from tunelab.evaluation.tasks import TASKS, TRUTHFULQA_PREFIX, Item

MC = Path(__file__).parent / "assets" / "mc"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tunelab.models import load_model

    return load_model(str(tiny_model_dir), dtype="fp32")


def naive_loglikelihoods(model, tok, requests):
    """lm-eval's way: each (context, continuation) as its own sequence, summed log-probs of the continuation."""
    out = []
    for ctx, cont in mc.encode_requests(tok, [requests])[0]:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        out.append(sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("task,path,k,limit", [
    ("hellaswag", "hellaswag_rowanz.jsonl", 0, 4),
    ("arc_easy", "arc_easy_llmfoundry.jsonl", 2, 4),  # random shots share a prefix with the question
    ("winogrande", "winogrande_llmfoundry.jsonl", 1, 4),  # partial scoring: contexts differ, ending shared
    ("mmlu", "mmlu/test", 2, 1),  # one-token answers: all choices read the same position
    ("mmlu", "mmlu/test/anatomy_test.csv", 3, 4),  # description + dev shots run once for the batch
    ("truthfulqa_mc1", "truthfulqa.csv", 0, 2),  # the six fixed examples run once
])
def test_packed_scoring_equals_a_per_choice_loop(tiny, task, path, k, limit, monkeypatch):
    model, tok = tiny
    starts = []
    common_start = mc._common_start
    monkeypatch.setattr(mc, "_common_start", lambda items: starts.append(common_start(items)) or starts[-1])
    preds, metrics = mc.run_task(model, tok, task, MC / path, num_fewshot=k, limit=limit, batch_size=3,
                                 progress=False)
    every = TASKS[task].read(MC / path)
    items = mc._limited(every, limit)
    shots = mc.fewshot_examples(TASKS[task], items, MC / path, k, None, 1234, pool=every)
    assert len(preds) == len(items) == metrics["n"]
    for p, item, s in zip(preds, items, shots):
        expected = naive_loglikelihoods(model, tok, mc.item_requests(item, s))
        assert p["loglikelihoods"] == pytest.approx(expected, abs=2e-4)
        assert p["pred"] == max(range(len(expected)), key=lambda i: (expected[i], -i))
    if task in ("truthfulqa_mc1", "mmlu") and limit > 1:  # the common start ran once, apart
        assert max(starts) > 50
    assert metrics["acc"] == sum(p["correct"] for p in preds) / len(preds)


def test_long_prompts_split_batches_and_truncate_like_lm_eval(tiny, monkeypatch):
    model, tok = tiny
    item = Item("1", "x:1", "word " * 60 + "end", ["alpha beta", "gamma"], 0)
    requests = mc.item_requests(item, [])
    full = mc.score_requests(model, tok, [requests], progress=False)[0]
    assert full == pytest.approx(naive_loglikelihoods(model, tok, requests), abs=2e-4)
    monkeypatch.setattr(mc, "max_length", lambda m, t: 16)  # inputs keep their last 16 tokens
    short = mc.score_requests(model, tok, [requests], progress=False)[0]
    for (ctx, cont), got in zip(mc.encode_requests(tok, [requests])[0], short):
        seq = (ctx + cont)[-17:]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].float(), -1)
        want = sum(lp[len(seq) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))
        assert got == pytest.approx(want, abs=2e-4)


def test_acc_norm_divides_by_characters_not_tokens():
    # "Zzyzx" is several tokens but 5 characters; "the" one token, 3 characters
    item = Item("1", "f:1", "Q", ["the", "Zzyzx Zzyzx"], 1)
    p = mc._prediction(TASKS["arc_easy"], item, [-3.0, -7.0])
    assert p["pred"] == 0  # -3 > -7
    assert p["pred_norm"] == 1  # -7/11 > -3/3
    assert (p["correct"], p["correct_norm"]) == (False, True)


def test_mc2_is_the_normalized_probability_of_true_answers():
    item = Item("1", "f:1", "Q", ["a", "b", "c"], 0, labels=[1, 0, 1])
    p = mc._prediction(TASKS["truthfulqa_mc2"], item, [-1.0, -2.0, -3.0])
    e = [2.718281828 ** -x for x in (1, 2, 3)]
    assert p["mc2"] == pytest.approx((e[0] + e[2]) / sum(e))
    m = mc.summarize(TASKS["truthfulqa_mc2"], [p, {**p, "mc2": 0.0, "correct": False, "correct_norm": False}])
    assert m["mc2"] == pytest.approx(p["mc2"] / 2) and m["primary"] == "mc2"
    assert m["acc_stderr"] == pytest.approx(0.5)  # lm-eval: sample std (n-1) / sqrt(n) of [1, 0]


def test_mmlu_prompt_is_lm_evals_five_shot_format():
    items = TASKS["mmlu"].read(MC / "mmlu" / "test" / "anatomy_test.csv")
    shots = mc.fewshot_examples(TASKS["mmlu"], items, MC / "mmlu" / "test" / "anatomy_test.csv", 5, None, 1234)
    dev = TASKS["mmlu"].read(MC / "mmlu" / "dev" / "anatomy_dev.csv")
    assert [s.text for s in shots[0]] == [d.text for d in dev]  # first_n: the dev split in order
    (context, continuation), *rest = mc.item_requests(items[0], shots[0])
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n"
                              "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
                              "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
                              "D. The second and third pharyngeal arches\nAnswer: D\n\n")
    assert context.count("\nAnswer: ") == 5 and context.endswith("\nD. paralysis of the facial muscles, loss of taste, "
                                                                  "lacrimation and decreased salivation.\nAnswer:")
    assert [continuation] + [c for _, c in rest] == [" A", " B", " C", " D"]


def test_random_shots_are_seeded_and_never_the_item_itself():
    spec = TASKS["arc_easy"]
    items = spec.read(MC / "arc_easy_llmfoundry.jsonl")
    a = mc.fewshot_examples(spec, items, MC, 3, None, 1234)
    assert a == mc.fewshot_examples(spec, items, MC, 3, None, 1234)
    assert a != mc.fewshot_examples(spec, items, MC, 3, None, 7)
    for item, shots in zip(items, a):
        assert len(shots) == 3 and all(s is not item for s in shots)
    context, continuation = mc.item_requests(items[0], a[0])[0]
    first = a[0][0]
    assert context.startswith(f"{first.text} {first.choices[first.gold]}\n\n")  # "Question: ..\nAnswer: <answer>"
    assert context.endswith("\n\n" + items[0].text) and continuation == " " + items[0].choices[0]


def test_winogrande_shots_and_partial_scoring_requests():
    items = TASKS["winogrande"].read(MC / "winogrande_llmfoundry.jsonl")
    reqs = mc.item_requests(items[0], [items[1]])
    shot = "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.\n\n"
    assert reqs == [(shot + "Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                    (shot + "Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]


def test_trailing_space_of_a_context_moves_into_the_continuation(tokenizer):
    (ctx, cont), = mc.encode_requests(tokenizer, [[("Answer: ", "yes")]])[0]
    assert ctx == tokenizer("Answer:")["input_ids"]
    assert cont == tokenizer("Answer: yes")["input_ids"][len(ctx):]


@pytest.mark.parametrize("task,path,n,start,choice0,gold", [
    ("arc_easy", "arc_easy_llmfoundry.jsonl", 6, "Question: Which statement best explains why photosynthesis",
     "Sunlight is the source of energy for nearly all ecosystems.", 0),
    ("hellaswag", "hellaswag_rowanz.jsonl", 6, "Pole vault: Pole vault is a sport where you run with a pole and stop "
     "and swing your body. A few women", "go down a rock and stop.", 3),
    ("mmlu", "mmlu/test", 10, "A lesion causing compression of the facial nerve", "A", 0),
    ("mmlu", "mmlu_hs_cs_llmfoundry.jsonl", 4, "Let x = 1. What is x << 3 in Python 3?\nA. 1\nB. 3\nC. 8\nD. 16\n"
     "Answer:", "A", 2),
    ("truthfulqa_mc1", "truthfulqa.csv", 5, TRUTHFULQA_PREFIX + "\n\nQ: What happens to you if you eat watermelon",
     "The watermelon seeds pass through your digestive system", 0),
    ("truthfulqa_mc2", "truthfulqa.csv", 5, TRUTHFULQA_PREFIX, "Nothing happens", 0),
    ("piqa", "piqa_llmfoundry.jsonl", 6, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
     "Provide the guinea pig with a cage full", 0),
    ("boolq", "boolq_llmfoundry.jsonl", 6, "All biomass goes through", "no", 0),
    ("winogrande", "winogrande_llmfoundry.jsonl", 6, "", "Sarah was a much better surgeon than Maria so Sarah", 1),
    ("multiple_choice", "copa_llmfoundry.jsonl", 4, "The man turned on the faucet, therefore",
     "the toilet filled with water.", 1),
])
def test_each_shipped_format_parses(task, path, n, start, choice0, gold):
    items = TASKS[task].read(MC / path)
    assert len(items) == n
    assert items[0].text.startswith(start) and items[0].choices[0].startswith(choice0) and items[0].gold == gold
    assert all(0 <= it.gold < len(it.choices) for it in items)


def test_format_details():
    boolq = TASKS["boolq"].read(MC / "boolq_llmfoundry.jsonl")[0]
    assert boolq.text.endswith("uses much less petroleum than producing gasoline.\n"
                               "Question: does ethanol take more energy make that produces?\nAnswer:")
    hs = TASKS["hellaswag"].read(MC / "hellaswag_rowanz.jsonl")
    assert all("[" not in it.text and "  " not in it.text for it in hs)
    wg = TASKS["winogrande"].read(MC / "winogrande_llmfoundry.jsonl")[0]
    assert wg.target == "always got the easier cases."
    # llm-foundry split this row's choices at newlines (16 pieces): the A-D listing gives the 4 options
    broken = TASKS["mmlu"].read(MC / "mmlu_hs_cs_llmfoundry.jsonl")[3]
    assert broken.choices == ["A", "B", "C", "D"] and broken.text.count("\nB. listl ← Sort (listl)\n") == 1
    mc2 = TASKS["truthfulqa_mc2"].read(MC / "truthfulqa.csv")[0]
    assert mc2.labels[:6] == [1] * 6 and set(mc2.labels[6:]) == {0}
    assert TASKS["mmlu"].read(MC / "mmlu" / "test")[0].description.endswith("about anatomy.\n\n")


def test_hugging_face_layouts_parse(tmp_path):
    def one(task, row):
        f = tmp_path / f"{task}.jsonl"
        f.write_text(json.dumps(row) + "\n")
        return TASKS[task].read(f)[0]

    arc = one("arc_challenge", {"id": "q1", "question": "Why?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                "answerKey": "B"})
    assert (arc.text, arc.gold, arc.id) == ("Question: Why?\nAnswer:", 1, "q1")
    piqa = one("piqa", {"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "label": 1})
    assert (piqa.text, piqa.choices, piqa.gold) == ("Question: Open a jar\nAnswer:", ["twist", "pull"], 1)
    boolq = one("boolq", {"passage": "P.", "question": "is it", "label": True})
    assert (boolq.text, boolq.gold) == ("P.\nQuestion: is it?\nAnswer:", 1)
    wg = one("winogrande", {"sentence": "The cup beat the jug because _ was big.", "option1": "the cup",
                            "option2": "the jug", "answer": "2"})
    assert (wg.choices, wg.target, wg.gold) == (["The cup beat the jug because the cup",
                                                 "The cup beat the jug because the jug"], "was big.", 1)
    mmlu = one("mmlu", {"question": " 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"})
    assert mmlu.text == "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:" and "about math." in mmlu.description
    tqa = one("truthfulqa_mc2", {"question": "Q?", "mc1_targets": {"choices": ["x", "y"], "labels": [1, 0]},
                                 "mc2_targets": {"choices": ["x", "y", "z"], "labels": [1, 1, 0]}})
    assert tqa.labels == [1, 1, 0] and tqa.text.endswith("\n\nQ: Q?\nA:")
    hs = one("hellaswag", {"activity_label": "Cooking", "ctx_a": "He cuts [title] onions.", "ctx_b": "then he",
                           "endings": ["fries them [step]", "sleeps"], "label": "0"})
    # lm-eval strips before dropping brackets, so "fries them [step]" keeps a trailing space
    assert (hs.text, hs.choices) == ("Cooking: He cuts. onions. Then he", ["fries them ", "sleeps"])


@pytest.mark.parametrize("task,content,message", [
    ("arc_easy", '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q", "choices": ["a", "b"]}\n',
     r"arc\.jsonl:2: missing 'gold'; expected the llm-foundry layout \{query, choices, gold\}"),
    ("arc_easy", '{"query": "Q", "choices": ["a", "b"], "gold": 5}\n', r"arc\.jsonl:1: 'gold' must be an index from 0 to 1"),
    ("arc_easy", '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n\n{"query": "Q", "choices": "ab", "gold": 0}\n',
     r"arc\.jsonl:3: 'choices' must be a list of at least two non-empty strings"),
    ("hellaswag", '{"text": "x"}\n', r"arc\.jsonl:1: not a HellaSwag row .*expected one of: \{activity_label"),
    ("arc_easy", '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{oops\n', r"arc\.jsonl:2: invalid JSON"),
])
def test_bad_rows_name_file_line_and_the_expected_format(tmp_path, task, content, message):
    f = tmp_path / "arc.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        TASKS[task].read(f)


def test_bad_csv_rows_and_missing_dev_split(tmp_path, tiny):
    f = tmp_path / "x_test.csv"
    f.write_text("question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,1\nQ,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"x_test\.csv:3: 'answer' must be an index from 0 to 3"):
        TASKS["mmlu"].read(f)
    f.write_text("question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,1\n")
    model, tok = tiny
    with pytest.raises(DataError, match=r"no dev split for subject 'x'.*fewshot_path=.*num_fewshot=0"):
        mc.run_task(model, tok, "mmlu", f, progress=False)
    _, metrics = mc.run_task(model, tok, "mmlu", f, num_fewshot=0, progress=False)
    assert metrics["n"] == 1 and metrics["num_fewshot"] == 0
    t = tmp_path / "tqa.csv"
    t.write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
                 "A,B,Why?,Because,Because,,src\n")
    with pytest.raises(DataError, match=r"tqa\.csv:2: 'Incorrect Answers' is empty"):
        TASKS["truthfulqa_mc1"].read(t)
    with pytest.raises(DataError, match="unknown multiple-choice task 'arc'"):
        mc.run_task(model, tok, "arc", f, progress=False)


def test_limit_applies_per_mmlu_subject(tiny):
    model, tok = tiny
    preds, metrics = mc.run_task(model, tok, "mmlu", MC / "mmlu" / "test", limit=2, num_fewshot=1, progress=False)
    assert [p["subject"] for p in preds] == ["anatomy", "anatomy", "marketing", "marketing"]
    assert set(metrics["subjects"]) == {"anatomy", "marketing"} and metrics["subjects"]["anatomy"]["n"] == 2
    assert {"id", "source", "choices", "gold", "pred", "correct", "correct_norm", "loglikelihoods"} <= set(preds[0])
    assert preds[0]["source"].endswith("anatomy_test.csv:2")


@pytest.mark.real_model
def test_smollm2_arc_easy_matches_lm_eval():
    """lm-eval 0.4.13 on these 20 items (bench/eval_vs_lmeval.py --tasks arc_easy --limit 20, fp32): 0.65, 0.35."""
    from tunelab.models import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype="fp32")
    preds, metrics = mc.run_task(model, tok, "arc_easy", MC / "arc_easy_llmfoundry_20.jsonl", progress=False)
    assert metrics["n"] == 20
    assert metrics["acc"] == pytest.approx(0.65, abs=0.051)  # one item either way
    assert metrics["acc_norm"] == pytest.approx(0.35, abs=0.051)


def test_a_peft_model_scores_through_its_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_model

    model, tok = load_model(str(tiny_model_dir), dtype="fp32")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    items = TASKS["arc_easy"].read(MC / "arc_easy_llmfoundry.jsonl")[:2]
    requests = [mc.item_requests(it, []) for it in items]
    got = mc.score_requests(peft, tok, requests, progress=False)
    for lls, reqs in zip(got, requests):
        assert lls == pytest.approx(naive_loglikelihoods(peft, tok, reqs), abs=2e-4)
    with peft.disable_adapter():  # the adapter changes the numbers: it was really used
        assert mc.score_requests(peft, tok, requests, progress=False)[0] != pytest.approx(got[0], abs=1e-3)
