"""One clear error for every broken file: checkpoint folders, data files, tokenizer folders, manifests.

Each table row builds one broken file from a good one and names the message it must produce.
Every row runs through the library call and through the CLI, where it must give exit code 2 and
exactly one line `complexity CMD: error: ...` (no traceback); a few rows also run in a real
subprocess. Good inputs are run too, so a failure can never come from the fixture itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from complexity.checkpoint_folder import CheckpointError, load_checkpoint_folder
from complexity.cli import main

pytest_plugins = ["data_fixtures"]  # shared session fixtures (tiny tokenizer, prepared data)

from conftest import tiny_model  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
VOCAB = 512  # the model's vocabulary: larger than the 400-token tokenizer, as a padded vocabulary is


# ----------------------------------------------------------------------------- helpers


def _cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, its one stderr line), checking it is one line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if rc != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"complexity {argv[0]}: error: "), err
        assert "Traceback" not in err
        return rc, lines[0]
    return rc, err


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


def _edit_tensors(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def _extra_layer(t):
    t.update({k.replace("layers.2.", "layers.3."): v.clone() for k, v in t.items() if ".layers.2." in k})
    return t


def _set(key, value):
    def fn(t):
        t[key] = value(t[key]) if callable(value) else value
        return t

    return fn


def _drop(key):
    def fn(t):
        del t[key]
        return t

    return fn


def _index_move(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = next(s for s in shards if s != index["weight_map"]["model.norm.weight"])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _unlink_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer) -> dict:
    """Good folders: a checkpoint with the tokenizer, its sharded form, one whose vocabulary is smaller
    than the tokenizer's, a bf16 one."""
    root = tmp_path_factory.mktemp("good")
    model = tiny_model(vocab_size=VOCAB)
    folders = {}
    for name, kwargs in {"plain": {}, "sharded": {"max_shard_size": "200KB"}}.items():
        model.save_pretrained(root / name, **kwargs)
        for f in tiny_tokenizer.iterdir():
            shutil.copy(f, root / name / f.name)
        folders[name] = root / name
    tiny_model(vocab_size=256).save_pretrained(root / "small-vocab")
    for f in tiny_tokenizer.iterdir():
        shutil.copy(f, root / "small-vocab" / f.name)
    folders["small-vocab"] = root / "small-vocab"
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    folders["bf16"] = root / "bf16"
    tiny_model(vocab_size=VOCAB, mlp_type="hash_routed", num_experts_per_tok=2).save_pretrained(root / "hash")
    folders["hash"] = root / "hash"
    folders["model"] = tiny_model(vocab_size=VOCAB)
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 1
    return folders


