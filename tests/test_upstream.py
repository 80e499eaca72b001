"""`complexity convert`: upstream complexity-deep checkpoints load exactly (tests/fixtures/upstream)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import complexity  # noqa: F401  (registers the Auto classes)
from complexity import ComplexityForCausalLM
from complexity.cli import main as cli_main
from complexity.integrations.upstream import (
    INL,
    MU_GUIDANCE,
    UpstreamFormatError,
    UpstreamStateDictAdapter,
    convert_upstream,
    detect_upstream,
    inspect_upstream,
)

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
INL_DIR = FIXTURES / "complexity-deep-v0.13-inl"
MU_DIR = FIXTURES / "complexity-deep-v1.0-mu"
CASES = {"v0.13-inl": (INL_DIR, INL), "v1.0-mu": (MU_DIR, MU_GUIDANCE)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(src: Path):
    ref = load_file(src / "reference.safetensors")
    return ref["input_ids"], ref["logits"]


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def make_source(tmp_path: Path, base: Path, *, edit_weights=None, edit_config=None, name="src") -> Path:
    """A copy of a fixture folder with its weights and/or config edited in place."""
    src = tmp_path / name
    src.mkdir()
    config = json.loads((base / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (src / "config.json").write_text(json.dumps(config))
    sd = load_file(base / "model.safetensors")
    if edit_weights:
        edit_weights(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, src / "model.safetensors")
    return src


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each fixture converted once: {case: (dst, report)}."""
    out = {}
    for case, (src, _) in CASES.items():
        dst = tmp_path_factory.mktemp("converted") / case
        out[case] = (dst, convert_upstream(src, dst))
    return out


# ----------------------------------------------------------------------------- exact parity


@pytest.mark.parametrize("case", list(CASES))
def test_convert_matches_upstream_logits(converted, case):
    src, design = CASES[case]
    dst, report = converted[case]
    assert report.design == design
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    assert (dst / "modeling_complexity.py").is_file()  # self-contained folder
    assert not list(dst.parent.glob(f".{dst.name}.writing-*"))  # no temp dir left behind
    input_ids, ref = reference(src)
    for loader in (ComplexityForCausalLM, AutoModelForCausalLM):
        model = loader.from_pretrained(dst).eval()
        assert isinstance(model, ComplexityForCausalLM)
        assert model.dtype == torch.float32
        err = rel_err(logits_of(model, input_ids), ref)
        assert err <= 1e-4, f"{loader.__name__}: relative error {err}"


def test_converted_configs_carry_the_design(converted):
    inl = json.loads((converted["v0.13-inl"][0] / "config.json").read_text())
    assert (inl["model_type"], inl["mu_mode"], inl["mlp_type"], inl["shared_expert"]) == (
        "complexity",
        "inl",
        "token_routed",
        False,
    )
    assert inl["routing"] == "modulo" and inl["dynamics_dt"] == 0.1 and inl["tie_word_embeddings"] is True
    mu = json.loads((converted["v1.0-mu"][0] / "config.json").read_text())
    assert (mu["mu_mode"], mu["shared_expert"], mu["routing"]) == ("guidance", True, "zipf")
    # The zipf table is the file's, not rebuilt.
    model = ComplexityForCausalLM.from_pretrained(converted["v1.0-mu"][0])
    table = load_file(MU_DIR / "model.safetensors")["layers.0.mlp.token_to_expert"]
    assert torch.equal(model.model.token_to_expert, table)


