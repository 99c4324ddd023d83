"""The OpenAI-compatible server, driven by the real `openai` client against 127.0.0.1 (tiny model)."""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import resource
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from vlmkit.config import BridgeConfig, LLMConfig
from vlmkit.infer.api import ServerConfig
from vlmkit.infer.batching import BatchWorker, Job
from vlmkit.infer.generate import ChatRequest, ChatResult, Predictor, TextStream
from vlmkit.infer.media import MediaError, MediaPolicy
from vlmkit.infer.server import build_predictor, create_app
from vlmkit.models.fusion.xattn import XAttnFusionConfig
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel

from conftest import random_image, tiny_model_config
from serving import ServerThread


@pytest.fixture(scope="module")
def model_dir(tiny_vlm, tmp_path_factory):
    return tiny_vlm.save_pretrained(tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def predictor(model_dir):
    loaded = build_predictor(model_dir)
    return Predictor(loaded.model)


@pytest.fixture(scope="module")
def server(predictor):
    config = ServerConfig(
        model_name="tiny",
        max_tokens_limit=64,
        max_images_per_request=2,
        max_body_bytes=2_000_000,
        max_prompt_tokens=200,
    )
    with ServerThread(create_app(predictor, config)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lively():
    """A tiny model with a large init range, so answers vary by prompt (and include partial UTF-8 tokens)."""
    torch.manual_seed(0)
    cfg = tiny_model_config(llm=LLMConfig.make("tiny", hf_config={"initializer_range": 0.3}))
    return Predictor(VisionLanguageModel.from_config(cfg).eval())


@pytest.fixture(scope="module")
def lively_server(lively):
    with ServerThread(create_app(lively, ServerConfig(model_name="lively"))) as srv:
        yield srv


@pytest.fixture
def lively_client(lively_server):
    return openai.OpenAI(api_key="unused", base_url=f"{lively_server.url}/v1", max_retries=0, timeout=60)


def _data_url(seed: int = 0, size=(40, 30)) -> str:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _user(text: str, image_url: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return [{"role": "user", "content": content}]


def _assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, response.text
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# -------------------------------------------------------------------------------------------- basics


def test_plain_completion_matches_the_predictor(client, predictor):
    reply = client.chat.completions.create(model="tiny", messages=_user("Hello there"), max_tokens=7)
    expected = predictor.chat(_user("Hello there"), max_new_tokens=7)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert (
        reply.usage.prompt_tokens == expected.prompt_tokens == predictor.prompt_length(_user("Hello there"))
    )
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("fixture", ["server", "lively_server"])
def test_streaming_chunks_add_up_to_the_plain_answer(fixture, request):
    server = request.getfixturevalue(fixture)
    client = openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0, timeout=60)
    messages = _user("Tell me something")
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(pieces)
    assert text == plain.choices[0].message.content
    assert len(pieces) > 1  # incremental, not one final blob
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # the raw stream is SSE and ends with [DONE]
    body = {"messages": messages, "max_tokens": 3, "stream": True}
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_image_as_data_url(client, predictor):
    url = _data_url(3, (64, 48))
    reply = client.chat.completions.create(model="tiny", messages=_user("What is this?", url), max_tokens=4)
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert reply.usage.prompt_tokens == predictor.prompt_length(with_image, [random_image(3, (64, 48))])
    assert reply.usage.prompt_tokens == predictor.prompt_length(with_image)  # one tile per image here
    assert reply.usage.prompt_tokens >= predictor.model.tokens_per_image() + predictor.prompt_length(
        _user("What is this?")
    )
    expected = predictor.chat(with_image, [random_image(3, (64, 48))], max_new_tokens=4)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.boxes == []  # extra field: boxes in original pixels (none here)


def test_prompt_length_counts_anyres_tiles_from_image_sizes():
    from vlmkit.config import ProcessorConfig

    torch.manual_seed(0)
    grid = [[64, 32], [32, 64], [64, 64]]
    cfg = tiny_model_config(processor=ProcessorConfig(resize="anyres", anyres_grid=grid))
    predictor = Predictor(VisionLanguageModel.from_config(cfg).eval())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    image = random_image(0, (80, 40))
    batch, _ = predictor.prepare([ChatRequest(messages, [image])])
    assert predictor.num_tiles(image) == 3  # global view + a 2x1 grid
    assert predictor.prompt_length(messages, [image]) == int(batch["attention_mask"].sum())
    assert predictor.prompt_length(messages, [image]) > predictor.prompt_length(messages)  # 1 tile assumed


def test_sampling_options_seed_and_stop(lively_client):
    client = lively_client
    kwargs = {"model": "m", "messages": _user("Count"), "max_tokens": 12, "temperature": 1.5, "top_p": 0.9}
    first = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    again = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    other = [client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (1, 2, 3)]
    assert first == again  # same seed, same sample
    assert any(o != first for o in other)  # and the seed matters
    greedy = client.chat.completions.create(model="m", messages=_user("Count"), max_tokens=12)
    text = greedy.choices[0].message.content
    assert greedy.choices[0].finish_reason == "length" and len(text) > 6
    stop = text[3:6]
    stopped = client.chat.completions.create(model="m", messages=_user("Count"), max_tokens=12, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < greedy.usage.completion_tokens


def test_models_health_and_openapi(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/models" in schema["paths"]
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


# -------------------------------------------------------------------------------------------- errors


def test_openai_client_sees_a_400_with_the_error_shape(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=_user("hi"), max_tokens=10_000)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "max_tokens" and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["code"] == "max_tokens_exceeded"
    with pytest.raises(openai.BadRequestError) as err:  # max_completion_tokens wins, but both must be valid
        client.chat.completions.create(
            model="tiny", messages=_user("hi"), max_tokens=10_000, max_completion_tokens=5
        )
    assert err.value.body["param"] == "max_tokens"


BAD_REQUESTS = {
    "no messages": {"messages": []},
    "wrong type": {"messages": "hello"},
    "unknown role": {"messages": [{"role": "tool", "content": "x"}]},
    "unknown part": {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
    "max_tokens 0": {"messages": _user("hi"), "max_tokens": 0},
    "temperature": {"messages": _user("hi"), "temperature": 5},
    "top_p": {"messages": _user("hi"), "top_p": 0},
    "n": {"messages": _user("hi"), "n": 3},
    "too many stops": {"messages": _user("hi"), "stop": ["a", "b", "c", "d", "e"]},
    "empty stop": {"messages": _user("hi"), "stop": [""]},
    "too many images": {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in range(3)],
            }
        ]
    },
    "image in assistant turn": {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": _data_url()}}]},
            {"role": "user", "content": "and?"},
        ]
    },
    "last turn assistant": {"messages": [{"role": "assistant", "content": "hi"}]},
    "bad base64": {"messages": _user("hi", "data:image/png;base64,!!!")},
    "not an image": {"messages": _user("hi", "data:image/png;base64," + base64.b64encode(b"hello").decode())},
    "remote media off": {"messages": _user("hi", "http://127.0.0.1/x")},
    "metadata url": {"messages": _user("hi", "http://169.254.169.254/latest/meta-data/")},
    "local media off": {"messages": _user("hi", "/etc/passwd")},
    "file url": {"messages": _user("hi", "file:///etc/passwd")},
    "image token in text": {"messages": _user("look: <image>")},
    "prompt too long": {"messages": _user("word " * 400)},
    "lone surrogate": {"messages": _user("\ud800 broken")},
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_in_openai_shape(server, name):
    body = json.dumps(BAD_REQUESTS[name]).encode()  # ASCII-escaped, so a lone surrogate survives encoding
    headers = {"content-type": "application/json"}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=60)
    _assert_openai_error(response, 400)


def test_malformed_bodies_and_routes(server):
    url = f"{server.url}/v1/chat/completions"
    _assert_openai_error(
        httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    _assert_openai_error(
        httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400
    )
    _assert_openai_error(httpx.get(url), 405)
    _assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    big = json.dumps({"messages": _user("x" * 2_100_000)}).encode()
    error = _assert_openai_error(
        httpx.post(url, content=big, headers={"content-type": "application/json"}), 413
    )
    assert error["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}]}'

    error = _assert_openai_error(
        httpx.post(url, content=chunked(), headers={"content-type": "application/json"}), 413
    )
    assert error["code"] == "request_too_large"


def test_streaming_errors_are_4xx_before_the_stream_starts(server):
    for messages in (_user("word " * 400), _user("hi", "data:image/png;base64,!!!")):
        body = {"messages": messages, "stream": True}
        _assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60), 400)


def test_without_max_tokens_the_default_is_capped_at_the_limit(server):
    body = {"messages": _user("hi"), "ignore_eos": True}  # the config's default (256) is over its limit (64)
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 64


# ------------------------------------------------------------------------------------------- batching


def test_concurrent_requests_share_forward_passes(lively):
    predictor = Predictor(lively.model)
    config = ServerConfig(batch_window_ms=300, max_batch=8)
    prompts = [f"question number {i}" + " more" * i for i in range(6)]
    limits = [3, 5, 7, 4, 6, 8]
    solo = [predictor.chat(_user(p), max_new_tokens=n) for p, n in zip(prompts, limits)]
    app = create_app(predictor, config)
    with ServerThread(app) as srv:
        client = openai.OpenAI(api_key="x", base_url=f"{srv.url}/v1", max_retries=0, timeout=60)

        def ask(i: int):
            return client.chat.completions.create(model="m", messages=_user(prompts[i]), max_tokens=limits[i])

        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(ask, range(len(prompts))))
    stats = app.state.engine.stats
    assert stats.decoded_rows > 2 * stats.decode_steps  # several rows per decode step
    assert len({r.choices[0].message.content for r in replies}) > 1  # distinct answers, not one row copied
    for reply, expected, limit in zip(replies, solo, limits):  # each row keeps its own answer and budget
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == expected.completion_tokens <= limit