# (id, base folder, how to break it, fragments of the expected message, what it breaks)
# "model": the config or the weights (every command that loads the folder must refuse it);
# "tokenizer": the tokenizer files (refused where the tokenizer is loaded: generate, serve, info).
CHECKPOINT_CASES = [
    ("missing-folder", "plain", lambda d: shutil.rmtree(d), ["no such checkpoint folder"], "model"),
    (
        "file-not-folder",
        "plain",
        lambda d: (shutil.rmtree(d), d.write_text("x")),
        ["is a file, not a checkpoint folder"],
        "model",
    ),
    ("empty-folder", "plain", lambda d: (shutil.rmtree(d), d.mkdir()), ["empty folder, not a checkpoint"], "model"),
    ("missing-config", "plain", lambda d: (d / "config.json").unlink(), ["no config.json"], "model"),
    ("empty-config", "plain", lambda d: (d / "config.json").write_text(""), ["config.json: empty file"], "model"),
    (
        "garbage-config",
        "plain",
        lambda d: (d / "config.json").write_text("garbage\x00"),
        ["config.json: not valid JSON: Expecting value (line 1, column 1)"],
        "model",
    ),
    (
        "truncated-config",
        "plain",
        lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:150]),
        ["config.json: not valid JSON: ", "(line "],
        "model",
    ),
    (
        "config-not-an-object",
        "plain",
        lambda d: (d / "config.json").write_text("[1, 2]"),
        ["config.json: expected a JSON object, got list"],
        "model",
    ),
    (
        "config-not-utf8",
        "plain",
        lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff"}'),
        ["config.json: not UTF-8 text"],
        "model",
    ),
    (
        "model-type-llama",
        "plain",
        lambda d: _edit_config(d, model_type="llama"),
        ["config.json: model_type 'llama' is not a Complexity model"],
        "model",
    ),
    (
        "no-model-type",
        "plain",
        lambda d: _edit_config(d, model_type=_DELETE),
        ["config.json: no model_type field"],
        "model",
    ),
    (
        "upstream-complexity-deep",
        "plain",
        lambda d: _edit_config(d, model_type="complexity-deep"),
        ["an upstream complexity-deep checkpoint", "complexity convert"],
        "model",
    ),
    (
        "upstream-trhash-bundle",
        "plain",
        lambda d: _edit_config(d, model_type="tr_hash_moe"),
        ["upstream TR-Hash MoE checkpoint", "complexity convert"],
        "model",
    ),
    (
        "upstream-trhash-native",
        "plain",
        lambda d: _edit_config(d, model_type=_DELETE, mlp_type="tr_hash_engine"),
        ["an upstream TR-Hash checkpoint (native format)", "complexity convert"],
        "model",
    ),
    (
        "upstream-old-style-config",
        "plain",
        lambda d: _edit_config(d, mlp_type=_DELETE, mu_mode=_DELETE, routing=_DELETE, use_token_routed_mlp=True),
        ["an upstream complexity-deep checkpoint", "complexity convert"],
        "model",
    ),
    (
        "config-field-invalid",
        "plain",
        lambda d: _edit_config(d, num_key_value_heads=3),
        ["config.json: num_key_value_heads: 3 does not divide num_attention_heads=4"],
        "model",
    ),
    (
        "config-field-wrong-type",
        "plain",
        lambda d: _edit_config(d, num_hidden_layers="3"),
        ["config.json: num_hidden_layers: must be a positive integer, got '3'"],
        "model",
    ),
    (
        "config-unknown-mlp-type",
        "plain",
        lambda d: _edit_config(d, mlp_type="mixture"),
        ["config.json: mlp_type: unknown value 'mixture'"],
        "model",
    ),
    (
        "config-partial-rotary-factor-out-of-range",
        "plain",
        lambda d: _edit_config(d, partial_rotary_factor=1.5),
        ["config.json: partial_rotary_factor: must be a number in (0, 1], got 1.5"],
        "model",
    ),
    (
        "config-partial-rotary-factor-no-pair",
        "plain",
        lambda d: _edit_config(d, partial_rotary_factor=0.05),
        ["config.json: partial_rotary_factor: 0.05 gives rotary_dim = ", "= 0 with head_dim=16"],
        "model",
    ),
    (
        "config-attention-multiplier-string",
        "plain",
        lambda d: _edit_config(d, attention_multiplier="0.1"),
        ["config.json: attention_multiplier: must be None (1/sqrt(head_dim)) or a positive number, got '0.1'"],
        "model",
    ),
    (
        "config-logits-scaling-zero",
        "plain",
        lambda d: _edit_config(d, logits_scaling=0),
        ["config.json: logits_scaling: must be a positive number (the logits are divided by it), got 0"],
        "model",
    ),
    (
        "config-vocab-size-negative",
        "plain",
        lambda d: _edit_config(d, vocab_size=-1),
        ["config.json: vocab_size: must be a positive integer, got -1"],
        "model",
    ),
    (
        "special-token-outside-vocab",
        "plain",
        lambda d: _edit_config(d, eos_token_id=VOCAB + 10),
        [f"config.json: eos_token_id: {VOCAB + 10} is outside the vocabulary [0, vocab_size={VOCAB})"],
        "model",
    ),
    (
        "wrong-hidden-size",
        "plain",
        lambda d: _edit_config(d, hidden_size=128),
        ["config.json: vocab_size=512, hidden_size=128 contradict model.embed_tokens.weight [512, 64]"],
        "model",
    ),
    (
        "wrong-vocab-size",
        "plain",
        lambda d: _edit_config(d, vocab_size=1024),
        ["config.json: vocab_size=1024, hidden_size=64 contradict model.embed_tokens.weight [512, 64]"],
        "model",
    ),
    (
        "config-more-layers-than-weights",
        "plain",
        lambda d: _edit_config(d, num_hidden_layers=4),
        ["config.json: num_hidden_layers=4, but model.safetensors holds layers 0..2 (3 layers)"],
        "model",
    ),
    (
        "weights-more-layers-than-config",
        "plain",
        lambda d: _edit_tensors(d, _extra_layer),
        ["config.json: num_hidden_layers=3, but model.safetensors holds layers 0..3 (4 layers)"],
        "model",
    ),
    (
        "no-weights",
        "plain",
        lambda d: (d / "model.safetensors").unlink(),
        ["no weights: neither model.safetensors nor model.safetensors.index.json"],
        "model",
    ),
    (
        "only-pickle-weights",
        "plain",
        lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
        ["no model.safetensors, only pytorch_model.bin"],
        "model",
    ),
    (
        "empty-safetensors",
        "plain",
        lambda d: (d / "model.safetensors").write_bytes(b""),
        ["model.safetensors: empty file (0 bytes)"],
        "model",
    ),
    (
        "garbage-safetensors",
        "plain",
        lambda d: (d / "model.safetensors").write_bytes(b"garbage " * 100),
        ["model.safetensors: not a readable safetensors file"],
        "model",
    ),
    (
        "truncated-safetensors",
        "plain",
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:60_000]),
        ["model.safetensors: not a readable safetensors file (truncated or corrupt"],
        "model",
    ),
    (
        "truncated-safetensors-header",
        "plain",
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
        ["model.safetensors: not a readable safetensors file"],
        "model",
    ),
    (
        "no-tensors",
        "plain",
        lambda d: _edit_tensors(d, lambda t: {}),
        ["model.safetensors: holds no tensors"],
        "model",
    ),
    (
        "missing-tensor",
        "plain",
        lambda d: _edit_tensors(d, _drop("model.layers.1.self_attn.q_proj.weight")),
        ["model.safetensors: missing tensor(s) model.layers.1.self_attn.q_proj.weight", "would leave them random"],
        "model",
    ),
    (
        "missing-routing-table",
        "plain",
        lambda d: _edit_tensors(d, _drop("model.token_to_expert")),
        ["missing tensor(s) model.token_to_expert"],
        "model",
    ),
    (
        "unexpected-tensor",
        "plain",
        lambda d: _edit_tensors(d, _set("model.extra.weight", torch.zeros(3))),
        ["model.safetensors: unexpected tensor(s) model.extra.weight"],
        "model",
    ),
    (
        "wrong-shape",
        "plain",
        lambda d: _edit_tensors(d, _set("model.layers.0.self_attn.q_proj.weight", lambda w: w[:, :32].contiguous())),
        ["shape mismatch", "model.layers.0.self_attn.q_proj.weight [64, 32] (expected [64, 64])"],
        "model",
    ),
    (
        "int-weight",
        "plain",
        lambda d: _edit_tensors(d, _set("model.norm.weight", lambda w: w.to(torch.int32))),
        ["tensor model.norm.weight has dtype I32; weights must be floating point"],
        "model",
    ),
    (
        "float8-weight",
        "plain",
        lambda d: _edit_tensors(d, _set("model.norm.weight", lambda w: w.to(torch.float8_e4m3fn))),
        ["tensor model.norm.weight has dtype F8_E4M3; weights must be floating point"],
        "model",
    ),
    (
        "float-routing-table",
        "plain",
        lambda d: _edit_tensors(d, _set("model.token_to_expert", lambda t: t.float())),
        ["model.token_to_expert has dtype F32, expected I64"],
        "model",
    ),
    (
        "routing-table-out-of-range",
        "plain",
        lambda d: _edit_tensors(d, _set("model.token_to_expert", lambda t: t + 4)),
        ["model.token_to_expert holds expert ids in [4, 7], outside [0, num_experts=4)"],
        "model",
    ),
    (
        "hash-route-table-repeats-an-expert",
        "hash",
        lambda d: _edit_tensors(d, _set("model.layers.1.mlp.route_table", lambda t: t[[0, 0]].clone())),
        ["model.layers.1.mlp.route_table: token 0 repeats an expert across its route slots"],
        "model",
    ),
    (
        "hash-route-table-out-of-range",
        "hash",
        lambda d: _edit_tensors(d, _set("model.layers.0.mlp.route_table", lambda t: t + 4)),
        ["model.layers.0.mlp.route_table: token 0 is routed to expert(s)", "outside [0, 4) (num_experts)"],
        "model",
    ),
    (
        "hash-route-table-float",
        "hash",
        lambda d: _edit_tensors(d, _set("model.layers.0.mlp.route_table", lambda t: t.float())),
        ["model.layers.0.mlp.route_table has dtype F32, expected I64"],
        "model",
    ),
    (
        "hash-route-table-missing",
        "hash",
        lambda d: _edit_tensors(d, _drop("model.layers.2.mlp.route_table")),
        ["missing tensor(s) model.layers.2.mlp.route_table", "mlp_type=hash_routed"],
        "model",
    ),
    (
        "hash-route-table-one-slot",
        "hash",
        lambda d: _edit_tensors(d, _set("model.layers.0.mlp.route_table", lambda t: t[:1].clone())),
        ["shape mismatch", "model.layers.0.mlp.route_table [1, 512] (expected [2, 512])"],
        "model",
    ),
    (
        "tied-head-copy-differs",
        "plain",
        lambda d: _edit_tensors(d, _set("lm_head.weight", torch.ones(VOCAB, 64))),
        ["lm_head.weight differs from model.embed_tokens.weight"],
        "model",
    ),
    (
        "sharded-missing-shard",
        "sharded",
        _unlink_shard,
        ["model.safetensors.index.json: weight_map names shard model-0000", "which is missing"],
        "model",
    ),
    (
        "sharded-index-garbage",
        "sharded",
        lambda d: (d / "model.safetensors.index.json").write_text("{"),
        ["model.safetensors.index.json: not valid JSON"],
        "model",
    ),
    (
        "sharded-index-no-weight-map",
        "sharded",
        lambda d: (d / "model.safetensors.index.json").write_text("{}"),
        ["model.safetensors.index.json: weight_map: expected a non-empty object"],
        "model",
    ),
    (
        "sharded-index-disagrees",
        "sharded",
        _index_move,
        ["model.safetensors.index.json: weight_map puts model.norm.weight in model-0000"],
        "model",
    ),
    (
        "generation-config-garbage",
        "plain",
        lambda d: (d / "generation_config.json").write_text("nope"),
        ["generation_config.json: not valid JSON"],
        "model",
    ),
    (
        "tokenizer-json-garbage",
        "plain",
        lambda d: (d / "tokenizer.json").write_text("garbage"),
        ["tokenizer.json: not valid JSON"],
        "model",
    ),
    (
        "tokenizer-json-empty",
        "plain",
        lambda d: (d / "tokenizer.json").write_text(""),
        ["tokenizer.json: empty file"],
        "model",
    ),
    (
        "tokenizer-config-garbage",
        "plain",
        lambda d: (d / "tokenizer_config.json").write_text("garbage"),
        ["tokenizer_config.json: not valid JSON"],
        "model",
    ),
    (
        "special-tokens-map-truncated",
        "plain",
        lambda d: (d / "special_tokens_map.json").write_text('{"eos_token": '),
        ["special_tokens_map.json: not valid JSON"],
        "model",
    ),
    (
        "tokenizer-json-not-a-tokenizer",
        "plain",
        lambda d: (d / "tokenizer.json").write_text("{}"),
        ["tokenizer.json: cannot load tokenizer"],
        "tokenizer",
    ),
    (
        "tokenizer-config-without-tokenizer-json",
        "plain",
        lambda d: (d / "tokenizer.json").unlink(),
        ["has tokenizer_config.json but no tokenizer.json"],
        "tokenizer",
    ),
    (
        "tokenizer-larger-than-vocab",
        "small-vocab",
        lambda d: None,
        ["the tokenizer has 400 tokens but the model has vocab_size=256"],
        "tokenizer",
    ),
]
CASE_IDS = [c[0] for c in CHECKPOINT_CASES]


