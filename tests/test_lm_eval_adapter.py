"""gpt_jax/eval/lm_eval_adapter.py: a run as lm-evaluation-harness's model "gpt_jax" (skipped
without lm-eval: pip install -r requirements-lm-eval.txt).

The default tests check the adapter's request types against lm-eval's own conventions (its
rolling windows, its empty-context rule, its task format) on conftest's `trained_run`; the slow
ones run lm-eval itself: simple_evaluate on a local task, whose scores must equal gpt_jax's own
harness (gpt_jax.eval.tasks) on the same examples, and the README's command line."""

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

import lm_eval
import lm_eval.tasks
import lm_eval.utils
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from gpt_jax.eval import lm_eval_adapter, tasks
from gpt_jax.generate import SamplingParams, generate

# The trained_run's corpus is `def f{i}(x):\n    return x * {i} + {i % 7}\n\n`: its char
# tokenizer knows only these characters.
DOC = "def f12(x):\n    return x * 12 + 5\n\ndef f13(x):\n    return x * 13 + 6\n\n"


def _requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _task_lines() -> list[dict]:
    """A multiple-choice task in gpt_jax's task-file format: which number multiplies x."""
    rows = [{"task": "times", "delimiter": " "}]
    for i in range(10, 22):
        rows.append({"context": f"def f{i}(x):\n    return x *",
                     "choices": [str(i), str(i + 3), f"{i % 7} + {i}"], "label": 0})
    rows += [{"context": f"def f{i}(x):\n    return x *", "choices": [str(i), str(i + 1)],
              "label": 0, "split": "train"} for i in (30, 31, 32)]
    return rows


def _completion_lines() -> list[dict]:
    rows = [{"task": "plus", "delimiter": " "}]
    rows += [{"context": f"def f{i}(x):\n    return x * {i} +", "target": str(i % 7)}
             for i in range(40, 50)]
    return rows


@pytest.fixture
def task_files(tmp_path):
    """(multiple-choice task, completion task) files in gpt_jax's format, in tmp_path."""
    paths = []
    for rows in (_task_lines(), _completion_lines()):
        path = tmp_path / f"{rows[0]['task']}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def lm(trained_run):
    """The adapter over trained_run's newest checkpoint (context 16, so long texts slide)."""
    return lm_eval_adapter.GptJaxLM(workdir=str(trained_run), batch_size=4)


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Hugging Face datasets' cache (lm-eval reads task files through it) in tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_registered_under_its_name():
    assert get_model("gpt_jax") is lm_eval_adapter.GptJaxLM
    with pytest.raises(ValueError, match="workdir=DIR"):
        lm_eval_adapter.GptJaxLM.create_from_arg_string("checkpoint=best", {"batch_size": 1})


def test_loglikelihoods_follow_lm_evals_conventions(lm):
    tok = lm.tokenizer
    pairs = [("def f12(x):\n    return x *", " 12"), ("def", "f"), ("", "def f1(x)"),
             ("d" * 40, "ef " * 9),  # Longer than the context of 16: truncated and windowed.
             ("def f1(x):\n", "    return"),  # lm-eval moves a context's trailing whitespace
             ("\n", "def")]  # into the continuation (TemplateLM._encode_pair), even all of it.
    got = lm.loglikelihood(_requests("loglikelihood", *pairs))
    assert all(isinstance(ll, float) and isinstance(g, bool) for ll, g in got)
    # No end-of-text token in a char vocab: an empty context's first token is the context.
    want = lm.scorer.loglikelihood([(tok.encode(c), tok.encode(x)) for c, x in pairs[:2]]
                                   + [(tok.encode("d"), tok.encode("ef f1(x)"))]
                                   + [(tok.encode(pairs[3][0]), tok.encode(pairs[3][1])),
                                      (tok.encode("def f1(x):"), tok.encode("\n    return")),
                                      (tok.encode("\n"), tok.encode("def"))])
    assert got == want

    # loglikelihood_rolling: lm-eval's own windows (as its Hugging Face model builds them), each
    # scored as a (context, continuation) request, add up to the adapter's answer.
    ids = tok.encode(DOC).tolist()
    assert len(ids) > 3 * lm.max_length
    windows = [lm_eval.utils.make_disjoint_window(w) for w in lm_eval.utils.get_rolling_token_windows(
        ids[1:], prefix_token=ids[0], max_seq_len=lm.max_length, context_len=1)]
    want = sum(ll for ll, _ in lm.scorer.loglikelihood(windows))
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", (DOC,), ("d",)))
    assert got[0] == pytest.approx(want, rel=1e-6) and got[1] == 0.0
    assert all(isinstance(x, float) for x in got)

    # With an end-of-text token (here: "\n" playing it), it is the context of an empty one and
    # of every rolling document, whose first token is then scored too.
    with_eot = copy.copy(lm)
    with_eot.tokenizer = copy.copy(tok)
    with_eot.tokenizer.eot_id = eot = int(tok.encode("\n")[0])
    assert with_eot.rolling_requests("def") == ([eot], tok.encode("def").tolist())
    got = with_eot.loglikelihood(_requests("loglikelihood", ("", "def")))
    assert got == lm.scorer.loglikelihood([([eot], tok.encode("def"))])


