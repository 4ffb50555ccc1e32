"""gemma3 as an lm-evaluation-harness model, against lm-eval's own `hf` backend on the same weights.

No hub here: the tasks are YAML files over JSONL documents the test writes (a multiple-choice task, a
rolling-loglikelihood task with texts longer than the rolling window, a generate_until task), and both
backends read the embedded 270M converted to an fp32 HF checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'gemma3[eval]')")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gemma3.eval.harness  # noqa: E402,F401  (registers --model gemma3)
from gemma3.errors import Gemma3Error  # noqa: E402

TASKS = ["g3_choice", "g3_rolling", "g3_gen"]
MAX_LENGTH = 96  # short, so the rolling task's texts span several windows

CHOICE = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "four", "ten"], "answer": 1},
    {"question": "Which planet is known as the red planet?", "choices": ["Venus", "Jupiter", "Mars", "Saturn"],
     "answer": 2},
    {"question": "What do bees make?", "choices": ["milk", "silk", "wax and honey", "bread for the queen"],
     "answer": 2},
    {"question": "Complete: to be or not to", "choices": [" be", " go", " see"], "answer": 0},  # spaces move
]
TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 24},
    {"text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"},
    {"text": "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories to "
             "the children every evening. They gathered on the pier when the sun went down, and he began with the "
             "same words each night: long ago, before the lighthouse, the sea was a kinder place."},
]
GEN = [
    {"question": "Q: What is the capital of Italy?\nA:", "answer": " Rome"},
    {"question": "Q: What is two plus two?\nA:", "answer": " Two plus two is 4."},
    {"question": "The opposite of hot is", "answer": " cold."},
    {"question": "List three colours: red,", "answer": " green"},
]


def write_tasks(directory):
    yaml = {
        "g3_choice": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm""",
        "g3_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte""",
        "g3_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  do_sample: false
  max_gen_toks: 12
metric_list:
  - metric: exact_match""",
    }
    for (name, body), rows in zip(yaml.items(), (CHOICE, TEXTS, GEN)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}\n")
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, gguf_path):
    from gemma3.convert import convert

    out = tmp_path_factory.mktemp("hf_fp32") / "g3"
    convert(gguf_path, out, to="hf", dtype="float32", progress=False)
    return out


def evaluate(model, model_args, task_dir, batch_size=1):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size,
                                  device="cpu", log_samples=True, task_manager=TaskManager(include_path=str(task_dir)))
    samples = {task: [s["resps"] for s in sorted(rows, key=lambda s: s["doc_id"])]
               for task, rows in out["samples"].items()}
    return out["results"], samples


@pytest.fixture(scope="module")
def ours(hf_checkpoint):
    """One gemma3 model for the module (lm-eval takes an LM instance as well as a name)."""
    from gemma3.eval.harness import Gemma3LM

    return Gemma3LM(pretrained=str(hf_checkpoint), dtype="float32", max_length=MAX_LENGTH, progress=False)


@pytest.fixture(scope="module")
def runs(hf_checkpoint, task_dir, ours):
    args = f"pretrained={hf_checkpoint},dtype=float32,max_length={MAX_LENGTH}"
    out = {"hf": evaluate("hf", args, task_dir), "gemma3": evaluate(ours, None, task_dir)}
    ours._batch = 4
    try:
        out["gemma3_b4"] = evaluate(ours, None, task_dir, batch_size=4)
    finally:
        ours._batch = 1
    return out


def flat_scores(samples, task):
    """Every (log-likelihood, is_greedy) pair of a task's responses, in document and choice order."""
    def walk(x):
        if isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[1], bool):
            yield float(x[0]), x[1]
        else:
            for item in x:
                yield from walk(item)
    return list(walk(samples[task]))


def test_loglikelihoods_equal_lm_evals_hf_backend(runs):
    (_, ours), (_, ref) = runs["gemma3"], runs["hf"]
    for task in ("g3_choice",):
        a, b = flat_scores(ours, task), flat_scores(ref, task)
        assert len(a) == len(b) == sum(len(d["choices"]) for d in CHOICE)
        for (lp, greedy), (lp_ref, greedy_ref) in zip(a, b):
            assert abs(lp - lp_ref) < 1e-4, (lp, lp_ref)
            assert greedy == greedy_ref
    rolling = [doc[0][0] for doc in ours["g3_rolling"]]
    rolling_ref = [doc[0][0] for doc in ref["g3_rolling"]]
    assert len(rolling) == len(TEXTS)
    for lp, lp_ref in zip(rolling, rolling_ref):
        assert abs(lp - lp_ref) < 1e-4 * max(1.0, abs(lp_ref) / 100), (lp, lp_ref)