def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_an_idle_server_encodes_a_bursts_images_while_gathering_it_then_serves_it_together(lively):
    """The first request's images go through the tower while the server still waits for the rest of the burst;
    the burst is prefilled and decoded together once the window closes."""
    from vlmkit.infer.engine import Engine

    predictor = Predictor(lively.model)
    engine = Engine(predictor, max_rows=4)
    worker = BatchWorker(predictor, ServerConfig(batch_window_ms=1500, batch_max_wait_ms=1500), engine)
    greedy = GenerationConfig(max_new_tokens=6, eos_token_ids=[-1])
    done: list[tuple[str, object]] = []
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    jobs = [Job(ChatRequest(turn, [random_image(i)]), greedy, done.append) for i in range(2)]
    worker.start()
    try:
        worker.submit(jobs[0])
        _until(lambda: bool(engine.waiting) and engine.waiting[0].visual is not None)  # encoded in the window
        assert engine.stats.prefill_tokens == 0 and engine.stats.decode_steps == 0  # nothing else yet
        worker.submit(jobs[1])
        _until(lambda: sum(kind == "done" for kind, _ in done) == 2)
    finally:
        worker.stop()
    # prefilled together, then both rows decoded their 5 other tokens in the same 5 steps
    assert engine.stats.decode_steps == 5 and engine.stats.decoded_rows == 10
    solo = [predictor.generate([job.request], greedy)[0].token_ids for job in jobs]
    assert [value.token_ids for kind, value in done if kind == "done"] in (solo, solo[::-1])