def test_report_names_detection_drops_and_parameters(converted):
    text = str(converted["v0.13-inl"][1])
    assert "complexity-deep 0.13" in text and "parameters: total" in text
    assert "layers.0.self_attn.mu_to_q.weight" in text and "no mu_prev" in text
    assert "inv_freq" in text and "use_sdpa" in text
    text = str(converted["v1.0-mu"][1])
    assert "complexity-deep 1.0" in text and "layers.1.mu_guidance.mu" in text and "lm_head.weight" in text


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_equals_full_forward(converted, case):
    src, _ = CASES[case]
    model = ComplexityForCausalLM.from_pretrained(converted[case][0]).eval()
    input_ids, _ = reference(src)
    full = logits_of(model, input_ids)
    k = 9
    with torch.no_grad():
        out = model(input_ids[:, :k], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(k, input_ids.shape[1]):
            out = model(input_ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_generates_greedily(converted, case):
    src, _ = CASES[case]
    model = ComplexityForCausalLM.from_pretrained(converted[case][0]).eval()
    model.generation_config.eos_token_id = None  # run the full length
    prompt = reference(src)[0][:, :6]
    new = 10
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(prompt))
        ids = prompt
        for _ in range(new):
            nxt = logits_of(model, ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_generates_through_the_cli(converted, case, tmp_path, capsys):
    """`complexity generate` on a converted checkpoint prints the greedy continuation."""
    from _serve_fixtures import make_tokenizer

    dst = tmp_path / case
    shutil.copytree(converted[case][0], dst)
    tok = make_tokenizer(vocab_size=512)
    tok.save_pretrained(dst)
    prompt = "hello world"  # continues with ids the 424-token test tokenizer can print
    assert (
        cli_main(
            [
                "generate",
                str(dst),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--ignore-eos",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    model = ComplexityForCausalLM.from_pretrained(dst).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, logits_of(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tok.decode(ids[0, -12:])
    assert expected and printed.rstrip("\n") == expected


def test_cli_convert_and_dry_run(tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli_main(["convert", str(MU_DIR), str(dst), "--dry-run"]) == 0
    assert not dst.exists()
    assert "dry run" in capsys.readouterr().out
    assert cli_main(["convert", str(INL_DIR), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "detected: complexity-deep 0.13" in out and f"wrote {dst}" in out
    # An existing non-empty DST is refused, then replaced with --overwrite.
    assert cli_main(["convert", str(MU_DIR), str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert json.loads((dst / "config.json").read_text())["mu_mode"] == "inl"
    assert cli_main(["convert", str(MU_DIR), str(dst), "--overwrite"]) == 0
    assert json.loads((dst / "config.json").read_text())["mu_mode"] == "guidance"


def test_dtype_option_and_tokenizer_files_copied(tmp_path):
    src = make_source(tmp_path, MU_DIR)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    # without tokenizer.json these are no tokenizer (a folder holding them alone would not load)
    assert convert_upstream(src, tmp_path / "no-tokenizer", dtype="bfloat16").copied_files == []
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    report = convert_upstream(src, tmp_path / "dst", dtype="bfloat16")
    assert report.copied_files == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    assert (tmp_path / "dst" / "tokenizer_config.json").is_file()
    model = ComplexityForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.dtype == torch.bfloat16 and model.model.token_to_expert.dtype == torch.long
    input_ids, ref = reference(MU_DIR)
    assert rel_err(logits_of(model, input_ids), ref) < 0.1  # bf16 weights: close, not exact


def test_untied_head_is_kept(tmp_path):
    def edit(sd):
        sd["lm_head.weight"] = sd["lm_head.weight"] + 0.01

    src = make_source(tmp_path, MU_DIR, edit_weights=edit)
    report = convert_upstream(src, tmp_path / "dst")
    assert report.config.tie_word_embeddings is False and "kept untied" in str(report)
    model = ComplexityForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, load_file(src / "model.safetensors")["lm_head.weight"])


# ----------------------------------------------------------------------------- .pt wrappers and names


def _wrap(sd, wrapper, prefix):
    sd = {prefix + k: v for k, v in sd.items()}
    if wrapper is None:
        return sd
    return {wrapper: sd, "step": 123, "optimizer": {"lr": 1e-4}}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("wrapper", [None, "model_state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "model."])
def test_pt_wrappers_and_prefixes(tmp_path, case, wrapper, prefix):
    base, design = CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(base / "config.json", src / "config.json")
    torch.save(_wrap(load_file(base / "model.safetensors"), wrapper, prefix), src / "model.pt")
    report = convert_upstream(src, tmp_path / "dst")
    assert report.design == design and report.weights_file.name == "model.pt"
    input_ids, ref = reference(base)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert rel_err(logits_of(model, input_ids), ref) <= 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_old_inl_controller_names(tmp_path, fmt):
    sd = load_file(INL_DIR / "model.safetensors")
    old = {}
    for k, v in sd.items():
        k = k.replace("dynamics.controller_in.", "dynamics.controller.0.").replace(
            "dynamics.controller_out.", "dynamics.controller.2."
        )
        old[k] = v
    assert any("controller.2.bias" in k for k in old)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(INL_DIR / "config.json", src / "config.json")
    if fmt == "pt":
        torch.save({"model_state_dict": old}, src / "model.pt")
    else:
        save_file(old, src / "model.safetensors")
    convert_upstream(src, tmp_path / "dst")
    input_ids, ref = reference(INL_DIR)
    model = ComplexityForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert rel_err(logits_of(model, input_ids), ref) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_round_trip(case):
    base, design = CASES[case]
    ckpt = detect_upstream(base)
    adapter = UpstreamStateDictAdapter(design, ckpt.config)
    ours = adapter.to_complexity(load_file(base / "model.safetensors"))
    back = adapter.from_complexity(ours)
    raw = load_file(base / "model.safetensors")
    assert set(back) == set(raw)
    for k, v in raw.items():
        if adapter.drop_reason(k.removeprefix("model.")) is None or "inv_freq" in k or k == "lm_head.weight":
            torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
    assert adapter.to_complexity(back).keys() == ours.keys()


# ----------------------------------------------------------------------------- bad input


def assert_rejected(src, dst, *needles, exc=UpstreamFormatError):
    with pytest.raises(exc) as info:
        convert_upstream(src, dst)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.writing-*"))
    return message


def test_not_a_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_rejected(empty, tmp_path / "out" / "dst", "no config.json", "no weights")
    assert not (tmp_path / "out").exists()
    assert_rejected(tmp_path / "nowhere", tmp_path / "dst", "no such folder", exc=FileNotFoundError)

    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(MU_DIR / "config.json", only_config / "config.json")
    assert_rejected(only_config, tmp_path / "dst", "no weights")

    llama = make_source(
        tmp_path,
        MU_DIR,
        name="llama",
        edit_weights=lambda sd: [
            sd.pop(k)
            for k in list(sd)
            if not k.startswith(("embed_tokens", "norm", "lm_head")) and ("self_attn" not in k or "mu_to" in k)
        ],
    )
    assert_rejected(llama, tmp_path / "dst", "not an upstream complexity-deep checkpoint")

    # One of our own folders is recognised as such.
    ours = tmp_path / "ours"
    convert_upstream(MU_DIR, ours)
    assert_rejected(ours, tmp_path / "dst", "this project's own format")


def test_unknown_and_missing_keys_all_listed(tmp_path):
    def edit(sd):
        sd["layers.0.mlp.extra_bias"] = torch.zeros(64)
        del sd["layers.1.self_attn.k_proj.weight"]
        del sd["layers.0.mlp.up_proj_w"]

    src = make_source(tmp_path, MU_DIR, edit_weights=edit)
    assert_rejected(
        src,
        tmp_path / "dst",
        "unknown key(s)",
        "layers.0.mlp.extra_bias",
        "missing key(s)",
        "layers.1.self_attn.k_proj.weight",
        "layers.0.mlp.up_proj_w",
    )


def test_missing_key_inl(tmp_path):
    src = make_source(tmp_path, INL_DIR, edit_weights=lambda sd: sd.pop("model.layers.1.dynamics.controller_out.bias"))
    assert_rejected(src, tmp_path / "dst", "missing key(s)", "layers.1.dynamics.controller_out.bias")


def test_shape_mismatch(tmp_path):
    def edit(sd):
        sd["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(48, 64)
        sd["model.layers.0.mlp.mu_router.weight"] = torch.zeros(5, 64)

    src = make_source(tmp_path, INL_DIR, edit_weights=edit)
    assert_rejected(
        src,
        tmp_path / "dst",
        "shape mismatch",
        "layers.1.self_attn.q_proj.weight [48, 64] (expected [64, 64])",
        "layers.0.mlp.mu_router.weight [5, 64]",
    )


def test_config_contradicting_weights(tmp_path):
    src = make_source(
        tmp_path, MU_DIR, name="hidden", edit_config=lambda c: c.update(hidden_size=48, num_attention_heads=3)
    )
    assert_rejected(src, tmp_path / "dst", "hidden_size=48 contradicts embed_tokens.weight of width 64")

    src = make_source(
        tmp_path, INL_DIR, name="experts", edit_config=lambda c: c.update(num_experts=2, intermediate_size=64)
    )
    assert_rejected(src, tmp_path / "dst", "num_experts=2 contradicts", "token_to_expert", "expert ids span [0, 3]")

    src = make_source(tmp_path, MU_DIR, name="layers", edit_config=lambda c: c.update(num_hidden_layers=3))
    assert_rejected(src, tmp_path / "dst", "num_hidden_layers=3 contradicts")

    src = make_source(
        tmp_path, MU_DIR, name="flags", edit_config=lambda c: c.update(shared_expert=False, dynamics_dt=0.1)
    )
    assert_rejected(
        src, tmp_path / "dst", "shared_expert=False contradicts the weights", "dynamics_dt describe the INL design"
    )

    src = make_source(
        tmp_path, INL_DIR, name="fields", edit_config=lambda c: c.update(hidden_act="gelu", mystery_knob=3)
    )
    assert_rejected(src, tmp_path / "dst", "hidden_act='gelu' is not supported", "mystery_knob=3")

    src = make_source(tmp_path, INL_DIR, name="theta", edit_config=lambda c: c.update(rope_theta=500000.0))
    assert_rejected(src, tmp_path / "dst", "rotary frequencies differ from rope_theta=500000.0")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_hidden_layers", "2", "config.json: num_hidden_layers='2' is not a positive integer"),
        ("hidden_size", 64.0, "config.json: hidden_size=64.0 is not a positive integer"),
        ("vocab_size", True, "config.json: vocab_size=True is not a positive integer"),
        ("use_qk_norm", "true", "config.json: use_qk_norm='true' is not true, false or null"),
        ("num_experts", "4", "ComplexityConfig.num_experts: must be a positive integer, got '4'"),
        ("rms_norm_eps", "x", "ComplexityConfig.rms_norm_eps: must be a positive number, got 'x'"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(tmp_path, field, value, message):
    # a string size reached the shape checks and failed there with a bare TypeError
    src = make_source(tmp_path, MU_DIR, edit_config=lambda c: c.update({field: value}))
    assert_rejected(src, tmp_path / "dst", message)


def test_differing_per_layer_tables_rejected(tmp_path):
    def edit(sd):
        sd["layers.1.mlp.token_to_expert"] = sd["layers.1.mlp.token_to_expert"].roll(1)

    src = make_source(tmp_path, MU_DIR, edit_weights=edit)
    with pytest.raises(UpstreamFormatError, match="per-layer routing tables differ"):
        convert_upstream(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_truncated_safetensors(tmp_path):
    src = make_source(tmp_path, MU_DIR)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_rejected(src, tmp_path / "dst", "model.safetensors", "truncated or corrupt")


def test_truncated_pt(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(INL_DIR / "config.json", src / "config.json")
    torch.save(load_file(INL_DIR / "model.safetensors"), src / "model.pt")
    data = (src / "model.pt").read_bytes()
    (src / "model.pt").write_bytes(data[: len(data) * 2 // 3])
    assert_rejected(src, tmp_path / "dst", "model.pt", "truncated or corrupt")


def test_cli_reports_errors_and_writes_nothing(tmp_path, capsys):
    src = make_source(tmp_path, INL_DIR, edit_weights=lambda sd: sd.pop("model.norm.weight"))
    assert cli_main(["convert", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("complexity convert: error:") and "norm.weight" in err
    assert not (tmp_path / "dst").exists()


def test_inspect_writes_nothing(tmp_path):
    report = inspect_upstream(INL_DIR)
    assert report.dst is None and report.design == INL
    assert report.parameters.total > report.parameters.active
