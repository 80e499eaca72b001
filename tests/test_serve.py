"""The OpenAI-compatible server, live: the official openai client, streaming, echo+logprobs
against a direct forward pass, 64 concurrent requests vs sequential greedy, fuzzed bad input,
client disconnects, API keys, limits (429) and SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from _serve_fixtures import free_port as _free_port
from _serve_fixtures import make_tiny_checkpoint, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch.set_num_threads(1)

API_KEY = "test-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("serve") / "tiny", mu_mode="guidance", shared_expert=True, max_position_embeddings=4096
    )


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(ckpt, api_key=API_KEY, max_batch=8) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(ckpt):
    from transformers import AutoModelForCausalLM

    import complexity  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _post(url, path, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        headers["Content-Type"] = "application/json"
        return httpx.post(url + path, content=body, headers=headers, timeout=60, **kw)
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def _assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"]


# ----------------------------------------------------------------------------- the openai client


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_completion(client, model, ckpt):
    r = client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert r.usage.prompt_tokens == 3 or r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # same text as a direct greedy generate
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor([tok("the cat sat").input_ids])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[
        0, ids.shape[1] :
    ]
    assert choice.text == tok.decode([t for t in ref.tolist() if t not in (0, 1)])
    # several prompts, n > 1 with a seed
    r = client.completions.create(model=MODEL, prompt=["the", "a dog"], max_tokens=5, n=2, seed=3, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_serves_a_hash_routed_checkpoint(tmp_path):
    """`complexity serve`'s stack over a top-2 hash-routed model: the greedy completion is the
    model's own greedy `generate()`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_checkpoint(
        tmp_path / "hash", mlp_type="hash_routed", num_experts_per_tok=2, shared_expert=True, routed_output_scale=2.0
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with running_server(path, max_batch=4) as (url, _):
        r = httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": "the cat sat on", "max_tokens": 10, "temperature": 0},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    ids = torch.tensor([tok("the cat sat on").input_ids])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)[0, ids.shape[1] :]
    assert r.json()["choices"][0]["text"] == tok.decode([t for t in ref.tolist() if t not in (0, 1)])
    assert r.json()["usage"]["completion_tokens"] == len([t for t in ref.tolist() if t != 1])