def test_a_request_joins_the_running_batch_and_leaves_it_when_done(lively):
    """Continuous batching through the server: a late request starts before an early long one ends, and a short
    one ends (and answers) while the long one goes on."""
    app = create_app(Predictor(lively.model), ServerConfig(batch_window_ms=0))
    with ServerThread(app) as srv:
        url = f"{srv.url}/v1/chat/completions"
        body = {
            "messages": _user("a long answer please"),
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", url, json=body, timeout=60) as long_stream:
            lines = long_stream.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the long request is decoding
            short = httpx.post(
                url, json={"messages": _user("short"), "max_tokens": 3, "ignore_eos": True}, timeout=60
            )
            assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
            rest = [line for line in lines if line.startswith("data: {")]
        finished = json.loads(rest[-2][6:]) if '"usage"' in rest[-1] else json.loads(rest[-1][6:])
        assert finished["choices"][0]["finish_reason"] == "length"
    stats = app.state.engine.stats
    assert stats.decoded_rows > stats.decode_steps  # the short one shared decode steps with the long one
    assert stats.finished["length"] == 2


def test_rows_with_different_budgets_and_stops_share_one_batch(lively):
    predictor = Predictor(lively.model)
    free = predictor.chat(_user("second one"), max_new_tokens=8, eos_token_ids=[-1]).text
    stop = free[4:6]
    requests = [
        ChatRequest(_user("first"), config=GenerationConfig(max_new_tokens=3, eos_token_ids=[-1])),
        ChatRequest(
            _user("second one"),
            config=GenerationConfig(max_new_tokens=8, eos_token_ids=[-1], stop_strings=[stop]),
        ),
    ]
    deltas: dict[int, list[str]] = {0: [], 1: []}
    results = predictor.generate(requests, on_text=lambda row, d: deltas[row].append(d))
    assert results[0].completion_tokens == 3 and results[0].finish_reason == "length"
    assert results[1].text == free[: free.index(stop)] and results[1].finish_reason == "stop"
    for row, result in enumerate(results):
        assert "".join(deltas[row]) == result.text
    with pytest.raises(ValueError, match="sampling"):
        predictor.generate(
            [
                ChatRequest(_user("a"), config=GenerationConfig(do_sample=True)),
                ChatRequest(_user("b"), config=GenerationConfig()),
            ]
        )


def test_text_stream_holds_back_partial_characters_and_stop_strings(tiny_vlm):
    tok = tiny_vlm.tokenizer
    text = "box: héllo 😀 END tail"
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok, [-1], ["END"], max_new_tokens=100)
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "".join(pieces) == stream.text == "box: héllo 😀 "
    assert stream.finish_reason == "stop" and "E" not in "".join(pieces)
    budget = TextStream(tok, [-1], [], max_new_tokens=3, incremental=False)
    assert [budget.push(t) for t in ids[:3]][:2] == ["", ""]  # non-incremental: text only at the end
    assert budget.finish_reason == "length" and budget.text == tok.decode(ids[:3])


# ------------------------------------------------------------------------------------- robustness


class FlakyBackend:
    """A backend whose generation fails for prompts containing "boom" and blocks for "slow" until cancelled."""

    def __init__(self) -> None:
        self.calls = 0

    def prompt_length(self, messages, images=()) -> int:
        if "badprompt" in messages[-1]["content"][-1]["text"]:
            raise TypeError("the tokenizer chokes")
        return 5

    def generate(self, requests, config=None, streamer=None, on_text=None, should_stop=None):
        self.calls += 1
        texts = [m["content"][-1]["text"] for m in (r.messages[-1] for r in requests)]
        if any("boom" in t for t in texts):
            raise RuntimeError("kaboom")
        if any("slow" in t for t in texts):
            while not all(should_stop(i) for i in range(len(requests))):
                time.sleep(0.01)
        return [ChatResult(f"echo {t}", [1], 5, 1, "stop", []) for t in texts]


def test_failing_or_slow_generation_does_not_kill_the_worker():
    backend = FlakyBackend()
    config = ServerConfig(request_timeout_s=1.0, batch_window_ms=200)
    with ServerThread(create_app(backend, config)) as srv:
        url = f"{srv.url}/v1/chat/completions"

        def post(text: str) -> httpx.Response:
            return httpx.post(url, json={"messages": _user(text)}, timeout=30)

        with ThreadPoolExecutor(3) as pool:  # bad requests batched with a good one
            bad, unreadable, good = pool.map(post, ["boom", "badprompt", "fine"])
        assert _assert_openai_error(bad, 400)["code"] == "generation_failed"
        assert _assert_openai_error(unreadable, 400)["code"] == "invalid_prompt"
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "echo fine"
        assert backend.calls >= 2  # the failed batch was retried request by request
        timed_out = post("slow")
        assert _assert_openai_error(timed_out, 408)["code"] == "request_timeout"
        after = post("still alive?")
        assert (
            after.status_code == 200
            and after.json()["choices"][0]["message"]["content"] == "echo still alive?"
        )
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"


def test_a_failure_after_the_stream_started_ends_it_with_an_error_event():
    with ServerThread(create_app(FlakyBackend(), ServerConfig())) as srv:
        body = {"messages": _user("boom"), "stream": True}
        response = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=30)
    events = [e[len("data: ") :] for e in response.text.split("\n\n") if e]
    assert response.status_code == 200 and events[-1] == "[DONE]"  # headers were already sent
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "generation_failed"


def test_stream_client_disconnect_cancels_the_row():
    backend = FlakyBackend()
    with ServerThread(create_app(backend, ServerConfig(request_timeout_s=30))) as srv:
        body = {"messages": _user("slow"), "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: ")
        deadline = time.monotonic() + 10  # the worker notices the cancellation and serves the next request
        reply = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": _user("next")}, timeout=15)
        assert time.monotonic() < deadline
        assert reply.json()["choices"][0]["message"]["content"] == "echo next"