@pytest.mark.slow
def test_generate_until_is_greedy_decoding_cut_at_until(lm):
    # Context 16, 6 new tokens: prompts keep their last 10 tokens (HFLM's rule), so each row's
    # text is its own greedy continuation, whatever the batch (and its filler row) holds.
    prompts = ["def f12(x):\n", "def f3", "d" * 40, "def f1(x):\n    return x", "de"]
    kwargs = {"until": ["\n\n", "x"], "max_gen_toks": 6}
    args = [(p, kwargs) for p in prompts] + [("def f", {**kwargs, "until": "(", "do_sample": False})]
    got = lm.generate_until(_requests("generate_until", *args))
    assert len(got) == len(args) and all(isinstance(t, str) for t in got)
    tok = lm.tokenizer
    ids = [tok.encode(p)[-(lm.max_length - 6):] for p, _ in args]
    outs = generate(lm.model, lm.params, ids, 6, jax.random.key(0), SamplingParams(temperature=0))
    for (prompt, kw), row, out, text in zip(args, ids, outs, got, strict=True):
        want = tok.decode(out[len(row):].tolist())
        for stop in np.atleast_1d(kw["until"]):
            want = want.split(str(stop))[0]
        assert text == want, prompt


def _harness(lm, folder, names, num_fewshot=0, log_samples=False) -> dict:
    """lm-eval's simple_evaluate of tasks `names` (found in `folder` only) with the adapter."""
    tm = lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm,
                                   num_fewshot=num_fewshot, log_samples=log_samples)


def _harness_results(lm, folder, names, num_fewshot=0) -> dict:
    return _harness(lm, folder, names, num_fewshot)["results"]


def test_exported_task_is_lm_evals_view_of_the_same_examples(task_files, tmp_path):
    task = tasks.load_task_file(task_files[0])
    yaml = lm_eval_adapter.write_task(task, tmp_path / "lm_eval_tasks")
    tm = lm_eval.tasks.TaskManager(include_path=str(yaml.parent), include_defaults=False)
    loaded = tm.load(["times"])["tasks"]
    (lm_task,) = loaded.values() if isinstance(loaded, dict) else loaded
    docs = list(lm_task.test_docs())
    assert len(docs) == len(task.test)
    for doc, example in zip(docs, task.test, strict=True):
        assert lm_task.doc_to_text(doc) == example.context
        assert lm_task.doc_to_choice(doc) == list(example.choices)
        assert lm_task.doc_to_target(doc) == example.label
    assert lm_task.config.target_delimiter == task.delimiter
    assert lm_task.config.fewshot_delimiter == task.separator
    assert len(list(lm_task.fewshot_docs())) == len(task.train)