def test_rolling_windows_are_crossed(hf_checkpoint):
    """The first text is longer than max_length, so it is scored over several windows (the case that matters)."""
    from gemma3.text.tokenizer import Tokenizer

    assert len(Tokenizer.from_dir(hf_checkpoint).encode(TEXTS[0]["text"])) > 2 * MAX_LENGTH


def test_greedy_generation_equals_hf_and_the_metrics_agree(runs):
    (results, ours), (results_ref, ref) = runs["gemma3"], runs["hf"]
    assert ours["g3_gen"] == ref["g3_gen"]
    assert any(doc[0] for doc in ours["g3_gen"])  # something was generated
    for task in TASKS:
        for metric, value in results_ref[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert results[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_batches_score_as_single_requests(runs):
    (_, one), (_, four) = runs["gemma3"], runs["gemma3_b4"]
    for task in ("g3_choice",):
        for (lp, greedy), (lp4, greedy4) in zip(flat_scores(one, task), flat_scores(four, task)):
            assert abs(lp - lp4) < 1e-4 and greedy == greedy4
    for a, b in zip(one["g3_rolling"], four["g3_rolling"]):
        assert abs(a[0][0] - b[0][0]) < 1e-3
    assert one["g3_gen"] == four["g3_gen"]


def test_shared_contexts_are_scored_once(ours, monkeypatch):
    """Choices that differ only in their last token read one forward pass; the scores are unchanged."""
    lm = ours
    monkeypatch.setattr(lm, "_batch", 8)
    context = lm.tok_encode("The capital of France is")
    requests = [(None, context, lm.tok_encode(w, add_special_tokens=False)) for w in (" Paris", " Rome", " Lyon")]
    assert all(len(r[2]) == 1 for r in requests)
    rows = []
    original = lm._score_batch
    monkeypatch.setattr(lm, "_score_batch", lambda batch: rows.append(len(batch)) or original(batch))
    together = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert rows == [1]
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    assert [round(x[0], 4) for x in together] == [round(x[0], 4) for x in alone]
    assert together[0][0] > together[1][0]  # "Paris" is the likelier capital of France


def test_bad_model_args_are_clear_errors(hf_checkpoint):
    from gemma3.eval.harness import Gemma3LM

    with pytest.raises(Gemma3Error, match="unknown gemma3 model_args: colour"):
        Gemma3LM(pretrained=str(hf_checkpoint), colour="red")
    with pytest.raises(Gemma3Error, match="dtype must be one of"):
        Gemma3LM(pretrained=str(hf_checkpoint), dtype="float16")
    with pytest.raises(Gemma3Error, match="quantize must be"):
        Gemma3LM(pretrained=str(hf_checkpoint), quantize="int3")
    with pytest.raises(Gemma3Error, match="batch_size"):
        Gemma3LM(pretrained=str(hf_checkpoint), batch_size="many")
    with pytest.raises(Gemma3Error, match="no such file"):
        Gemma3LM(pretrained="/nonexistent/model")


def test_cli_runs_lm_eval_with_gemma3_registered(task_dir, tmp_path):
    """`gemma3 lm-eval` on the embedded Q4_K_M model (its own blocks, the default) prints lm-eval's table;
    a bad model arg is one line and exit status 2."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "gemma3", "lm-eval", "--model", "gemma3", "--model_args",
                         "progress=False", "--tasks", "g3_choice", "--include_path", str(task_dir),
                         "--limit", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "g3_choice" in ok.stdout and "acc" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gemma3", "lm-eval", "--model", "gemma3", "--model_args", "colour=red",
                          "--tasks", "g3_choice", "--include_path", str(task_dir)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "gemma3 lm-eval: error: unknown gemma3 model_args: colour (see gemma3.eval.harness.Gemma3LM)")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_rendering_equals_transformers_apply_chat_template(hf_checkpoint, generation_prompt):
    """--apply_chat_template: the prompt string equals what the hf backend renders with the checkpoint's template
    (continue_final_message when there is no generation prompt, as hf does)."""
    from transformers import AutoTokenizer

    from gemma3.eval.harness import render_chat_for_lm_eval

    tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint)
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of Italy?"},
         {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "And of France?"}],
        [{"role": "user", "content": "Q: 3 + 4?"}, {"role": "assistant", "content": "A: 7"},
         {"role": "user", "content": "Q: 5 + 1?"}, {"role": "assistant", "content": "A:"}],
    ]
    for messages in conversations:
        if generation_prompt and messages[-1]["role"] == "assistant":
            continue
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 continue_final_message=not generation_prompt)
        assert render_chat_for_lm_eval(messages, generation_prompt) == expected