def test_a_forming_batch_waits_for_requests_still_being_admitted():
    backend = FlakyBackend()
    config = ServerConfig(batch_window_ms=20, batch_max_wait_ms=2000)
    worker = BatchWorker(backend, config)
    events: list[tuple] = []

    def job(text: str) -> Job:
        return Job(ChatRequest(_user(text)), GenerationConfig(), events.append)

    worker.start()
    try:
        with worker.admitting():  # a second request is still loading its images...
            worker.submit(job("first"))
            time.sleep(0.3)  # ...for much longer than the window
            worker.submit(job("second"))
        _wait_for(lambda: sum(e[0] == "done" for e in events) == 2)
        assert backend.calls == 1  # one batch for both

        worker.submit(job("third"))  # nothing being admitted: a late request gets its own batch
        time.sleep(0.3)
        worker.submit(job("fourth"))
        _wait_for(lambda: sum(e[0] == "done" for e in events) == 4)
        assert backend.calls == 3
    finally:
        worker.stop()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_queue_limit_answers_429():
    gate = threading.Event()

    class Blocking(FlakyBackend):
        def generate(self, requests, *args, **kwargs):
            gate.wait(10)
            return super().generate(requests, *args, **kwargs)

    config = ServerConfig(max_queue=1, max_batch=1, batch_window_ms=0)
    with ServerThread(create_app(Blocking(), config)) as srv:
        url = f"{srv.url}/v1/chat/completions"
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(httpx.post, url, json={"messages": _user(f"q{i}")}, timeout=30) for i in range(4)
            ]
            time.sleep(1.0)
            gate.set()
            statuses = sorted(f.result().status_code for f in futures)
    assert 429 in statuses and 200 in statuses
    assert all(s in (200, 429) for s in statuses)


def test_media_policy_reaches_the_server(tmp_path, tiny_vlm):
    (tmp_path / "media").mkdir()
    random_image(5, (50, 20)).save(tmp_path / "media" / "a.png")
    (tmp_path / "outside.png").write_bytes((tmp_path / "media" / "a.png").read_bytes())
    config = ServerConfig(media=MediaPolicy(allowed_local_paths=[tmp_path / "media"]))
    with ServerThread(create_app(Predictor(tiny_vlm), config)) as srv:
        url = f"{srv.url}/v1/chat/completions"
        ok = httpx.post(
            url, json={"messages": _user("hi", f"file://{tmp_path}/media/a.png"), "max_tokens": 2}, timeout=60
        )
        assert ok.status_code == 200, ok.text
        for ref in (f"{tmp_path}/media/../outside.png", f"file://{tmp_path}/outside.png"):
            refused = httpx.post(url, json={"messages": _user("hi", ref)}, timeout=60)
            assert _assert_openai_error(refused, 400)["code"] == "local_media_refused"