@pytest.mark.slow
def test_lm_eval_scores_equal_gpt_jax_harness(lm, task_files, tmp_path):
    folder = tmp_path / "lm_eval_tasks"
    mc, completion = (tasks.load_task_file(p) for p in task_files)
    for task in (mc, completion):
        lm_eval_adapter.write_task(task, folder)
    out = _harness(lm, folder, ["times", "plus"], log_samples=True)
    results, tok = out["results"], lm.tokenizer
    # Request by request, lm-eval asks for (and gets) what gpt_jax's harness scores: the context,
    # then the delimiter and the answer.
    for task, name in ((mc, "times"), (completion, "plus")):
        samples = sorted(out["samples"][name], key=lambda x: x["doc_id"])
        assert len(samples) == len(task.test)
        for sample, example in zip(samples, task.test, strict=True):
            answers = example.choices or (example.target,)
            want = lm.scorer.loglikelihood([(tok.encode(example.context),
                                             tok.encode(task.delimiter + a)) for a in answers])
            got = [tuple(r[0]) for r in sample["resps"]]  # One answer per request.
            assert [a for a, _ in got] == pytest.approx([a for a, _ in want], rel=1e-6)
            assert [g for _, g in got] == [g for _, g in want]
    ours = tasks.evaluate_task(lm.scorer, lm.tokenizer, mc, 0)
    theirs = results["times"]
    assert theirs["sample_len"] == ours["n"] == len(mc.test)
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert theirs["acc_stderr,none"] == pytest.approx(ours["acc_stderr"], abs=1e-12)
    # Both divide a choice's log-likelihood by its characters (delimiter left out) for acc_norm.
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    # A completion task's lm-eval acc (is the target the greedy continuation?) is exact_match.
    ours = tasks.evaluate_task(lm.scorer, lm.tokenizer, completion, 0)
    assert results["plus"]["acc,none"] == pytest.approx(ours["exact_match"], abs=1e-12)
    # Few-shot runs too (lm-eval draws its own examples, so only 0-shot matches exactly).
    assert 0.0 <= _harness_results(lm, folder, ["times"], 2)["times"]["acc,none"] <= 1.0


def _write_yaml(folder, name: str, rows: list[dict], **config) -> None:
    """A handwritten lm-eval task over a local JSONL file (JSON is YAML)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              **config}
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1))


@pytest.mark.slow
def test_lm_eval_perplexity_and_generation_tasks(lm, tmp_path):
    from gpt_jax.eval import scoring

    folder, tok = tmp_path / "lm_eval_tasks", lm.tokenizer
    docs = [DOC, DOC[20:], "def f7(x):\n    return x * 7 + 0\n"]
    _write_yaml(folder, "docs", [{"text": d} for d in docs], output_type="loglikelihood_rolling",
                doc_to_text="", doc_to_target="{{text}}",
                metric_list=[{"metric": m} for m in ("word_perplexity", "bits_per_byte")])
    prompts = [f"def f{i}(x):\n    return x * {i} + " for i in range(50, 56)]
    targets = [str(i % 7) for i in range(50, 56)]
    _write_yaml(folder, "gen", [{"context": c, "target": t} for c, t in zip(prompts, targets,
                                                                            strict=True)],
                output_type="generate_until", doc_to_text="{{context}}", doc_to_target="{{target}}",
                generation_kwargs={"until": ["\n", "x"], "max_gen_toks": 2, "do_sample": False},
                metric_list=[{"metric": "exact_match", "aggregation": "mean",
                              "higher_is_better": True}])
    results = _harness_results(lm, folder, ["docs", "gen"])

    # bits per byte: every token after the first, each on up to max_length tokens before it.
    ids = [tok.encode(d) for d in docs]
    nats = -sum(ll for ll, _ in lm.scorer.loglikelihood([(i[:1], i[1:]) for i in ids]))
    want = scoring.bits_per_byte(nats, sum(len(d.encode()) for d in docs))
    assert results["docs"]["bits_per_byte,none"] == pytest.approx(want, rel=1e-9)

    # exact match: greedy decoding of each prompt's last max_length - 2 tokens, cut at "\n", "x".
    rows = [tok.encode(p)[-(lm.max_length - 2):] for p in prompts]
    outs = generate(lm.model, lm.params, rows, 2, jax.random.key(0), SamplingParams(0.0))
    texts = [tok.decode(o[len(r):].tolist()).split("\n")[0].split("x")[0]
             for r, o in zip(rows, outs, strict=True)]
    want = np.mean([t == target for t, target in zip(texts, targets, strict=True)])
    assert results["gen"]["exact_match,none"] == pytest.approx(want, abs=1e-12)


@pytest.mark.slow
def test_readme_command_prints_lm_evals_table(trained_run, task_files, tmp_path):
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu"}
    module = [sys.executable, "-m", "gpt_jax.eval.lm_eval_adapter"]
    folder = tmp_path / "lm_eval_tasks"
    r = subprocess.run([*module, "export-task", str(task_files[0]), str(folder)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert (folder / "times.yaml").is_file() and "--include_path" in r.stdout
    r = subprocess.run([*module, "--model", "gpt_jax", "--model_args",
                        f"workdir={trained_run},checkpoint=best", "--tasks", "times",
                        "--include_path", str(folder), "--batch_size", "4"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert any("times" in line and "acc" in line for line in table), r.stdout
    assert any("acc_norm" in line for line in table), r.stdout
    assert f"gpt_jax ({{'workdir': '{trained_run}'" in r.stdout  # lm-eval's header line.
