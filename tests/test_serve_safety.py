"""The server against careless and hostile clients: every field validated once with stated
ranges (never a 5xx for a client's mistake), extreme values that never hurt a concurrent good
request, unsupported OpenAI parameters refused by name, lone surrogates, body size and time
limits, header timeouts, a bound on connections, non-streaming disconnects, a dying engine
process, and HTTP fuzzing of the OpenAPI schema the server publishes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from _serve_fixtures import free_port, make_tiny_checkpoint, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch.set_num_threads(1)

MODEL = "tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TALLY = {"requests": 0, "5xx": 0}  # what the fuzz and extreme-value tests sent (printed at the end)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("safety") / "tiny", mu_mode="guidance", max_position_embeddings=1024
    )


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(
        ckpt, max_batch=4, max_body_bytes=256 << 10, body_timeout=2.0, request_timeout=2.0, max_connections=512
    ) as (url, app):
        yield url
    print(f"\n[serve safety] requests tried: {TALLY['requests']}, 5xx answers: {TALLY['5xx']}")


def _post(url, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60, **kw)
    TALLY["requests"] += 1
    TALLY["5xx"] += resp.status_code >= 500
    return resp


def _error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- one boundary, stated ranges


EXTREME = [  # (field, value): each must be refused with 400 naming the field
    ("temperature", 1e-45),
    ("temperature", 5e-324),
    ("temperature", 1e300),
    ("temperature", 10**400),
    ("temperature", -0.5),
    ("top_k", 2**63),
    ("top_k", 10**30),
    ("top_k", -2),
    ("top_p", 5e-324 - 1),
    ("top_p", 1.0000001),
    ("min_p", -1e-300),
    ("repetition_penalty", 1e-40),
    ("repetition_penalty", 5e-324),
    ("repetition_penalty", 1e10),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("max_tokens", -1),
    ("max_tokens", 2**63),
    ("n", 0),
    ("n", 2**63),
    ("logprobs", -1),
    ("logprobs", 21),
    ("stop", [""]),
    ("stop", ["x"] * 17),
    ("stop", "y" * 1001),
    ("prompt", [1, 2, 10**30]),
    ("prompt", [-1]),
    ("prompt", [[]]),
    ("prompt", []),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3),
    ("frequency_penalty", "1"),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {"5": -1e300}),
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {"-1": 1}),
    ("logit_bias", {"100000": 1}),
    ("logit_bias", {"99999999999999999999999": 1}),
    ("logit_bias", [5, 6]),
    ("logit_bias", {"1" * 5000: 1}),
    ("logit_bias", {"07": 1}),
    ("logit_bias", {str(i): 1 for i in range(2049)}),
]
ACCEPTED = [  # edge values inside the ranges: answered 200
    ("temperature", 1e-4),
    ("temperature", 1e4),
    ("top_k", 2**31 - 1),
    ("top_p", 1e-300),
    ("min_p", 1.0),
    ("repetition_penalty", 0.01),
    ("repetition_penalty", 100),
    ("seed", 2**64 - 1),
    ("seed", -(2**63)),
    ("logprobs", 20),
    ("stop", ["x"] * 16),
    ("presence_penalty", -2),
    ("frequency_penalty", 2.0),
    ("logit_bias", {"5": 100, "6": -100}),
]


@pytest.mark.parametrize("field,value", EXTREME)
def test_extreme_values_are_400_naming_the_field(server, field, value):
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 3, field: value}
    _error(_post(server, "/v1/completions", body), 400, param=field)


def test_extreme_values_never_hurt_a_concurrent_good_request(server):
    """Each extreme (and each accepted edge) request goes out together with a good greedy request
    that is admitted in the same prefill step: the good one always gets its exact answer."""
    good = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reference = _post(server, "/v1/completions", good).json()["choices"][0]["text"]

    async def pair(field, value):
        async with httpx.AsyncClient(timeout=60) as c:
            bad = {"model": MODEL, "prompt": "the cat", "max_tokens": 3, field: value}
            r_bad, r_good = await asyncio.gather(
                c.post(server + "/v1/completions", json=bad), c.post(server + "/v1/completions", json=good)
            )
        return r_bad, r_good

    async def run_all():
        return await asyncio.gather(*[pair(f, v) for f, v in EXTREME + ACCEPTED])

    for (field, value), (r_bad, r_good) in zip(EXTREME + ACCEPTED, asyncio.run(run_all())):
        TALLY["requests"] += 2
        TALLY["5xx"] += (r_bad.status_code >= 500) + (r_good.status_code >= 500)
        assert r_good.status_code == 200 and r_good.json()["choices"][0]["text"] == reference, (field, value)
        expected = 200 if (field, value) in ACCEPTED else 400
        assert r_bad.status_code == expected, (field, value, r_bad.text)


def test_lone_surrogates_are_400(server):
    for raw, param in [
        (b'{"prompt": "Hello \\ud800", "max_tokens": 2}', "prompt"),
        (b'{"model": "\\ud800", "prompt": "x", "max_tokens": 2}', "model"),
        (b'{"prompt": "x", "stop": ["\\udfff"], "max_tokens": 2}', "stop"),
        (b'{"prompt": "x", "max_tokens": 2, "\\ud800": 1}', None),
    ]:
        err = _error(_post(server, "/v1/completions", raw), 400, param=param)
        assert "surrogate" in err["message"] or (param is None and "unicode string" in err["message"]), err
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud83d"}], "max_tokens": 2}'
    _error(_post(server, "/v1/chat/completions", raw), 400, param="messages")


def test_validation_errors_name_the_field_as_the_client_wrote_it(server):
    """pydantic puts the union member it tried into an error's location ("prompt.list[int].0",
    "temperature.float", "function-after[_valid_unicode(), str]"): the message names the field
    alone, and says what is wrong with the value rather than which other types it is not."""
    for path, raw, where, msg in [
        ("/v1/completions", b'{"prompt": [1e30], "max_tokens": 2}', "prompt", None),
        ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', "temperature", None),
        ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature", "Input should be a finite number"),
        ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": "x"}}', "logit_bias.5", None),
        ("/v1/completions", b'{"prompt": "x \\ud800"}', "prompt", "must be valid Unicode (it holds a lone surrogate)"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', "messages.0.content", None),
    ]:
        err = _error(_post(server, path, raw), 400, param=where.split(".")[0])
        assert err["message"].startswith(where + ": "), err
        assert "[" not in err["message"] and ".float" not in err["message"], err
        if msg is not None:
            assert err["message"] == f"{where}: {msg}", err
    for role in ("user", "system"):  # no content: OpenAI requires it of every message but an assistant's
        err = _error(_post(server, "/v1/chat/completions", {"messages": [{"role": role}]}), 400, param="messages")
        assert err["message"].startswith(f"messages.0: a {role} message needs content"), err
    part = {"type": "image_url", "image_url": {"url": "x"}}
    err = _error(_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]}), 400)
    assert err["message"] == "Unrecognized request argument supplied: messages.0.content.0.image_url", err
    assert err["param"] == "messages" and err["code"] == "unrecognized_argument"


def test_a_body_not_sent_as_json_says_so(server):
    """`curl -d '{...}'` sends form encoding, which FastAPI does not parse: the answer says to send
    JSON, not that the body "should be a valid dictionary"."""
    body = b'{"prompt": "x", "max_tokens": 2}'
    for headers, sent in [
        ({"Content-Type": "application/x-www-form-urlencoded"}, "'application/x-www-form-urlencoded'"),
        ({}, "without"),
    ]:
        resp = httpx.post(server + "/v1/completions", content=body, headers=headers, timeout=60)
        err = _error(resp, 400)
        assert sent in err["message"] and "'application/json'" in err["message"], err
    for raw in (b"[1, 2]", b"null", b""):
        err = _error(_post(server, "/v1/completions", raw), 400)
        assert err["message"] == "body: must be a JSON object (the request's fields)", err


def test_unknown_and_unsupported_fields_are_refused_by_name(server):
    err = _error(_post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "foo": 1}), 400, param="foo")
    assert err["message"] == "Unrecognized request argument supplied: foo"
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    for kw, name in [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, **kw)
        assert info.value.body["param"] == name and name in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, best_of=3)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="end")
    with pytest.raises(openai.BadRequestError, match="name"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi", "name": "bob"}], max_tokens=2
        )
    # neutral values change nothing: accepted
    r = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=2,
        response_format={"type": "text"},
        user="u1",
    )
    assert r.choices[0].finish_reason in ("length", "stop")


def test_penalties_and_logit_bias_are_applied(server):
    """Through the official client: a +3 bias (the tiny model's logits span well under 3) makes
    greedy decoding repeat that token; presence + frequency penalties of 2 then outweigh the bias
    once the token has been generated, so it is not repeated."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    prompt = [5, 6, 7]
    forced = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logit_bias={"11": 3},
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    plain = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    assert (
        len(set(forced.choices[0].logprobs.tokens)) == 1
        and forced.choices[0].logprobs.tokens != plain.choices[0].logprobs.tokens
    )
    spread = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logit_bias={"11": 3},
        frequency_penalty=2,
        presence_penalty=2,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    toks = spread.choices[0].logprobs.tokens
    assert toks[0] == forced.choices[0].logprobs.tokens[0] and toks[1] != toks[0]
    # the chat endpoint takes the same fields
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logit_bias={"11": 3},
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert [t.token for t in chat.choices[0].logprobs.content] == forced.choices[0].logprobs.tokens[:4]


# ----------------------------------------------------------------------------- limits


def test_body_size_limit_413_before_reading(server):
    big = json.dumps({"prompt": "x" * (300 << 10), "max_tokens": 1}).encode()
    t = time.perf_counter()
    _error(_post(server, "/v1/completions", big), 413, code="request_too_large")
    assert time.perf_counter() - t < 5

    def chunks():  # no Content-Length: the limit holds while the body is read
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * (16 << 10)
        yield b'"}'

    resp = httpx.post(server + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    _error(resp, 413, code="request_too_large")


def test_huge_prompt_is_refused_without_stalling_health(server):
    """A prompt far past the context (within the body limit) is refused from a prefix count; /health
    answers meanwhile."""
    body = {"prompt": "the cat sat on the mat " * 10000, "max_tokens": 1}  # 230k characters

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.ensure_future(c.post(server + "/v1/completions", json=body))
            worst = 0.0
            while not task.done():
                t = time.perf_counter()
                assert (await c.get(server + "/health")).status_code == 200
                worst = max(worst, time.perf_counter() - t)
                await asyncio.sleep(0.01)
            return await task, worst

    resp, worst = asyncio.run(run())
    _error(resp, 400, param="prompt", code="context_length_exceeded")
    assert worst < 1.0


def _raw(port, data: bytes, wait: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait + 5) as s:
        if data:
            s.sendall(data)
        t = time.perf_counter()
        got = b""
        while time.perf_counter() - t < wait + 4:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
        raise AssertionError(f"connection still open after {wait + 4:.0f}s")


def test_slow_headers_slow_body_and_silent_connections_time_out(server):
    port = int(server.rsplit(":", 1)[1])
    assert _raw(port, b"", 2.0).startswith(b"HTTP/1.1 408")  # silent connection
    assert _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", 2.0).startswith(b"HTTP/1.1 408")  # slow headers
    out = _raw(
        port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt":',
        2.0,
    )
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert httpx.get(server + "/health").status_code == 200


def test_connection_bound_answers_503(ckpt):
    with running_server(ckpt, max_batch=2, max_connections=3, request_timeout=30) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            resp = httpx.get(url + "/health", timeout=10)
            assert resp.status_code == 503
        finally:
            for s in idle:
                s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_non_streaming_disconnect_frees_the_slot(server):
    port = int(server.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "the cat", "max_tokens": 900, "ignore_eos": True}).encode()
    before = httpx.get(server + "/health").json()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        deadline = time.time() + 20
        while httpx.get(server + "/health").json()["running"] != before["running"] + 1:
            assert time.time() < deadline
            time.sleep(0.02)
    deadline = time.time() + 5
    while (h := httpx.get(server + "/health").json())["running"] != before["running"]:
        assert time.time() < deadline, "slot not freed after the client left"
        time.sleep(0.02)
    assert h["generated_tokens"] - before["generated_tokens"] < 900  # cancelled, not run to the end
    assert h["aborted"] == before["aborted"] + 1


# ----------------------------------------------------------------------------- fuzzing the published schema


def _strategy(schema: dict, defs: dict):
    """Values for a JSON schema as FastAPI publishes it (anyOf, $ref, type, items, properties),
    biased towards the values that break servers: huge and tiny numbers, surrogates, wrong types."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: _strategy(defs[name], defs))
    if "anyOf" in schema:
        return st.one_of([_strategy(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    t = schema.get("type")
    if t == "string":
        return st.text(max_size=12) | st.sampled_from(["", "\ud800", "the cat", MODEL, "x" * 1200])
    if t == "integer":
        return (
            st.integers(-3, 40)
            | st.integers(-(2**70), 2**70)
            | st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
        )
    if t == "number":
        return st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
            [1e-45, 5e-324, 1e-40, 1e308, -0.0, 0.5, 1.0, 2.0]
        )
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        return st.lists(_strategy(schema.get("items", {}), defs), min_size=schema.get("minItems", 0), max_size=4)
    if t == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: _strategy(v, defs) for k, v in props.items() if k in required},
            optional={k: _strategy(v, defs) for k, v in props.items() if k not in required},
        )
    # no type: a field accepted only in its neutral form; anything JSON
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
        max_leaves=6,
    )


@pytest.fixture(scope="module")
def schema_bodies(server):
    spec = httpx.get(server + "/openapi.json").json()
    defs = spec["components"]["schemas"]
    paths = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
    for path, name in paths.items():  # the published schema is the one the routes validate with
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/" + name)
    return st.one_of([st.tuples(st.just(path), _strategy(defs[name], defs)) for path, name in paths.items()])


def test_fuzz_published_schema_never_5xx(server, schema_bodies):
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=schema_bodies)
    def check(case):
        path, body = case
        for key in ("max_tokens", "max_completion_tokens"):  # keep generations short
            if isinstance(body.get(key), int) and 3 < body[key] < 1024:
                body[key] = 3
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 3
        resp = _post(server, path, json.dumps(body).encode())
        assert resp.status_code < 500, (body, resp.text)
        if resp.status_code >= 400:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert httpx.get(server + "/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------- the engine process


def _start_cli(ckpt, *extra):
    port = free_port()
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
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(0.1)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_dying_engine_process_errors_clients_and_exits_nonzero(ckpt):
    import psutil

    proc, url = _start_cli(ckpt, "--max-batch", "2")
    try:
        [core] = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        body = {"prompt": "the cat", "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(core.pid, signal.SIGKILL)
            rest = [line for line in lines if line]  # the stream ends: an error event, then [DONE]
        assert any("engine died" in line for line in rest), rest[-3:]
        assert proc.wait(30) == 1
        log = proc.stdout.read().decode()
        assert "complexity serve: error: engine died" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_address_in_use_is_one_error_line_before_the_engine_starts(ckpt):
    """The port is bound before the engine process starts: a taken one is `complexity serve: error:`
    and exit 1 at once, not uvicorn's log line and exit 3 after the model loaded (and, on a GPU,
    compiled) and the start-up line announced the address."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "complexity.cli", "serve", str(ckpt), "--port", str(port), "--threads", "1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"complexity serve: error: cannot listen on 127.0.0.1:{port}: Address already in use", last
    assert "engine ready" not in proc.stderr and "engine-core" not in proc.stderr, proc.stderr[-2000:]