def test_chat(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 8
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_streaming_matches_non_streaming(client):
    kw = dict(model=MODEL, prompt="once upon a time", max_tokens=16, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    msgs = [{"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    streamed = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_decode_steps_serve_the_same_answers(ckpt, client):
    """A server reading the tokens every 4 decode steps answers as the default one: completions
    and chats, streamed (deltas several tokens long) or not, greedy and seeded, with usage and
    finish reasons; a stop string cuts at the same place (usage included), penalties and logprobs
    give the same tokens and logprobs."""
    with running_server(ckpt, api_key=API_KEY, max_batch=4, decode_steps=4) as (url, _):
        ahead = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        for kw in (
            dict(prompt="once upon a time", max_tokens=21, temperature=0),
            dict(prompt="the cat", max_tokens=13, temperature=0.9, seed=7),
        ):
            want, got = (c.completions.create(model=MODEL, **kw) for c in (client, ahead))
            assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
            assert got.choices[0].finish_reason == want.choices[0].finish_reason
            chunks = list(ahead.completions.create(model=MODEL, **kw, stream=True))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
        kw = dict(prompt="the cat", max_tokens=13, temperature=0.9, seed=7, stop=[want.choices[0].text[2:5]])
        want, got = (c.completions.create(model=MODEL, **kw) for c in (client, ahead))
        assert got.choices[0].text == want.choices[0].text and got.choices[0].finish_reason == "stop"
        assert got.usage == want.usage
        chunks = list(ahead.completions.create(model=MODEL, **kw, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
        assert chunks[-1].usage == want.usage
        kw = dict(
            prompt="the cat", max_tokens=12, temperature=0, frequency_penalty=0.8, logit_bias={"7": 2}, logprobs=2
        )
        want, got = (c.completions.create(model=MODEL, **kw) for c in (client, ahead))
        assert (got.choices[0].text, got.usage) == (want.choices[0].text, want.usage)
        w, g = want.choices[0].logprobs, got.choices[0].logprobs
        assert g.tokens == w.tokens and [list(t) for t in g.top_logprobs] == [list(t) for t in w.top_logprobs]
        assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-5)
        msgs = [{"role": "user", "content": "hello there"}]
        want, got = (
            c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0) for c in (client, ahead)
        )
        assert got.choices[0].message.content == want.choices[0].message.content


def test_echo_logprobs_match_forward(client, model, ckpt):
    """What lm-evaluation-harness' local-completions sends for log-likelihood: token ids,
    echo=True, logprobs=1, max_tokens=1 (and 0)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("the big red dog sat on the mat").input_ids
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for max_tokens in (1, 0):
        r = client.completions.create(
            model=MODEL, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0
        )
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - logp[i - 1, ids[i]].item()) < 1e-4
            assert abs(max(lp.top_logprobs[i].values()) - logp[i - 1].max().item()) < 1e-4
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert r.choices[0].text.startswith(tok.decode(ids))
        if max_tokens == 1:  # the generated token is greedy: its logprob is the top-1
            assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
            assert abs(lp.token_logprobs[-1] - logp[-1].max().item()) < 1e-4
    # a string prompt with echo: the prompt text comes back first
    r = client.completions.create(model=MODEL, prompt="the cat", max_tokens=2, echo=True, logprobs=0, temperature=0)
    assert r.choices[0].text.startswith("the cat")


def test_64_concurrent_requests_match_sequential(server):
    url = server[0]
    prompts = [
        " ".join(["the", "cat", "dog", "sat", "on", "mat", "red", "sun"][: 1 + i % 8]) + f" {i}" for i in range(64)
    ]
    max_tokens = [4 + (i * 7) % 13 for i in range(64)]
    sync = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    sequential = [
        sync.completions.create(model=MODEL, prompt=p, max_tokens=m, temperature=0).choices[0].text
        for p, m in zip(prompts, max_tokens)
    ]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        async with aclient:
            rs = await asyncio.gather(
                *[
                    aclient.completions.create(model=MODEL, prompt=p, max_tokens=m, temperature=0)
                    for p, m in zip(prompts, max_tokens)
                ]
            )
        return [r.choices[0].text for r in rs]

    assert asyncio.run(run_all()) == sequential
    stats = httpx.get(url + "/health").json()
    assert stats["running"] == 0 and stats["inflight"] == 0 and stats["free_slots"] == stats["max_batch"]


# ----------------------------------------------------------------------------- bad input


def test_api_key(server):
    url = server[0]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    _assert_error(_post(url, "/v1/completions", body, key=None), 401)
    _assert_error(_post(url, "/v1/completions", body, key="wrong"), 401)
    assert httpx.get(url + "/v1/models").status_code == 401
    assert _post(url, "/v1/completions", body).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 2),
        ("top_k", -5),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("n", 0),
        ("n", 1000),
        ("max_tokens", -1),
        ("max_tokens", 10**12),
        ("logprobs", 99),
        ("temperature", "hot"),
        ("max_tokens", 3.5),
        ("stream", "yes"),
        ("stop", 7),
        ("seed", "x"),
        ("prompt", []),
        ("prompt", [[]]),
        ("prompt", [1, 2, 10**9]),
        ("prompt", "word " * 5000),
    ],
)
def test_invalid_fields_named(server, field, value):
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 4, field: value}
    _assert_error(_post(server[0], "/v1/completions", body), 400, param=field)


def test_unknown_model_and_route(server):
    _assert_error(_post(server[0], "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, param="model")
    _assert_error(httpx.get(server[0] + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}), 404)
    _assert_error(_post(server[0], "/v1/completions", b"{not json"), 400)
    _assert_error(_post(server[0], "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, param="messages")
    _assert_error(
        _post(server[0], "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
        400,
        param="messages",
    )


# fields wrong whatever the prompt: each must be refused before any tokenization or chat template
_PROMPT_FREE_ERRORS = [
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"seed": 2**64 - 1, "n": 2}, "seed"),  # the second choice's seed is out of range
    ({"logit_bias": {"100000": 1}}, "logit_bias"),  # past the model's vocabulary
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
]


def _record_calls(monkeypatch, obj, name: str) -> list:
    """The arguments of every call of the async method obj.name, which still runs."""
    calls, real = [], getattr(obj, name)

    async def recording(arg):
        calls.append(arg)
        return await real(arg)

    monkeypatch.setattr(obj, name, recording)
    return calls


@pytest.mark.parametrize("fields,param", _PROMPT_FREE_ERRORS + [({"top_logprobs": 2}, "top_logprobs")])
def test_chat_fields_are_checked_before_the_chat_template(server, monkeypatch, fields, param):
    """Under a template that refuses every conversation, an invalid field is still the 400 that
    names it, and the template never ran; a valid request reaches the template."""
    url, app = server
    engine = app.state.engine
    rendered = _record_calls(monkeypatch, engine, "apply_chat_template")
    monkeypatch.setattr(engine.tokenizer, "chat_template", "{{ raise_exception('this template refuses all') }}")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 5000}], "max_tokens": 3}
    _assert_error(_post(url, "/v1/chat/completions", {**body, **fields}), 400, param=param)
    assert rendered == []
    _assert_error(_post(url, "/v1/chat/completions", body), 400, param="messages")
    assert len(rendered) == 1


@pytest.mark.parametrize("fields,param", _PROMPT_FREE_ERRORS + [({"logprobs": 99}, "logprobs")])
def test_completion_fields_are_checked_before_tokenizing(server, monkeypatch, fields, param):
    url, app = server
    encoded = _record_calls(monkeypatch, app.state.engine, "encode")
    body = {"model": MODEL, "prompt": ["the cat", "sat"], "max_tokens": 3}
    _assert_error(_post(url, "/v1/completions", {**body, **fields}), 400, param=param)
    assert encoded == []
    assert _post(url, "/v1/completions", body).status_code == 200 and encoded == ["the cat", "sat"]


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_fields = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "seed",
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "repetition_penalty",
    "ignore_eos",
]
_small = st.one_of(
    _json,
    st.integers(min_value=-3, max_value=40),
    st.just(MODEL),
    st.just("the cat"),
    st.lists(st.integers(min_value=-2, max_value=500), max_size=6),
    st.just([{"role": "user", "content": "hi"}]),
)
_bodies = st.one_of(
    _json,
    st.dictionaries(st.sampled_from(_fields), _small, max_size=8),
    st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": _small},
        optional={k: _small for k in ("max_tokens", "temperature", "n", "logprobs", "echo", "stream", "stop")},
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=_bodies,
    raw=st.one_of(st.none(), st.binary(max_size=40)),
)
def test_fuzz_never_5xx(server, path, body, raw):
    url = server[0]
    if isinstance(body, dict) and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 3  # keep generations short
    content = raw if raw is not None else json.dumps(body).encode()
    resp = _post(url, path, content)
    assert resp.status_code < 500, (body, resp.text)
    if resp.status_code >= 400:
        assert "error" in resp.json()


def test_fuzz_leaves_server_healthy(server):
    stats = httpx.get(server[0] + "/health").json()
    assert stats["status"] == "ok"


# ----------------------------------------------------------------------------- disconnects, limits, shutdown


def _metric(url, name) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_disconnect_mid_stream_frees_slot(server):
    url = server[0]
    aborted = _metric(url, "complexity_aborted_requests_total")
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(g.startswith("data: ") for g in got)
            assert _metric(url, "complexity_requests_running") == 1
    deadline = time.time() + 10
    while _metric(url, "complexity_requests_running") != 0:
        assert time.time() < deadline, "slot not freed after disconnect"
        time.sleep(0.05)
    assert _metric(url, "complexity_aborted_requests_total") == aborted + 1
    assert _metric(url, "complexity_free_slots") == 8
    assert "complexity_time_to_first_token_seconds_bucket" in httpx.get(url + "/metrics").text


def test_limits_answer_429(ckpt):
    with running_server(ckpt, max_batch=1, max_concurrent=2, max_queued_tokens=40) as (url, _):
        headers = {"Authorization": "Bearer none"}
        body = {"model": MODEL, "prompt": "the cat", "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as c:
            with (
                c.stream("POST", url + "/v1/completions", json=body, headers=headers) as r1,
                c.stream("POST", url + "/v1/completions", json=body, headers=headers) as r2,
            ):
                assert r1.status_code == 200 and r2.status_code == 200
                lines = r1.iter_lines()  # keep a reference: a collected iterator closes the response
                next(lines)
                resp = _post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, key=None)
                _assert_error(resp, 429)
                assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        deadline = time.time() + 10
        while httpx.get(url + "/health").json()["inflight"]:
            assert time.time() < deadline
            time.sleep(0.05)
        # a prompt longer than the queued-token budget
        _assert_error(
            _post(url, "/v1/completions", {"model": MODEL, "prompt": list(range(10, 60)), "max_tokens": 1}, key=None),
            429,
        )
        assert (
            _post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, key=None).status_code == 200
        )
        assert _metric(url, "complexity_rejected_requests_total") == 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("flags", [[], ["--compile"]], ids=["eager", "compiled"])
def test_sigterm_shuts_down_cleanly(ckpt, flags):
    """SIGTERM mid-stream: the stream ends, the server exits cleanly and leaves nothing behind (with
    the decode step compiled too: torch.compile's tracer draws progress bars whose lock was a
    semaphore the engine process never released)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "complexity.cli",
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--threads",
            "1",
            "--shutdown-timeout",
            "3",
            "--log-level",
            "warning",
            "--max-batch",
            "2",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]  # the stream ends (cancelled after 3 s), it does not hang
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] in ("abort", "length")
        # uvicorn re-raises the captured signal after its graceful shutdown: -SIGTERM is the clean exit
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert f"complexity serve: tiny on {url}; engine ready in " in log and "Traceback" not in log
        assert re.search(r"; start-up process start \d+\.\ds, load \d+\.\ds", log), log[-2000:]  # where the time went
        assert "leaked semaphore" not in log, log[-2000:]  # nothing left for the resource tracker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
