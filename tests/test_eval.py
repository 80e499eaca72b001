"""Held-out evaluation: numbers equal a hand computation; expert shares; the `eval` command."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, tiny_config  # noqa: E402

import complexity  # noqa: E402,F401
from complexity import ComplexityConfig, ComplexityForCausalLM  # noqa: E402
from complexity.cli import main as cli_main  # noqa: E402
from complexity.train import train  # noqa: E402
from complexity.train.eval import evaluate, evaluate_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("eval")
    _, data = make_tiny_data(root / "fx")
    run = root / "run"
    train(tiny_config(data, **{"training.max_steps": 4, "eval.at_end": False}), out_dir=run)
    yield data, run


def _val_windows(data: Path, seq_len: int) -> torch.Tensor:
    import numpy as np

    manifest = json.loads((data / "manifest.json").read_text())
    stream = np.concatenate([np.load(data / s["file"]) for s in manifest["splits"]["val"]["shards"]]).astype(np.int64)
    n = (len(stream) - 1) // seq_len
    return torch.stack([torch.from_numpy(stream[i * seq_len : i * seq_len + seq_len + 1]) for i in range(n)]), manifest


def test_eval_equals_hand_computation(setup):
    data, run = setup
    seq_len = 32
    result = evaluate_checkpoint(run / "final", data, batch_size=3, seq_len=seq_len)
    model = ComplexityForCausalLM.from_pretrained(run / "final").eval()
    windows, manifest = _val_windows(data, seq_len)
    nats, n = 0.0, 0
    with torch.no_grad():
        for w in windows:  # one window at a time, by hand
            logp = F.log_softmax(model(w[None, :-1]).logits[0].double(), -1)
            nats -= logp.gather(-1, w[1:, None]).sum().item()
            n += seq_len
    val = manifest["splits"]["val"]
    assert result["val_tokens"] == n
    assert result["val_loss"] == pytest.approx(nats / n, rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(nats / n), rel=1e-5)
    # bpb: the evaluated fraction of the split's tokens carries that fraction of its bytes.
    assert result["val_bpb"] == pytest.approx(nats / math.log(2) / (val["text_bytes"] * n / val["tokens"]), rel=1e-5)
    # token_routed without INL: shares are the table's bincount over the evaluated ids.
    table = model.model.token_to_expert
    expected = torch.bincount(table[windows[:, :-1].reshape(-1)], minlength=4).double() / n
    assert result["expert_shares"] == pytest.approx(expected.tolist(), abs=1e-6)
    # A training checkpoint of the same step gives the same numbers.
    from_ckpt = evaluate_checkpoint(run, data, batch_size=3, seq_len=seq_len)
    assert from_ckpt["step"] == 4 and from_ckpt["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


def test_learned_moe_shares_follow_the_router():
    torch.manual_seed(0)
    cfg = ComplexityConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_type="learned_moe",
        num_experts=4,
    )
    model = ComplexityForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 17))
    batches = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]
    result = evaluate(model, batches, device=torch.device("cpu"), vocab_size=64)
    with torch.no_grad():
        h = model.model.embed_tokens(ids[:, :-1])
        # Layer 0's router sees the post-attention-norm input: recompute it through the layer's hook.
        seen = []
        hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(ids[:, :-1])
        hook.remove()
        choice = model.model.layers[0].mlp.router(seen[0].reshape(-1, 32)).argmax(-1)
    del h
    expected = torch.bincount(choice, minlength=4).double() / choice.numel()
    assert result["expert_shares_per_layer"][0] == pytest.approx(expected.tolist(), abs=1e-6)


def test_eval_command_prints_json(setup, capsys):
    data, run = setup
    assert cli_main(["eval", str(run / "final"), "--data", str(data), "--max-batches", "2", "--seq-len", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"val_loss", "val_ppl", "val_bpb", "expert_shares"} <= out.keys() and out["val_tokens"] <= 2 * 8 * 32
    assert cli_main(["eval", str(run / "nope"), "--data", str(data)]) == 2
    assert "nope: no such checkpoint folder" in capsys.readouterr().err
    assert cli_main(["eval", str(run / "final"), "--data", str(data), "--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer, got 0" in capsys.readouterr().err


def test_eval_refuses_data_made_with_another_tokenizer(setup, tmp_path, capsys):
    """The data must come from the checkpoint's tokenizer: the one its folder carries, or (for a
    training checkpoint) the one of the data it was trained on. Same vocabulary size or not."""
    from complexity.data.manifest import DataMismatchError

    data, run = setup
    _, other = make_tiny_data(tmp_path / "other", vocab_size=320, n_docs=120)
    rc = cli_main(["eval", str(run / "final"), "--data", str(other), "--seq-len", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"{other}: prepared with a different tokenizer (hash " in err[0] and f"than {run / 'final'} (hash " in err[0]
    with pytest.raises(DataMismatchError, match=f"training data {data}"):
        evaluate_checkpoint(run, other, seq_len=32)
    assert evaluate_checkpoint(run / "final", data, seq_len=32, max_batches=1)["val_tokens"] > 0


BROKEN_TOKENIZER_JSON = {
    "not-json": "garbage",
    "not-a-tokenizer": "{}",
    "no-model": '{"version": "1.0"}',
    "a-list": "[1, 2]",
}


@pytest.mark.parametrize("text", BROKEN_TOKENIZER_JSON.values(), ids=BROKEN_TOKENIZER_JSON.keys())
def test_eval_names_a_broken_tokenizer_json(text, setup, tmp_path, capsys):
    """A folder's tokenizer.json that is not a tokenizer is named as such (as `complexity info`
    names it), not taken for a tokenizer the data was not prepared with."""
    import shutil

    data, run = setup
    folder = tmp_path / "final"
    shutil.copytree(run / "final", folder)
    (folder / "tokenizer.json").write_text(text)
    rc = cli_main(["eval", str(folder), "--data", str(data), "--seq-len", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"{folder / 'tokenizer.json'}: " in err[0] and "different tokenizer" not in err[0]
    assert cli_main(["info", str(folder)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[0].split("error: ")[1] == err[0].split("error: ")[1]


def test_plot_command(setup, tmp_path):
    _, run = setup
    out = tmp_path / "loss.png"
    assert cli_main(["plot", str(run), str(run), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_plot_refuses_what_it_cannot_draw(setup, tmp_path, capsys):
    # each used to draw an empty or unsmoothed figure and exit 0, or name a temporary file
    _, run = setup
    (tmp_path / "new-run").mkdir()
    (tmp_path / "new-run" / "metrics.jsonl").write_text("")
    (tmp_path / "folder.png").mkdir()
    out = tmp_path / "loss.png"
    for argv, message in [
        ([str(run), str(tmp_path / "new-run")], f"{tmp_path / 'new-run'}: its metrics.jsonl holds no loss yet"),
        ([str(run), "--smooth", "0"], "--smooth: must be a positive integer (1: no smoothing), got 0"),
        (
            [str(run), "--out", str(tmp_path / "folder.png")],
            f"{tmp_path / 'folder.png'}: is a folder; give a file name",
        ),
    ]:
        argv = argv if "--out" in argv else [*argv, "--out", str(out)]
        assert cli_main(["plot", *argv]) == 2
        assert capsys.readouterr().err.strip().startswith(f"complexity plot: error: {message}")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "new-run"]
    assert not any((tmp_path / "folder.png").iterdir())