def test_bad_engine_flags_are_a_clean_error(ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "complexity.cli", "serve", str(ckpt), "--max-seq-len", "99999", "--threads", "1"]
        + ["--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "COMPLEXITY_API_KEY"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "max_seq_len" in proc.stderr and "Traceback" not in proc.stderr
    # an exposed server without a key is warned about before the engine starts
    warning = proc.stderr.index("complexity serve: warning: listening on 0.0.0.0 without --api-key\n")
    assert warning < proc.stderr.index("complexity serve: error: ")
    for flag, value in (("--request-timeout", "0"), ("--shutdown-timeout", "nan")):
        proc = subprocess.run(
            [sys.executable, "-m", "complexity.cli", "serve", str(ckpt), flag, value],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert proc.returncode == 2 and flag in proc.stderr and "positive, finite number of seconds" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_failed_start_after_the_engine_spawned_stops_its_process(ckpt, monkeypatch):
    """An error between the engine's spawn and serving (building the app, the server) stops the
    engine process before it propagates: none is left holding the model."""
    import complexity.serve
    from complexity.cli import build_parser
    from complexity.commands import serve as serve_command
    from complexity.inference import AsyncEngine

    spawned = []
    real_spawn = AsyncEngine.spawn.__func__

    def spawn(cls, *args, **kwargs):
        spawned.append(real_spawn(cls, *args, **kwargs))
        return spawned[-1]

    def create_app(*args, **kwargs):
        raise RuntimeError("create_app failed")

    monkeypatch.setattr(AsyncEngine, "spawn", classmethod(spawn))
    monkeypatch.setattr(complexity.serve, "create_app", create_app)
    args = build_parser().parse_args(["serve", str(ckpt), "--threads", "1", "--port", str(free_port())])
    with pytest.raises(RuntimeError, match="create_app failed"):
        serve_command.run(args)
    assert len(spawned) == 1 and not spawned[0].core.alive()


def test_the_engine_loads_while_the_tokenizer_does_and_a_tokenizer_failure_stops_it(ckpt, monkeypatch):
    """`AsyncEngine.spawn` starts the core process first, so its imports and checkpoint load run
    while the API process loads the tokenizer (start-up time); when that load fails, the process
    is killed at once (not left loading the model) and the error propagates unchanged."""
    import multiprocessing

    import transformers

    from complexity.inference import AsyncEngine

    seen = []

    def failing_tokenizer(*args, **kwargs):
        seen.extend(p for p in multiprocessing.active_children() if p.name == "complexity-engine-core")
        raise OSError("tokenizer.json: unreadable")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", failing_tokenizer)
    with pytest.raises(OSError, match="tokenizer.json: unreadable"):
        AsyncEngine.spawn(str(ckpt), {"device": "cpu", "max_batch": 2}, threads=1)
    assert len(seen) == 1  # the core was running while the tokenizer loaded
    assert not seen[0].is_alive() and seen[0].exitcode == -9  # killed, not waited for
