"""LLM-as-judge against a local OpenAI-compatible stub server: retries, cache hits, scores, provenance."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vlmkit.cli import main
from vlmkit.eval.benchmarks import build_benchmark
from vlmkit.eval.judge import Judge, JudgeError, chat_completions_url


class StubServer:
    """Canned chat completions: `fail_next` queued HTTP errors first; the reply depends on the prediction."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.headers: list[dict] = []
        self.fail_next: list[int] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.calls.append({"path": self.path, **body})
                stub.headers.append(dict(self.headers))
                if stub.fail_next:
                    self.send_response(stub.fail_next.pop(0))
                    self.end_headers()
                    return
                prompt = body["messages"][0]["content"]
                reply = (
                    "0.9"
                    if "Prediction: a cat" in prompt
                    else "Score: 2/10"
                    if "Prediction: a dog" in prompt
                    else "I cannot grade this"
                )
                data = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.close()


def test_endpoint_url_forms() -> None:
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/api/chat/completions") == "http://h:1/api/chat/completions"


def test_retry_then_success_and_cache_hits(stub: StubServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-test")
    cache = tmp_path / "judge_cache.jsonl"
    judge = Judge(
        stub.url,
        "judge-model",
        temperature=0.0,
        api_key_env="JUDGE_KEY_FOR_TEST",
        cache_path=cache,
        backoff=0.01,
    )
    stub.fail_next = [500, 429]
    verdict = judge.judge("What is it?", "a cat", "a cat")
    assert verdict.score == pytest.approx(0.9) and not verdict.cached
    assert len(stub.calls) == 3 and judge.requests_made == 3  # two failures, then the answer
    assert stub.calls[-1]["path"] == "/v1/chat/completions"
    assert stub.calls[-1]["model"] == "judge-model" and stub.calls[-1]["temperature"] == 0.0
    assert stub.headers[-1]["Authorization"] == "Bearer sk-test"

    again = judge.judge("What is it?", "a cat", "a cat")
    assert again.cached and again.score == pytest.approx(0.9) and len(stub.calls) == 3
    fresh = Judge(stub.url, "judge-model", cache_path=cache, backoff=0.01)  # a rerun reads the cache file
    assert fresh.judge("What is it?", "a cat", "a cat").cached and len(stub.calls) == 3
    record = json.loads(cache.read_text().splitlines()[0])
    assert (
        record["key"] == judge.key(judge.prompt("What is it?", "a cat", "a cat")) and record["score"] == 0.9
    )

    hotter = Judge(stub.url, "judge-model", temperature=0.5, cache_path=cache, backoff=0.01)
    assert not hotter.judge("What is it?", "a cat", "a cat").cached and len(stub.calls) == 4  # key includes T


def test_scores_parsed_and_clamped(stub: StubServer) -> None:
    judge = Judge(stub.url, "m", backoff=0.01)
    assert judge.judge("q", "a cat", "a dog").score == pytest.approx(0.2)  # "2/10"
    assert judge.judge("q", "a cat", "a cow").score is None  # no number in the reply


def test_client_error_not_retried_and_exhausted_retries(stub: StubServer) -> None:
    judge = Judge(stub.url, "m", retries=2, backoff=0.01)
    stub.fail_next = [400]
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge.judge("q", "r", "a cat")
    assert len(stub.calls) == 1
    stub.fail_next = [503, 503, 503]
    with pytest.raises(JudgeError, match="after 3 attempts"):
        judge.judge("q", "r", "a cat")
    assert len(stub.calls) == 4


def test_judge_benchmark_via_cli(stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = {  # MM-Vet layout: {id: {imagename, question, answer, capability}}
        "v1_0": {"imagename": "a.png", "question": "What animal?", "answer": "a cat", "capability": ["rec"]},
        "v1_1": {
            "imagename": "b.png",
            "question": "What animal?",
            "answer": "a dog",
            "capability": ["rec", "ocr"],
        },
    }
    (tmp_path / "mm-vet.json").write_text(json.dumps(data))
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        '{"question_id": "v1_0", "answer": "a cat"}\n{"question_id": "v1_1", "answer": "a dog"}\n'
    )
    argv = [
        "eval",
        "score",
        "--benchmark",
        "mmvet",
        "--data",
        str(tmp_path / "mm-vet.json"),
        "--predictions",
        str(preds),
        "--judge-url",
        stub.url,
        "--judge-model",
        "m",
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    capsys.readouterr()
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["judge_score"] == pytest.approx((0.9 + 0.2) / 2)
    assert metrics["score_rec"] == pytest.approx(0.55) and metrics["score_ocr"] == pytest.approx(0.2)
    assert len(stub.calls) == 2
    judge = json.loads((tmp_path / "out" / "results.json").read_text())["provenance"]["judge"]
    assert (
        judge["model"] == "m" and judge["temperature"] == 0.0 and "{prediction}" in judge["prompt_template"]
    )
    assert main(argv) == 0  # rerun: every judgment from the cache
    assert len(stub.calls) == 2

    unjudged = build_benchmark("mmvet", tmp_path / "mm-vet.json")  # no judge: predictions only, no error
    assert unjudged.score(unjudged.items(), {}) == {"n": 2} and "no judge" in unjudged.info["note"]
