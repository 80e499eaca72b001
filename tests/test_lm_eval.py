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
def hf_folder(tmp_path_factory):
    """A tiny (untrained) Complexity model saved as a Hugging Face folder with its tokenizer."""
    import shutil

    import torch

    from complexity import ComplexityConfig, ComplexityForCausalLM

    root = tmp_path_factory.mktemp("lm-eval")
    tok, _ = make_tiny_data(root, vocab_size=VOCAB, n_docs=60)
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