@pytest.fixture
def broken(request, good, tmp_path):
    """The broken folder of one CHECKPOINT_CASES row."""
    name, base, breaker, fragments, kind = request.param
    folder = tmp_path / name
    shutil.copytree(good[base], folder)
    breaker(folder)
    return folder, fragments, kind


def _assert_names(message: str, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in message, message


def test_table_is_large_enough():
    assert len(CHECKPOINT_CASES) >= 23 and len(set(CASE_IDS)) == len(CASE_IDS)


def test_good_folders_load(good, capsys, prepared):
    """The bases of the table are fine: every command accepts them."""
    for name in ("plain", "sharded", "bf16"):
        model, tok = load_checkpoint_folder(good[name])
        assert next(model.parameters()).dtype == torch.float32
        assert (tok is not None) == (name != "bf16")
    assert _cli(capsys, "info", good["plain"])[0] == 0
    assert (
        _cli(capsys, "generate", good["plain"], "--prompt", "the model", "--max-new-tokens", "2", "--device", "cpu")[0]
        == 0
    )
    assert _cli(capsys, "eval", good["plain"], "--data", prepared, "--seq-len", "16", "--max-batches", "1")[0] == 0


def test_bf16_and_sharded_load_the_same_weights(good):
    """Accepted storage: bf16 (cast on load), sharded; their outputs match the float32 original."""
    ref = good["model"].eval()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    sharded, _ = load_checkpoint_folder(good["sharded"], tokenizer=False)
    bf16, _ = load_checkpoint_folder(good["bf16"], dtype=torch.float32)
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(sharded(ids).logits, want)
        rounded = tiny_model(vocab_size=VOCAB).to(torch.bfloat16).float().eval()(ids).logits
        torch.testing.assert_close(bf16(ids).logits, rounded, rtol=0, atol=0)
    assert next(load_checkpoint_folder(good["bf16"], dtype=None)[0].parameters()).dtype == torch.bfloat16


def test_tied_head_copy_equal_to_embedding_is_accepted(good, tmp_path):
    folder = tmp_path / "tied"
    shutil.copytree(good["plain"], folder)
    _edit_tensors(folder, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    model, _ = load_checkpoint_folder(folder)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def _retyped(**changes):
    """Edit the header metadata: name -> (shape or None, dtype or None)."""

    def edit(tensors):
        for name, (shape, dtype) in changes.items():
            info = tensors[name]
            tensors[name] = dataclasses.replace(info, shape=shape or info.shape, dtype=dtype or info.dtype)

    return edit


def _without(*prefixes):
    def edit(tensors):
        for name in [n for n in tensors if n.startswith(prefixes)]:
            del tensors[name]

    return edit


def _with_extra(*names):
    def edit(tensors):
        for name in names:
            tensors[name] = dataclasses.replace(tensors["model.norm.weight"])

    return edit


def _both(*edits):
    def edit(tensors):
        for fn in edits:
            fn(tensors)

    return edit


_Q1 = "model.layers.1.self_attn.q_proj.weight"
_MODEL = "(vocab_size=512, hidden_size=64, num_hidden_layers=3, mlp_type=token_routed)"
# (id, base folder, edit of the stored tensors' names/shapes/dtypes, the whole message): when a
# folder has several problems, the first of names, layer count, embedding, shapes, dtypes wins.
PRECEDENCE_CASES = [
    ("no-tensors", "plain", lambda t: t.clear(), "{folder}/model.safetensors: holds no tensors"),
    (
        "missing-beats-unexpected",
        "plain",
        _both(_without(_Q1), _with_extra("model.extra.weight")),
        f"{{folder}}/model.safetensors: missing tensor(s) {_Q1} of the model config.json describes {_MODEL}; "
        "loading would leave them random",
    ),
    (
        "layer-count-beats-missing",
        "plain",
        _without("model.layers.2."),
        "{folder}/config.json: num_hidden_layers=3, but model.safetensors holds layers 0..1 (2 layers)",
    ),
    (
        "middle-layer-missing-lists-four",
        "plain",
        _without("model.layers.1."),
        "{folder}/model.safetensors: missing tensor(s) model.layers.1.input_layernorm.weight, "
        "model.layers.1.mlp.experts.down_proj, model.layers.1.mlp.experts.gate_up_proj, "
        f"model.layers.1.post_attention_layernorm.weight (+6 more) of the model config.json describes {_MODEL}; "
        "loading would leave them random",
    ),
    (
        "unexpected-lists-four",
        "plain",
        _with_extra(*(f"model.extra{i}.weight" for i in range(6))),
        "{folder}/model.safetensors: unexpected tensor(s) model.extra0.weight, model.extra1.weight, "
        f"model.extra2.weight, model.extra3.weight (+2 more), not part of the model config.json describes {_MODEL}",
    ),
    (
        "sharded-names-the-index",
        "sharded",
        _without(_Q1),
        f"{{folder}}/model.safetensors.index.json: missing tensor(s) {_Q1} of the model config.json describes "
        f"{_MODEL}; loading would leave them random",
    ),
    (
        "embedding-beats-other-shapes",
        "plain",
        _retyped(**{"model.embed_tokens.weight": ([512, 32], None), _Q1: ([1, 1], None)}),
        "{folder}/config.json: vocab_size=512, hidden_size=64 contradict model.embed_tokens.weight [512, 32] "
        "in model.safetensors",
    ),
    (
        "shapes-list-two",
        "plain",
        _retyped(**{f"model.layers.{i}.self_attn.q_proj.weight": ([1, 1], None) for i in range(3)}),
        f"{{folder}}/model.safetensors: shape mismatch against config.json {_MODEL}: "
        "model.layers.0.self_attn.q_proj.weight [1, 1] (expected [64, 64]), "
        "model.layers.1.self_attn.q_proj.weight [1, 1] (expected [64, 64]) (+1 more)",
    ),
    (
        "shape-beats-dtype",
        "plain",
        _retyped(**{"model.norm.weight": (None, "I32"), _Q1: ([1, 1], None)}),
        f"{{folder}}/model.safetensors: shape mismatch against config.json {_MODEL}: {_Q1} [1, 1] (expected [64, 64])",
    ),
    (
        "dtypes-in-model-order-routing-table-first",
        "plain",
        _retyped(**{"model.norm.weight": (None, "I32"), "model.token_to_expert": (None, "F32")}),
        "{folder}/model.safetensors: tensor model.token_to_expert has dtype F32, expected I64 (int64)",
    ),
    (
        "dtypes-in-model-order-embedding-before-norm",
        "plain",
        _retyped(**{"model.norm.weight": (None, "I32"), "model.embed_tokens.weight": (None, "BOOL")}),
        "{folder}/model.safetensors: tensor model.embed_tokens.weight has dtype BOOL; weights must be floating "
        "point (float64, float32, bfloat16, float16)",
    ),
]


@pytest.mark.parametrize("base, edit, message", [c[1:] for c in PRECEDENCE_CASES], ids=[c[0] for c in PRECEDENCE_CASES])
def test_check_tensors_names_the_first_problem(good, base, edit, message):
    from complexity.checkpoint_folder import _skeleton, check_tensors, read_checkpoint_config, read_tensor_headers

    folder = good[base]
    config = read_checkpoint_config(folder)
    _, tensors = read_tensor_headers(folder)
    edit(tensors)
    with pytest.raises(CheckpointError) as err:
        check_tensors(folder, config, tensors, _skeleton(config, folder / "config.json"))
    assert str(err.value) == message.format(folder=folder)


def test_a_differing_tied_copy_is_named_before_the_routing_table(good, tmp_path):
    folder = tmp_path / "two-problems"
    shutil.copytree(good["plain"], folder)
    _edit_tensors(folder, _set("lm_head.weight", torch.ones(VOCAB, 64)))
    _edit_tensors(folder, _set("model.token_to_expert", lambda t: t + 4))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_folder(folder)
    assert str(err.value) == (
        f"{folder}/model.safetensors: lm_head.weight differs from model.embed_tokens.weight, which config.json "
        "ties it to (tie_word_embeddings=true): set tie_word_embeddings to false to keep it"
    )
    _edit_tensors(folder, _drop("lm_head.weight"))  # tied and absent: nothing to compare
    with pytest.raises(CheckpointError, match=r"model.token_to_expert holds expert ids in \[4, 7\]"):
        load_checkpoint_folder(folder)


@pytest.mark.parametrize("broken", CHECKPOINT_CASES, ids=CASE_IDS, indirect=True)
def test_library_refuses(broken):
    from complexity.inference import Engine

    folder, fragments, _ = broken
    for load in (lambda: load_checkpoint_folder(folder), lambda: Engine.from_pretrained(folder, device="cpu")):
        with pytest.raises((CheckpointError, FileNotFoundError)) as err:
            load()
        _assert_names(str(err.value), fragments)
        assert "\n" not in str(err.value)


def test_debug_shows_the_traceback(good, tmp_path, monkeypatch):
    folder = tmp_path / "nocfg"
    shutil.copytree(good["plain"], folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        main(["--debug", "info", str(folder)])
    monkeypatch.setenv("COMPLEXITY_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["info", str(folder)])


def test_unexpected_errors_are_one_line_and_ctrl_c_is_130(monkeypatch, capsys):
    import complexity.commands.info as info

    def boom(args):
        raise RuntimeError("something odd\nwith a second line")

    monkeypatch.setattr(info, "run", boom)  # register() binds the module's run when the parser is built
    rc, line = _cli(capsys, "info", "tiny")
    assert rc == 1 and "RuntimeError: something odd; with a second line" in line and "--debug" in line

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupt)
    capsys.readouterr()
    assert main(["info", "tiny"]) == 130
    assert capsys.readouterr().err.strip() == "complexity info: interrupted"


def test_os_errors_name_the_path():
    from complexity.cli import describe_error
    from complexity.data.files import DiskFullError

    assert describe_error(PermissionError(13, "Permission denied", "/x/y"), "data") == (1, "/x/y: Permission denied")
    assert describe_error(FileNotFoundError(2, "No such file or directory", "/z"), "eval") == (
        2,
        "/z: No such file or directory",
    )
    code, message = describe_error(DiskFullError("/d/f.bin", 1234, free=10), "data")
    assert code == 1 and message == "/d/f.bin: disk full: writing it needs 1,234 more bytes, 10 bytes free there"
    assert describe_error(json.JSONDecodeError("Expecting value", "", 0), "x")[1].startswith("invalid JSON: Expecting")


# Runs commands in one fresh interpreter, each with file descriptor 2 sent to its own file, so
# anything that bypasses sys.stderr (Rust, C, progress bars, logging) is caught too.
_DRIVER = """
import json, os, sys
from complexity.cli import main
for i, argv in enumerate(json.loads(sys.argv[1])):
    sys.stderr.flush()
    saved, fd = os.dup(2), os.open(os.path.join(sys.argv[2], f"{i}.err"), os.O_WRONLY | os.O_CREAT)
    os.dup2(fd, 2)
    try:
        code = main(argv)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
    print(code)
"""


def test_cli_refuses_every_row_in_a_real_process(good, tmp_path, prepared):
    """Every row through `complexity info`, `generate` and (for model files) `eval`, in a fresh
    interpreter with stderr caught at the file-descriptor level: exit 2, exactly one line naming
    the problem, nothing else (no traceback, no library warning or progress bar)."""
    argvs, expected = [], []
    for name, base, breaker, fragments, kind in CHECKPOINT_CASES:
        folder = tmp_path / "cases" / name
        shutil.copytree(good[base], folder)
        breaker(folder)
        runs = [["info", folder], ["generate", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]]
        if kind == "model":  # eval reads no tokenizer_config: only what the model and the data need
            runs.append(["eval", folder, "--data", prepared, "--seq-len", "16"])
        for argv in runs:
            argvs.append([str(a) for a in argv])
            expected.append((name, argv[0], fragments))
    out = tmp_path / "stderr"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(argvs), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    codes = proc.stdout.split()
    for i, (name, command, fragments) in enumerate(expected):
        err = (out / f"{i}.err").read_text()
        lines = err.strip().splitlines()
        assert codes[i] == "2", (name, command, err)
        assert len(lines) == 1 and lines[0].startswith(f"complexity {command}: error: "), (name, command, err)
        _assert_names(lines[0], fragments)


def test_convert_refuses_in_a_real_process(good, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(good["plain"], folder)
    (folder / "config.json").write_text('{"model_type": "complexity", "vocab_size": ')
    proc = subprocess.run(
        [sys.executable, "-m", "complexity.cli", "convert", str(folder), str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("complexity convert: error: ") and "config.json" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda d: None,  # our own folder
        lambda d: (d / "config.json").write_text("garbage"),
        lambda d: (d / "model.safetensors").unlink(),
        lambda d: shutil.rmtree(d),
    ],
    ids=["own-format", "garbage-config", "no-weights", "missing"],
)
def test_convert_errors_are_one_line(make, good, tmp_path, capsys):
    folder = tmp_path / "src"
    shutil.copytree(good["plain"], folder)
    make(folder)
    rc, line = _cli(capsys, "convert", folder, tmp_path / "dst")
    assert rc == 2 and str(folder) in line
    assert not (tmp_path / "dst").exists()


# ----------------------------------------------------------------------------- data files


def _parquet(rows: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    return buf.getvalue()


DATA_CASES = [
    ("latin1.txt", b"fine first line\ncaf\xe9\n", "latin1.txt:2: not valid UTF-8 text (bad byte 0xe9"),
    ("cut-char.txt", "ends in the middle of €".encode()[:-1], "cut-char.txt:1: not valid UTF-8 text (truncated"),
    ("encoded-surrogate.txt", b"a\n\xed\xa0\x80\n", "encoded-surrogate.txt:2: not valid UTF-8"),
    ("nul.txt", b"text\nmore\x00\x01", "nul.txt:2: looks like a binary file"),
    ("empty.txt", b"", "empty.txt: file is empty"),
    ("blank.jsonl", b"\n \n\n", "blank.jsonl: file contains only whitespace"),
    ("bad-utf8.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "bad-utf8.jsonl:2: not valid UTF-8"),
    (
        "surrogate.jsonl",
        b'{"text": "a"}\n{"text": "x\\ud800y"}\n',
        "surrogate.jsonl:2: field 'text' holds a lone surrogate (U+D800 at character 1)",
    ),
    ("low-surrogate.jsonl", b'{"text": "\\udc00"}\n', "low-surrogate.jsonl:1: field 'text' holds a lone surrogate"),
    ("deep.jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b"\n", "deep.jsonl:2: invalid JSON"),
    ("array.jsonl", b"[1, 2]\n", "array.jsonl:1: expected a JSON object, got list"),
    ("nofield.jsonl", b'{"body": "x"}\n', "nofield.jsonl:1: missing text field 'text'"),
    ("notstr.jsonl", b'{"text": ["x"]}\n', "notstr.jsonl:1: field 'text' is list, not a string"),
    ("truncated.jsonl", b'{"text": "a"}\n{"text": "b', "truncated.jsonl:2: invalid JSON"),
    ("only-blank-docs.jsonl", b'{"text": "  "}\n', "only-blank-docs.jsonl: contains no non-empty documents"),
    ("nocolumn.parquet", _parquet({"body": ["x"]}), "nocolumn.parquet: no column 'text'"),
    ("intcolumn.parquet", _parquet({"text": [1, 2]}), "intcolumn.parquet: row 0: column 'text' is int"),
    ("truncated.parquet", _parquet({"text": ["x" * 100] * 50})[:200], "truncated.parquet: not a readable parquet"),
    ("table.csv", b"a,b\n", "table.csv: unsupported file type"),
]


@pytest.mark.parametrize("name,content,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(name, content, message, tmp_path, tiny_tokenizer, capsys):
    from complexity.data.prepare import prepare_dataset
    from complexity.data.sources import DataSourceError

    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(DataSourceError) as err:
        prepare_dataset([str(bad)], tiny_tokenizer, tmp_path / "lib", progress=False, log=lambda m: None)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "lib").exists() and not list(tmp_path.glob("lib.tmp-*"))
    rc, line = _cli(
        capsys,
        "data",
        "prepare",
        "--input",
        bad,
        "--tokenizer",
        tiny_tokenizer,
        "--out",
        tmp_path / "out",
        "--no-progress",
    )
    assert rc == 2 and message in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    if name.startswith("only-blank"):
        return  # a tokenizer can be trained on no text at all: that error is "no training text"
    rc, line = _cli(
        capsys, "tokenizer", "train", "--input", bad, "--vocab-size", "300", "--out", tmp_path / "tok", "--no-progress"
    )
    assert rc == 2 and message in line
    assert not (tmp_path / "tok").exists() and not list(tmp_path.glob(".tok.writing-*"))


def test_byte_order_mark_is_not_text(tmp_path):
    from complexity.data.sources import iter_documents, resolve_sources

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hi"}\n')
    docs = [d for s in resolve_sources([str(tmp_path)]) for d in iter_documents(s)]
    assert docs == ["hi", "hello"]  # bom.jsonl, bom.txt


# ----------------------------------------------------------------------------- tokenizer folders


def _no_eos_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models

    (folder / "tokenizer.json").unlink()
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))


TOKENIZER_CASES = [
    ("missing", lambda d: shutil.rmtree(d), "no tokenizer.json found"),
    ("empty-folder", lambda d: (shutil.rmtree(d), d.mkdir()), "no tokenizer.json found"),
    ("garbage", lambda d: (d / "tokenizer.json").write_text("garbage"), "tokenizer.json: cannot load tokenizer"),
    ("empty", lambda d: (d / "tokenizer.json").write_text(""), "tokenizer.json: cannot load tokenizer"),
    (
        "not-a-tokenizer",
        lambda d: (d / "tokenizer.json").write_text('{"version": "1.0"}'),
        "tokenizer.json: cannot load tokenizer",
    ),
    ("not-utf8", lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe"), "tokenizer.json: cannot load tokenizer"),
    ("a-file", lambda d: (shutil.rmtree(d), d.write_text("garbage")), "cannot load tokenizer"),
    ("no-eos", _no_eos_tokenizer, "tokenizer has no </s> token"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in TOKENIZER_CASES], ids=[c[0] for c in TOKENIZER_CASES])
def test_bad_tokenizer_folder(make, message, tmp_path, tiny_tokenizer, corpus, capsys):
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer, tok)
    make(tok)
    rc, line = _cli(
        capsys,
        "data",
        "prepare",
        "--input",
        corpus["jsonl"],
        "--tokenizer",
        tok,
        "--out",
        tmp_path / "out",
        "--no-progress",
    )
    assert rc == 2 and message in line and str(tok) in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- manifests


def _manifest_edit(**changes):
    def edit(d: Path):
        m = json.loads((d / "manifest.json").read_text())
        for path, value in changes.items():
            node = m
            keys = path.split(".")
            for k in keys[:-1]:
                node = node[int(k)] if isinstance(node, list) else node[k]
            if value is _DELETE:
                del node[keys[-1]]
            else:
                node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


def _shard(d: Path) -> Path:
    return d / json.loads((d / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]


MANIFEST_CASES = [
    ("garbage", lambda d: (d / "manifest.json").write_text("garbage"), "manifest.json: not valid JSON"),
    ("empty", lambda d: (d / "manifest.json").write_text(""), "manifest.json: empty file"),
    ("missing", lambda d: (d / "manifest.json").unlink(), "no manifest.json: not a complete prepared-data folder"),
    ("not-a-folder", lambda d: (shutil.rmtree(d), d.write_text("x")), "is a file, not a prepared-data folder"),
    ("other-format", _manifest_edit(format="something"), "manifest.json: format: 'something' is not"),
    ("future-version", _manifest_edit(format_version=99), "manifest.json: format_version: 99"),
    ("no-splits", _manifest_edit(splits=_DELETE), "manifest.json: splits: expected an object with train and val"),
    ("bad-vocab", _manifest_edit(vocab_size="400"), "manifest.json: vocab_size: expected a positive integer"),
    ("bad-dtype", _manifest_edit(dtype="float32"), "manifest.json: dtype: expected one of uint16, uint32"),
    ("eos-outside-vocab", _manifest_edit(eos_id=400), "manifest.json: eos_id: expected an id in [0, 400)"),
    ("no-tokenizer", _manifest_edit(tokenizer=_DELETE), "manifest.json: tokenizer: expected"),
    (
        "shard-tokens-not-int",
        _manifest_edit(**{"splits.train.shards.0.tokens": "12"}),
        "manifest.json: splits.train.shards[0]: expected {file, tokens}",
    ),
    (
        "shard-outside-folder",
        _manifest_edit(**{"splits.train.shards.0.file": "../elsewhere.npy"}),
        "manifest.json: splits.train.shards[0].file: '../elsewhere.npy' must be a path inside the folder",
    ),
    (
        "tokens-disagree",
        _manifest_edit(**{"splits.train.tokens": 5}),
        "manifest.json: splits.train.tokens: 5 differs from the sum of its shards",
    ),
    ("shard-missing", lambda d: _shard(d).unlink(), "missing token shard"),
    ("shard-truncated", lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:200]), "unreadable token shard"),
    ("shard-garbage", lambda d: _shard(d).write_bytes(b"garbage" * 10), "unreadable token shard"),
    (
        "shard-wrong-dtype",
        lambda d: np.save(_shard(d), np.load(_shard(d)).astype("int64")),
        "int64, manifest.json says",
    ),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_bad_prepared_folder(make, message, tmp_path, prepared, capsys):
    from complexity.data.loader import PackedTokens

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    make(data)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        PackedTokens(data, "train")
    assert message in str(err.value)
    rc, line = _cli(capsys, "data", "inspect", data)
    assert rc == 2 and message in line and str(data) in line


def test_token_id_outside_the_vocabulary(tmp_path, prepared, capsys):
    # A damaged shard whose size and dtype still match the manifest: only its ids tell. It used to
    # pass `data inspect` and end a training run with torch's "IndexError: index out of range".
    from complexity.data.loader import EvalLoader, TrainLoader

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    tokens = np.load(_shard(data))
    tokens[7] = 65000
    np.save(_shard(data), tokens)
    message = f"{_shard(data)}: token id 65000 at index 7 is outside the vocabulary [0, 400)"
    rc, line = _cli(capsys, "data", "inspect", data)
    assert rc == 2 and message in line
    loader = TrainLoader(data, batch_size=1, seq_len=16)  # batch 1: every sample once per epoch
    with pytest.raises(ValueError) as err:
        for _ in zip(range(len(loader)), loader):
            pass
    assert message in str(err.value)
    with pytest.raises(ValueError) as err:
        list(EvalLoader(data, split="train", batch_size=4, seq_len=16))
    assert message in str(err.value)


# The manifest checks no folder edit above reaches, each with its whole message.
MANIFEST_FIELD_CASES = [
    ("not-an-object", lambda m: [m], "m.json: expected a JSON object, got list"),
    ("string-version", lambda m: {**m, "format_version": "1"}, "m.json: format_version: '1': this version reads"),
    ("zero-vocab", lambda m: {**m, "vocab_size": 0}, "m.json: vocab_size: expected a positive integer, got 0"),
    (
        "dtype-too-small",
        lambda m: {**m, "vocab_size": 70_000},
        "m.json: dtype: uint16 cannot hold ids up to vocab_size - 1 = 69999",
    ),
    ("bool-eos", lambda m: {**m, "eos_id": True}, "m.json: eos_id: expected an id in [0, 400), got True"),
    ("hashless-tokenizer", lambda m: {**m, "tokenizer": {"hash": 5}}, "m.json: tokenizer: expected {path, hash,"),
    ("no-val", lambda m: {**m, "splits": {"train": m["splits"]["train"]}}, "m.json: splits: expected an object"),
    ("split-not-object", lambda m: _with_split(m, []), "m.json: splits.train: expected an object"),
    (
        "negative-documents",
        lambda m: _with_split(m, {**m["splits"]["train"], "documents": -1}),
        "m.json: splits.train.documents: expected a non-negative integer, got -1",
    ),
    (
        "shards-not-list",
        lambda m: _with_split(m, {**m["splits"]["train"], "shards": {}}),
        "m.json: splits.train.shards: expected a list",
    ),
    (
        "absolute-shard",
        lambda m: _with_split(m, {**m["splits"]["train"], "shards": [{"file": "/abs.npy", "tokens": 1}]}),
        "m.json: splits.train.shards[0].file: '/abs.npy' must be a path inside the folder",
    ),
    ("counts-without-file", lambda m: {**m, "token_counts": {"total": 3}}, "m.json: token_counts: expected {file"),
]


def _with_split(manifest: dict, train) -> dict:
    return {**manifest, "splits": {**manifest["splits"], "train": train}}


@pytest.mark.parametrize(
    "edit,message", [c[1:] for c in MANIFEST_FIELD_CASES], ids=[c[0] for c in MANIFEST_FIELD_CASES]
)
def test_bad_manifest_field(edit, message, prepared):
    from complexity.data.manifest import ManifestError, validate_manifest

    manifest = json.loads((prepared / "manifest.json").read_text())
    assert validate_manifest(manifest, "m.json") is manifest
    with pytest.raises(ManifestError) as err:
        validate_manifest(edit(manifest), "m.json")
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: (d / "token_counts.npy").unlink(), "token_counts.npy: no such file"),
        (lambda d: (d / "token_counts.npy").write_bytes(b"garbage"), "token_counts.npy: not a readable .npy"),
        (
            lambda d: np.save(d / "token_counts.npy", np.zeros(3, "int64")),
            "token_counts.npy: holds int64 [3], expected int64 [400]",
        ),
    ],
    ids=["missing", "garbage", "wrong-length"],
)
def test_bad_token_counts(make, message, tmp_path, prepared, capsys):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    make(data)
    rc, line = _cli(capsys, "routing", "build", "--counts", data, "--experts", "4")
    assert rc == 2 and message in line


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, capsys, tiny_tokenizer):
    """`--out a/b` where `a` is a file: every command that writes a folder names the file at once
    (the OS says only "File exists" or "Not a directory", and only once the work is done); so does
    a file's atomic write."""
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    native = Path(__file__).parent / "fixtures/trhash/mh2-top2-shared/native"
    commands = {
        "tokenizer": ["tokenizer", "train", "--builtin", "--vocab-size", "300", "--out", "OUT", "--no-progress"],
        "data": ["data", "prepare", "--builtin", "--tokenizer", tiny_tokenizer, "--out", "OUT", "--no-progress"],
        "convert": ["convert", native, "OUT"],
        "deep": ["convert", native, "OUT", "--to", "deep"],
        "train": ["train", "--preset", "tiny", "--data", tmp_path / "none", "--out", "OUT"],
        "x.jsonl": ["data", "builtin", "--out", "OUT"],  # a file, written atomically
    }
    for name, argv in commands.items():
        out = blocker / "sub" / name
        rc, line = _cli(capsys, *[out if a == "OUT" else a for a in argv])
        assert rc == 2 and line.endswith(
            f": error: {out}: {blocker} is a file, not a folder; choose another output path"
        )
    assert os.listdir(tmp_path) == ["afile"] and blocker.read_text() == "mine"