def _metrics(url: str) -> dict[str, float]:
    """The samples of a Prometheus text page (name{labels} -> value)."""
    from prometheus_client.parser import text_string_to_metric_families

    page = httpx.get(f"{url}/metrics", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(page.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.mark.parametrize(
    "parts",
    [
        {"bridge": BridgeConfig.make("qformer", num_queries=4)},
        {"fusion": XAttnFusionConfig(mode="xattn", every=1, heads=2)},
    ],
    ids=["qformer", "xattn"],
)
def test_qformer_and_xattn_models_are_served_with_the_same_features(parts):
    """Concurrent streams with images (each its own answer), the image-feature cache across turns, /metrics, and a
    cancelled stream freeing its row — on a Q-Former bridge and on xattn fusion."""
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(
        tiny_model_config(llm=LLMConfig.make("tiny", hf_config={"initializer_range": 0.3}), **parts)
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.8)  # xattn: the images change the answers
    predictor = Predictor(model)
    images = [_data_url(i, (48, 40)) for i in range(3)]
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    solo = [predictor.chat(with_image, [random_image(i, (48, 40))], max_new_tokens=6).text for i in range(3)]
    app = create_app(predictor, ServerConfig(batch_window_ms=200, max_batch=4))
    with ServerThread(app) as srv:
        client = openai.OpenAI(api_key="x", base_url=f"{srv.url}/v1", max_retries=0, timeout=60)

        def ask(i: int) -> str:
            stream = client.chat.completions.create(
                model="m", messages=_user("what is it?", images[i]), max_tokens=6, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, range(3)))
        assert answers == solo and len(set(solo)) > 1
        before = _metrics(srv.url)
        assert ask(1) == solo[1]  # the same image again (another turn): visual tokens from the cache
        after = _metrics(srv.url)
        assert before["vlmkit_image_cache_misses_total"] == 3 and before["vlmkit_image_cache_hits_total"] == 0
        assert after["vlmkit_image_cache_hits_total"] == 1 and after["vlmkit_image_cache_misses_total"] == 3
        assert after["vlmkit_image_cache_entries"] == 3 and after["vlmkit_image_cache_bytes"] > 0
        # the same prompt again: its keys and values from the prefix cache (prefix fusion); xattn rows with
        # images attend to more than the cache holds: never kept nor reused
        if "fusion" in parts:
            assert (
                after["vlmkit_prefix_cache_entries"] == 0 and after["vlmkit_prompt_tokens_reused_total"] == 0
            )
        else:
            assert after["vlmkit_prefix_cache_entries"] == 3 and after["vlmkit_prefix_cache_hits_total"] >= 1
            assert after["vlmkit_prompt_tokens_reused_total"] > before["vlmkit_prompt_tokens_reused_total"]
        assert after["vlmkit_time_to_first_token_seconds_count"] == 4
        assert after["vlmkit_generation_tokens_total"] == 24
        assert after["vlmkit_inter_token_latency_seconds_count"] == 20
        assert after["vlmkit_requests_finished_total{finish_reason=length}"] == 4
        assert after["vlmkit_queue_length"] == 0 and after["vlmkit_batch_size"] == 0
        # a stream abandoned mid-way frees its row: the next request is served at once
        body = {"messages": _user("go on", images[0]), "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            _wait_for(lambda: _metrics(srv.url)["vlmkit_batch_size"] == 1)
            assert _metrics(srv.url)["vlmkit_generation_tokens_total"] > 24  # it is decoding
        del lines
        _wait_for(
            lambda: _metrics(srv.url).get("vlmkit_requests_finished_total{finish_reason=cancelled}") == 1
        )
        assert _metrics(srv.url)["vlmkit_batch_size"] == 0
        assert ask(2) == solo[2]


def test_the_model_thread_is_pinned_to_its_cores(lively):
    from vlmkit.cli.serve_cmds import model_threads

    assert model_threads(None, cores=2) == 1 and model_threads(None, cores=16) == 15 and model_threads(3) == 3
    assert model_threads(None, cores=1) == 1
    cores = sorted(os.sched_getaffinity(0))
    app = create_app(Predictor(lively.model), ServerConfig(model_cpus=1))
    with ServerThread(app) as srv:
        reply = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": _user("hi"), "max_tokens": 2})
        assert reply.status_code == 200
        worker = app.state.worker
        assert worker.cpus == ({cores[0]} if len(cores) > 1 else None)
    assert os.sched_getaffinity(0) == set(cores)  # only the model thread was pinned


def test_prompts_are_prefilled_on_every_core_and_decoded_on_the_models(lively):
    """`prefill_threads`: the engine's prefill runs with that many compute threads on all allowed cores, its decode
    with the model's threads on their pinned core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to switch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        app = create_app(
            Predictor(lively.model), ServerConfig(model_cpus=1, prefill_threads=2, batch_window_ms=300)
        )
        with ServerThread(app) as srv:
            engine, seen = app.state.engine, []

            def recording(phase, call):
                def recorded(*args):
                    seen.append((phase, torch.get_num_threads(), os.sched_getaffinity(0)))
                    return call(*args)

                return recorded

            for name in ("_prefill", "_decode"):
                setattr(engine, name, recording(name, getattr(engine, name)))
            with ThreadPoolExecutor(3) as pool:
                replies = list(
                    pool.map(
                        lambda q: httpx.post(
                            f"{srv.url}/v1/chat/completions", json={"messages": _user(q), "max_tokens": 5}
                        ),
                        ["hi", "hello there", "what now?"],
                    )
                )
            assert all(r.status_code == 200 for r in replies)
    finally:
        torch.set_num_threads(before)
    assert {phase for phase, _, _ in seen} == {"_prefill", "_decode"}
    assert all((t, c) == (2, set(cores)) for phase, t, c in seen if phase == "_prefill")
    assert all((t, c) == (1, {cores[0]}) for phase, t, c in seen if phase == "_decode")


def test_sampled_and_greedy_requests_share_decode_steps(lively):
    predictor = Predictor(lively.model)
    app = create_app(predictor, ServerConfig(batch_window_ms=300))
    with ServerThread(app) as srv:
        client = openai.OpenAI(api_key="x", base_url=f"{srv.url}/v1", max_retries=0, timeout=60)
        settings = [{}, {}, {"temperature": 0.8, "seed": 3}, {"temperature": 0.8, "top_p": 0.5, "seed": 4}]

        def ask(kw):
            return client.chat.completions.create(
                model="m", messages=_user("hi"), max_tokens=6, **kw
            ).choices[0]

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, settings))
        alone = [ask(kw) for kw in settings]  # one at a time: the same answers (own settings, own seed)
    assert [r.message.content for r in replies] == [r.message.content for r in alone]
    stats = app.state.engine.stats
    assert stats.decoded_rows > stats.decode_steps
    torch.manual_seed(0)  # leave global RNG state predictable for other tests


def test_serve_command_line_maps_onto_the_server_config(tmp_path):
    from vlmkit.cli import build_parser
    from vlmkit.cli.serve_cmds import _server_config

    args = build_parser().parse_args(
        [
            "serve",
            str(tmp_path / "my-model"),
            "--port",
            "9001",
            "--max-batch",
            "4",
            "--batch-window-ms",
            "5",
            "--allowed-local-media-path",
            str(tmp_path),
            "--allow-remote-media",
            "--allowed-media-domains",
            "example.com",
            "*.cdn.example",
            "--max-tokens-limit",
            "100",
            "--image-formats",
            "png",
            "tiff",
            "--max-decoded-pixels",
            "1000000",
            "--body-timeout",
            "7",
            "--stall-timeout",
            "9",
            "--prefill-chunk",
            "64",
            "--image-cache-mb",
            "12.5",
            "--dtype",
            "fp32",
            "--no-web",
        ]
    )
    config = _server_config(args, web=not args.no_web)
    assert (args.host, args.port) == ("127.0.0.1", 9001)  # loopback unless asked otherwise
    assert config.model_name == "my-model" and config.max_batch == 4 and config.batch_window_ms == 5
    assert config.max_tokens_limit == 100 and config.default_max_tokens == 100 and not config.web
    assert config.media.allow_remote and config.media.allowed_domains == ["example.com", "*.cdn.example"]
    assert config.media.allowed_local_paths == [tmp_path]
    assert config.media.image_formats == ("PNG", "TIFF") and config.decode_budget == 1_000_000
    assert config.body_timeout_s == 7 and config.stall_timeout_s == 9
    assert config.prefill_chunk == 64 and config.image_cache_mb == 12.5 and config.continuous_batching
    assert args.dtype == "fp32" and build_parser().parse_args(["serve", "m"]).dtype == "auto"
    windows = build_parser().parse_args(["serve", "m", "--no-continuous-batching"])
    assert not _server_config(windows, web=False).continuous_batching
    assert config.lean_decode  # the lean LLM forward by default (tests/test_lean.py), off on request
    assert config.prefill_threads == len(os.sched_getaffinity(0))  # a burst's prefill on every core
    assert (
        _server_config(
            build_parser().parse_args(["serve", "m", "--prefill-threads", "0"]), False
        ).prefill_threads
        == 0
    )
    plain = build_parser().parse_args(["serve", "m", "--no-lean-decode"])
    assert not _server_config(plain, web=False).lean_decode
    assert config.prefill_together and config.prefill_burst == 1024 and config.prefix_cache_mb == 64
    assert config.cpu_kernels and config.batch_window_ms == 5
    apart = build_parser().parse_args(
        ["serve", "m", "--no-prefill-together", "--prefill-burst", "300", "--prefix-cache-mb", "0"]
        + ["--no-cpu-kernels"]
    )
    apart_config = _server_config(apart, web=False)
    assert not apart_config.prefill_together and apart_config.prefill_burst == 300
    assert apart_config.prefix_cache_mb == 0 and not apart_config.cpu_kernels
    assert _server_config(build_parser().parse_args(["serve", "m"]), web=False).batch_window_ms == 30
    defaults = _server_config(build_parser().parse_args(["web", "m"]), web=True)
    assert not defaults.media.allow_remote and defaults.media.allowed_local_paths == [] and defaults.web
    assert defaults.media.image_formats == ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    assert defaults.decode_budget == 8 * 40_000_000  # one request at its limits always fits
    with pytest.raises(SystemExit, match="EPSX"):
        _server_config(build_parser().parse_args(["serve", "m", "--image-formats", "png", "epsx"]), web=True)
    with pytest.raises(SystemExit):  # domains without --allow-remote-media is a mistake, not a silent no-op
        _server_config(
            build_parser().parse_args(["serve", "m", "--allowed-media-domains", "a.com"]), web=True
        )


# --------------------------------------------------------------------------------- hardening (probes)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _unblock_fifo_readers(fifo) -> None:
    """Open the FIFO for writing while readers wait (so a reader blocked in open() can finish)."""
    for _ in range(100):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waits
            return
        time.sleep(0.01)


def test_directories_and_fifos_under_the_media_root_get_a_400_and_the_server_stays_up(tmp_path):
    root = tmp_path / "media"
    (root / "album").mkdir(parents=True)
    os.mkfifo(root / "pipe.png")
    config = ServerConfig(media=MediaPolicy(allowed_local_paths=[root]), request_timeout_s=20)
    try:
        with ServerThread(create_app(FlakyBackend(), config)) as srv, httpx.Client(timeout=10) as http:
            url = f"{srv.url}/v1/chat/completions"
            http.post(url, json={"messages": _user("warm up")})
            before = _fds()
            for _ in range(30):  # each used to leak a file descriptor (and answer 500)
                error = _assert_openai_error(
                    http.post(url, json={"messages": _user("hi", str(root / "album"))}), 400
                )
                assert error["code"] == "local_media_refused"
            assert _fds() <= before + 2

            def fifo(_):  # each used to block a worker thread forever
                return httpx.post(url, json={"messages": _user("hi", f"file://{root}/pipe.png")}, timeout=10)

            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(fifo, range(8)))
            assert all(_assert_openai_error(r, 400)["code"] == "local_media_refused" for r in replies)
            text = http.post(url, json={"messages": _user("text only")})
            assert (
                text.status_code == 200
                and text.json()["choices"][0]["message"]["content"] == "echo text only"
            )
            assert http.get(f"{srv.url}/health").json()["status"] == "ok"
    finally:
        _unblock_fifo_readers(root / "pipe.png")


class StuckBackend(FlakyBackend):
    """Generation that hangs (no decode step, no `should_stop` poll) until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def generate(self, requests, *args, **kwargs):
        self.release.wait(30)
        return super().generate(requests, *args, **kwargs)


def test_health_reports_a_stuck_worker():
    backend = StuckBackend()
    with ServerThread(create_app(backend, ServerConfig(stall_timeout_s=0.5))) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{srv.url}/v1/chat/completions", json={"messages": _user("q")}, timeout=30
            )
            _wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 503)
            health = httpx.get(f"{srv.url}/health").json()
            assert health["status"] == "unhealthy" and "no progress" in health["problems"][0]
            backend.release.set()
            assert pending.result().status_code == 200
        assert httpx.get(f"{srv.url}/health").json() == {
            "status": "ok",
            "problems": [],
            "queued": 0,
            "batches": 1,
        }


