"""The lm-evaluation-harness bridge on a local task (a YAML over a jsonl file in tmp; no download).

lm-eval is a pinned test dependency (lm-eval==0.4.13, accelerate): this test FAILS when it is
missing, it does not skip."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data  # noqa: E402

VOCAB = 384

MC_TASK = """\
task: complexity_local_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PPL_TASK = """\
task: complexity_local_ppl
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """(tokenizer folder, prepared data folder recording that tokenizer)."""
    return make_tiny_data(tmp_path_factory.mktemp("lm-eval-data"), vocab_size=VOCAB, n_docs=60)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tiny_data):
    """A tiny (untrained) Complexity model saved as a Hugging Face folder with its tokenizer."""
    import shutil

    import torch

    from complexity import ComplexityConfig, ComplexityForCausalLM

    root = tmp_path_factory.mktemp("lm-eval")
    tok, _ = tiny_data
    torch.manual_seed(0)
    config = ComplexityConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        shared_expert=True,
        mu_mode="guidance",
    )
    folder = root / "model"
    ComplexityForCausalLM(config).save_pretrained(folder)
    for f in Path(tok).iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    return folder


def test_lm_eval_is_installed():
    import lm_eval  # noqa: F401  (a missing pinned dependency must fail the suite)
    from lm_eval.models.huggingface import HFLM  # noqa: F401


def test_local_tasks_run_through_the_harness(hf_folder, tmp_path, monkeypatch, capsys):
    from complexity.experiments.lm_eval_bridge import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [
        {"question": "The cat sees", "choices": [" the ball.", " a book.", " the tree."], "answer": 0},
        {"question": "A dog eats", "choices": [" some code.", " the data."], "answer": 1},
        {"question": "The robot builds", "choices": [" a song.", " the house.", " a letter."], "answer": 2},
    ]
    mc_data = tmp_path / "mc.jsonl"
    mc_data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ppl_data = tmp_path / "ppl.jsonl"
    ppl_data.write_text(
        "".join(
            json.dumps({"text": t}) + "\n" for t in ["The cat sees the ball today.", "My friend reads a book at night."]
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=mc_data))
    (tasks / "ppl.yaml").write_text(PPL_TASK.format(data=ppl_data))

    result = run_lm_eval(
        hf_folder, ["complexity_local_mc", "complexity_local_ppl"], include_path=tasks, batch_size=2, device="cpu"
    )
    mc = result["results"]["complexity_local_mc"]
    acc = mc.get("acc,none", mc.get("acc"))
    assert acc is not None and 0.0 <= acc <= 1.0
    ppl = result["results"]["complexity_local_ppl"]
    bpb = ppl.get("bits_per_byte,none", ppl.get("bits_per_byte"))
    # An untrained model over a 384-token vocabulary: about log2(384) bits per token, a few bytes per token.
    assert bpb is not None and math.isfinite(bpb) and 0.5 < bpb < 10
    assert result["n_samples"]["complexity_local_mc"]["effective"] == 3
    json.dumps(result)  # serialisable

    limited = run_lm_eval(hf_folder, "complexity_local_mc", include_path=tasks, limit=1, batch_size=1, device="cpu")
    assert limited["n_samples"]["complexity_local_mc"]["effective"] == 1

    # The same through `complexity eval --tasks` (no --data: only the harness).
    from complexity.cli import main

    assert (
        main(
            [
                "eval",
                str(hf_folder),
                "--tasks",
                "complexity_local_mc",
                "--include-path",
                str(tasks),
                "--limit",
                "2",
                "--batch-size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["lm_eval"]["n_samples"]["complexity_local_mc"]["effective"] == 2


# ----------------------------------------------------------------------------- without the harness


class _Recorder:
    """Stands in for load_for_eval, HFLM, TaskManager and simple_evaluate: records each call, runs
    nothing, so these tests pin what run_lm_eval hands the harness and what it makes of the answer."""

    def __init__(self, monkeypatch, *, seq_len=None, known_tasks=(), answer=None):
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks

        import complexity.train.eval

        self.calls, self.seq_len, self.known_tasks, self.answer = [], seq_len, set(known_tasks), answer
        self.model = _FakeModel()
        monkeypatch.setattr(complexity.train.eval, "load_for_eval", self.load_for_eval)
        monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", self.hflm)
        monkeypatch.setattr(lm_eval.tasks, "TaskManager", self.task_manager)
        monkeypatch.setattr(lm_eval, "simple_evaluate", self.simple_evaluate)

    def load_for_eval(self, source, device):
        self.calls.append(("load", source, device))
        return self.model, {"seq_len": self.seq_len}

    def hflm(self, **kwargs):
        self.calls.append(("HFLM", kwargs))
        return "lm"

    def task_manager(self, **kwargs):
        self.calls.append(("TaskManager", kwargs))
        known = self.known_tasks if kwargs.get("include_defaults") is False else self.known_tasks | {"hellaswag"}
        return type("TaskManager", (), {"all_tasks": sorted(known)})()

    def simple_evaluate(self, **kwargs):
        self.calls.append(("evaluate", kwargs))
        return self.answer


class _FakeModel:
    config = type("Config", (), {"max_position_embeddings": 4096})()
    evaluated = False

    def eval(self):
        self.evaluated = True
        return self


def _evaluate_kwargs(limit=None, seed=0, num_fewshot=None):
    """simple_evaluate's arguments for the task "t" without include_path."""
    return dict(
        model="lm",
        tasks=["t"],
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=None,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def _folder(path: Path, *names: str) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_text("{}")
    return path


def _training_checkpoint(path: Path, data) -> Path:
    """What run_lm_eval reads of a training checkpoint before loading it: meta.json's data path."""
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": 3, "config": {"data": {"path": str(data)}}}))
    return path


NO_TOKENIZER = "no tokenizer found (neither in the folder nor in the run's data)"


@pytest.mark.parametrize(
    "tasks,device,where,error,message",
    [
        ("", "cpu", "tokenizer", ValueError, "lm-eval: no tasks given"),
        (",", "cpu", "tokenizer", ValueError, "lm-eval: no tasks given"),
        ([], "cpu", "tokenizer", ValueError, "lm-eval: no tasks given"),
        ("", "bogus", "missing", ValueError, "lm-eval: no tasks given"),
        ("t", "bogus", "missing", ValueError, "device: 'bogus' is not a device (e.g. 'cpu', 'cuda', 'cuda:1', 'auto')"),
        ("t", "cpu", "missing", FileNotFoundError, "checkpoint '{path}' does not exist"),
        ("t", "cpu", "no tokenizer", FileNotFoundError, "{path}: " + NO_TOKENIZER),
        ("t", "cpu", "no data", FileNotFoundError, "{path}: " + NO_TOKENIZER),
    ],
)
def test_bad_arguments_are_named_before_a_model_is_loaded(tmp_path, monkeypatch, tasks, device, where, error, message):
    """The tasks, then the device, then the checkpoint and its tokenizer: the first wrong one is
    the error, raised before any weight is read."""
    from complexity.experiments.lm_eval_bridge import run_lm_eval

    recorder = _Recorder(monkeypatch)
    path = {
        "tokenizer": lambda: _folder(tmp_path / "hf", "config.json", "tokenizer.json"),
        "missing": lambda: tmp_path / "missing",
        "no tokenizer": lambda: _folder(tmp_path / "hf", "config.json"),
        "no data": lambda: _training_checkpoint(tmp_path / "step_3", tmp_path / "gone"),
    }[where]()
    with pytest.raises(error) as err:
        run_lm_eval(path, tasks, device=device)
    assert str(err.value) == message.format(path=path)
    assert recorder.calls == []


def test_what_the_harness_is_given_and_what_comes_back(tiny_data, tmp_path, monkeypatch):
    """A run folder is read from its final/ export; the tasks string is split; a whole-number
    float limit is a count; max_length defaults to min(max_position_embeddings, 2048); every seed
    is `seed`; the harness's answer comes back JSON-safe (NaN -> None, numpy scalars -> numbers,
    tuples -> lists, other objects -> str)."""
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerFast

    from complexity.experiments.lm_eval_bridge import run_lm_eval

    tok, _ = tiny_data
    run = tmp_path / "run"
    final = _folder(run / "final", "config.json")
    for f in tok.iterdir():
        (final / f.name).write_bytes(f.read_bytes())
    answer = {
        "results": {"t": {"acc,none": np.float32(0.5), "ppl": float("nan"), "range": (1, np.int64(2))}},
        "versions": {"t": 1.0},
        "n-samples": {"t": {"effective": 3}},
        "configs": {"ignored": True},
    }
    recorder = _Recorder(monkeypatch, answer=answer)
    result = run_lm_eval(run, "t,", limit=2.0, batch_size=3, num_fewshot=1, seed=5, device="cpu")

    load, hflm, evaluate = recorder.calls
    assert load == ("load", final, torch.device("cpu"))
    assert recorder.model.evaluated
    assert hflm[1]["pretrained"] is recorder.model and isinstance(hflm[1]["tokenizer"], PreTrainedTokenizerFast)
    assert {k: v for k, v in hflm[1].items() if k not in ("pretrained", "tokenizer")} == dict(
        batch_size=3, max_length=2048
    )
    assert evaluate == ("evaluate", _evaluate_kwargs(limit=2, seed=5, num_fewshot=1))
    assert type(evaluate[1]["limit"]) is int
    assert result == {
        "results": {"t": {"acc,none": 0.5, "ppl": None, "range": [1, 2]}},
        "versions": {"t": 1.0},
        "n_samples": {"t": {"effective": 3}},
        "config": {
            "checkpoint": str(final),
            "tokenizer": str(final),
            "limit": 2,
            "batch_size": 3,
            "num_fewshot": 1,
            "max_length": 2048,
        },
    }
    json.dumps(result, allow_nan=False)


def test_a_training_checkpoint_uses_its_datas_tokenizer_and_seq_len(tiny_data, tmp_path, monkeypatch):
    from complexity.experiments.lm_eval_bridge import run_lm_eval

    tok, data = tiny_data
    ckpt = _training_checkpoint(tmp_path / "step_3", data)
    recorder = _Recorder(monkeypatch, seq_len=96, answer={"results": {"t": {"x": object}}})
    result = run_lm_eval(ckpt, ["t"], limit=0.5, device="cpu")
    assert recorder.calls[1][1]["max_length"] == 96
    assert recorder.calls[2] == ("evaluate", _evaluate_kwargs(limit=0.5))
    assert result["results"] == {"t": {"x": str(object)}}
    assert result["config"] == {
        "checkpoint": str(ckpt),
        "tokenizer": str(tok),
        "limit": 0.5,
        "batch_size": 8,
        "num_fewshot": None,
        "max_length": 96,
    }
    run_lm_eval(ckpt, ["t"], max_length=64, device="cpu")
    assert recorder.calls[-2][1]["max_length"] == 64


def test_include_path_indexes_only_its_own_tasks_unless_a_task_is_elsewhere(hf_folder, tmp_path, monkeypatch):
    """Indexing the harness's own task files is slow: a folder of local tasks is read alone, and
    the full index is built only when a task name is not in it."""
    from complexity.experiments.lm_eval_bridge import run_lm_eval

    recorder = _Recorder(monkeypatch, known_tasks={"mine"})
    assert run_lm_eval(hf_folder, ["mine"], include_path=tmp_path, device="cpu") == {}  # None: a rank > 0
    own = ("TaskManager", dict(include_path=str(tmp_path), include_defaults=False))
    assert [c for c in recorder.calls if c[0] == "TaskManager"] == [own]
    assert recorder.calls[-1][1]["task_manager"].all_tasks == ["mine"]

    recorder.calls.clear()
    run_lm_eval(hf_folder, ["mine", "hellaswag", {"task": "inline"}], include_path=tmp_path, device="cpu")
    everything = ("TaskManager", dict(include_path=str(tmp_path)))
    assert [c for c in recorder.calls if c[0] == "TaskManager"] == [own, everything]
    assert recorder.calls[-1][1]["task_manager"].all_tasks == ["hellaswag", "mine"]