def test_health_reports_a_dead_worker():
    app = create_app(FlakyBackend(), ServerConfig())
    with ServerThread(app) as srv:
        app.state.worker.stop()
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "not running" in health.json()["problems"][0]


def test_health_reports_a_stuck_image_load(monkeypatch):
    gate = threading.Event()

    def hanging_fetch(url, policy):  # e.g. a decoder that never returns
        gate.wait(30)
        raise MediaError("invalid_image", "gave up")

    monkeypatch.setattr("vlmkit.infer.server.fetch_media", hanging_fetch)
    with ServerThread(create_app(FlakyBackend(), ServerConfig(stall_timeout_s=0.5))) as srv:
        with ThreadPoolExecutor(1) as pool:
            body = {"messages": _user("q", _png_url((8, 8)))}
            pending = pool.submit(httpx.post, f"{srv.url}/v1/chat/completions", json=body, timeout=30)
            _wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 503)
            assert "image load" in httpx.get(f"{srv.url}/health").json()["problems"][0]
            gate.set()
            assert pending.result().status_code == 400
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_health_reports_a_server_running_out_of_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with (
        ServerThread(create_app(FlakyBackend(), ServerConfig(min_free_fds=32))) as srv,
        httpx.Client() as http,
    ):
        assert http.get(f"{srv.url}/health").status_code == 200
        held: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (_fds() + 40, hard))
        try:
            while _fds() < resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 12:  # 12 left, fewer than 32
                held.append(os.open(os.devnull, os.O_RDONLY))
            health = http.get(f"{srv.url}/health")
            assert health.status_code == 503 and "file descriptors" in health.json()["problems"][0]
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert http.get(f"{srv.url}/health").status_code == 200


class TalkingBackend(FlakyBackend):
    """Produces text every 10 ms for up to 20 s, until `should_stop` says the row was cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[str] = []

    def generate(self, requests, config=None, streamer=None, on_text=None, should_stop=None):
        texts = [m["content"][-1]["text"] for m in (r.messages[-1] for r in requests)]
        if texts != ["talk"]:
            return super().generate(requests, config, streamer, on_text, should_stop)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if should_stop(0):
                self.cancelled.append("talk")
                return [ChatResult("...", [1], 5, 1, "cancelled", [])]
            on_text(0, "bla ")
            time.sleep(0.01)
        return [ChatResult("bla " * 2000, [1], 5, 2000, "length", [])]


def test_a_non_streaming_client_that_disconnects_frees_its_row():
    backend = TalkingBackend()
    with ServerThread(create_app(backend, ServerConfig(request_timeout_s=60))) as srv:
        url = f"{srv.url}/v1/chat/completions"
        with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-generation
            httpx.post(url, json={"messages": _user("talk")}, timeout=1.0)
        start = time.monotonic()
        reply = httpx.post(url, json={"messages": _user("next")}, timeout=30)
        assert reply.json()["choices"][0]["message"]["content"] == "echo next"
        assert time.monotonic() - start < 8  # not the 20 s the abandoned generation would have taken
        assert backend.cancelled == ["talk"]


def test_a_slow_body_is_cut_off_after_the_body_timeout():
    with ServerThread(create_app(FlakyBackend(), ServerConfig(body_timeout_s=1.0))) as srv:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"messages": ['
            )
            start = time.monotonic()
            answer = b""
            while chunk := sock.recv(65536):  # the server answers, then closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
        assert time.monotonic() - start < 8
        assert httpx.get(f"{srv.url}/health").status_code == 200


class SlowEcho(FlakyBackend):
    """Echo, taking 0.3 s per batch (so concurrent requests overlap)."""

    def generate(self, requests, *args, **kwargs):
        time.sleep(0.3)
        return super().generate(requests, *args, **kwargs)


def _png_url(size, color=(10, 200, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_concurrent_requests_decode_within_the_pixel_budget(monkeypatch):
    trims = []
    monkeypatch.setattr("vlmkit.infer.server.release_memory", lambda: trims.append(1))
    image = _png_url((2000, 1500))  # 3 MP
    app = create_app(SlowEcho(), ServerConfig(max_decoded_pixels=4_500_000, batch_window_ms=0))
    with ServerThread(app) as srv:
        url = f"{srv.url}/v1/chat/completions"

        def ask(i):
            return httpx.post(url, json={"messages": _user(f"q{i}", image)}, timeout=30)

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, range(3)))
        assert [r.status_code for r in replies] == [200, 200, 200]
        budget = app.state.budget
        assert budget.peak == 3_000_000 and budget.used == 0  # one at a time, all given back
        too_big = httpx.post(url, json={"messages": _user("x", image) + _user("y", image)[-1:]}, timeout=30)
        assert _assert_openai_error(too_big, 400)["code"] == "image_too_large"
        assert "decode budget" in too_big.json()["error"]["message"]
    assert trims == []  # 9 MP in all: below the hand-back threshold (16 MP)


def test_streams_give_their_pixels_back_however_they_end():
    app = create_app(FlakyBackend(), ServerConfig(request_timeout_s=30))
    image = _png_url((300, 200))
    with ServerThread(app) as srv:
        url = f"{srv.url}/v1/chat/completions"
        done = httpx.post(url, json={"messages": _user("fine", image), "stream": True}, timeout=30)
        assert done.text.endswith("data: [DONE]\n\n") and app.state.budget.peak == 60_000
        _wait_for(lambda: app.state.budget.used == 0)
        with httpx.stream(
            "POST", url, json={"messages": _user("slow", image), "stream": True}, timeout=30
        ) as r:
            lines = r.iter_lines()  # (a dropped iterator would close the connection)
            assert next(lines).startswith("data: ")
            assert app.state.budget.used == 60_000  # held while the answer streams
        _wait_for(lambda: app.state.budget.used == 0)  # the client went away


def test_memory_is_handed_back_after_a_large_batch(monkeypatch):
    trims = []
    monkeypatch.setattr("vlmkit.infer.server.release_memory", lambda: trims.append(1))
    app = create_app(FlakyBackend(), ServerConfig())
    with ServerThread(app) as srv:
        reply = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"messages": _user("big", _png_url((4500, 4000)))},
            timeout=60,
        )
        assert reply.status_code == 200
        _wait_for(lambda: trims == [1])
        assert app.state.budget.used == 0


def test_a_finished_request_leaves_no_image_behind():
    seen = []

    class Watching(FlakyBackend):
        def generate(self, requests, *args, **kwargs):
            seen.extend(weakref.ref(image) for r in requests for image in r.images)
            return super().generate(requests, *args, **kwargs)

    with ServerThread(create_app(Watching(), ServerConfig())) as srv:
        reply = httpx.post(
            f"{srv.url}/v1/chat/completions", json={"messages": _user("hi", _png_url((64, 64)))}
        )
        assert reply.status_code == 200 and len(seen) == 1
        _wait_for(lambda: gc.collect() is not None and seen[0]() is None)  # not kept until the next batch


def test_the_openapi_document_is_true(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert '"422"' not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "408", "413", "429", "503"} <= set(responses)
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    event = responses["200"]["content"]["text/event-stream"]["schema"]  # one event (OpenAPI 3.1)
    assert event["required"] == ["data"] and event["properties"]["data"]["type"] == "string"
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert request["n"]["maximum"] == 1
    assert {"type": "integer", "minimum": 1, "maximum": 64} in request["max_tokens"][
        "anyOf"
    ]  # the server's limit
    url = f"{server.url}/v1/chat/completions"
    for loose in (
        {"stream": "true"},
        {"ignore_eos": 1},
        {"max_tokens": "5"},
        {"stream_options": {"include_usage": "yes"}},
    ):
        _assert_openai_error(httpx.post(url, json={"messages": _user("hi"), **loose}, timeout=30), 400)
    not_allowed = httpx.get(url)
    assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "POST"
    assert httpx.delete(f"{server.url}/v1/models").headers["allow"] == "GET"


def test_boxes_are_mapped_onto_the_last_image_or_the_one_the_request_names(tiny_vlm):
    answer = "<ref>it</ref><box>(100,200),(500,700)</box>"
    first, last = _png_url((1200, 900)), _png_url((600, 300))
    config = ServerConfig(continuous_batching=False)  # the scripted answer comes through `generate`
    with ServerThread(create_app(ScriptedAnswer(tiny_vlm, answer), config)) as srv:
        url = f"{srv.url}/v1/chat/completions"
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": first}},
                    {"type": "text", "text": "a"},
                ],
            },
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": last}}, {"type": "text", "text": "b"}],
            },
        ]

        def boxes(**extra):
            reply = httpx.post(url, json={"messages": messages, **extra}, timeout=60)
            return reply.json()["choices"][0]["message"]["boxes"]

        assert boxes() == [{"ref": "it", "box": [60.0, 60.0, 300.0, 210.0], "image": 1}]  # the last image
        assert boxes(box_image=0) == [{"ref": "it", "box": [120.0, 180.0, 600.0, 630.0], "image": 0}]
        assert boxes(box_image=-2) == boxes(box_image=0)
        stream = httpx.post(url, json={"messages": messages, "stream": True}, timeout=60)
        final = [json.loads(e[6:]) for e in stream.text.split("\n\n") if e.startswith("data: {")][-1]
        assert final["choices"][0]["delta"]["boxes"] == boxes()
        refused = httpx.post(url, json={"messages": messages, "box_image": 2}, timeout=60)
        assert _assert_openai_error(refused, 400)["param"] == "box_image"


class ScriptedAnswer(Predictor):
    """The real Predictor (template, preprocessing, box mapping) whose model always says `answer`."""

    def __init__(self, model, answer: str) -> None:
        super().__init__(model)
        self.answer = answer

    def _decode(self, batch, config, streamer) -> None:
        tokens = self.model.tokenizer.encode(self.answer, add_special_tokens=False)
        for token in [*tokens, self.model.llm.eos_token_ids[0]][: config.max_new_tokens]:
            streamer(torch.full((batch["input_ids"].shape[0],), token))


def test_usage_gives_the_gpt4v_image_token_count_for_each_detail(server):
    from vlmkit.data.images import gpt4v_image_tokens

    def part(size, detail=None):
        image_url = {"url": _png_url(size)} | ({"detail": detail} if detail else {})
        return {"type": "image_url", "image_url": image_url}

    url = f"{server.url}/v1/chat/completions"
    for parts, expected in [
        ([part((64, 48))], 255),  # auto counts as high: one 512-px tile
        ([part((64, 48), "low")], 85),
        ([part((2048, 1024), "high"), part((64, 48), "low")], gpt4v_image_tokens(2048, 1024, "high") + 85),
    ]:
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]
        reply = httpx.post(url, json={"messages": messages, "max_tokens": 2}, timeout=60).json()
        assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "gpt4v_image_tokens": expected}
        body = {
            "messages": messages,
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = httpx.post(url, json=body, timeout=60).text.split("\n\n")
        usage = [json.loads(e[6:])["usage"] for e in events if e.startswith("data: {") and '"usage"' in e]
        assert usage[-1]["prompt_tokens_details"]["gpt4v_image_tokens"] == expected
    assert gpt4v_image_tokens(2048, 1024, "high") == 1105  # 1536x768 after resizing: 6 tiles
    text_only = httpx.post(url, json={"messages": _user("hi"), "max_tokens": 2}, timeout=60).json()
    assert text_only["usage"]["prompt_tokens_details"]["gpt4v_image_tokens"] == 0
    bad = httpx.post(
        url, json={"messages": [{"role": "user", "content": [part((8, 8), "medium")]}]}, timeout=60
    )
    assert _assert_openai_error(bad, 400)["param"].endswith("detail")


def test_info_shows_the_gpt4v_token_count_of_the_model_input(model_dir, capsys, monkeypatch):
    from vlmkit.cli import main
    from vlmkit.data.images import gpt4v_image_tokens

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["info", str(model_dir)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "GPT-4V" in line)
    assert f"{gpt4v_image_tokens(32, 32, 'high')} (detail high)" in line and "85 (detail low)" in line
    assert "32x32" in line
