"""LLM-as-judge over any OpenAI-compatible chat endpoint: scores in [0, 1], retries, a JSONL cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.eval.metrics import parse_judge_score
from vlmkit.log import get_logger

log = get_logger(__name__)

DEFAULT_JUDGE_PROMPT = (
    "You are grading an AI model's answer to a question about an image. Compare the prediction with the "
    "ground truth and rate how correct the prediction is. In the ground truth, <AND> means every listed "
    "element must be present in the prediction and <OR> means any one of them is enough. Reply with the "
    "correctness score only: one of 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 "
    "(0.0 = totally wrong, 1.0 = totally right).\n\n"
    "Question: {question}\n"
    "Ground truth: {reference}\n"
    "Prediction: {prediction}\n"
    "Correctness score:"
)
_RETRY_STATUS = {408, 409, 425, 429}


class JudgeError(RuntimeError):
    """The judge endpoint failed after all retries, or answered something that is not a chat completion."""


@dataclass
class Judgment:
    score: float | None  # None when the reply held no number
    reply: str
    cached: bool


def chat_completions_url(url: str) -> str:
    """`http://host:8000`, `.../v1` or a full `.../chat/completions` URL -> the chat completions endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


@dataclass
class Judge:
    """Asks `model` at `url` to grade predictions; judgments are cached by hash(prompt, model, temperature).

    The API key (if any) is read from the environment variable `api_key_env` and never recorded.
    """

    url: str
    model: str
    temperature: float = 0.0
    api_key_env: str = "OPENAI_API_KEY"
    cache_path: str | Path | None = None
    prompt_template: str = DEFAULT_JUDGE_PROMPT
    max_tokens: int = 16
    retries: int = 4
    backoff: float = 1.0  # seconds before the first retry, doubled after each
    timeout: float = 60.0
    requests_made: int = field(default=0, init=False)
    _cache: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._cache = self._read_cache()

    # ------------------------------------------------------------------------------------------ public
    def prompt(self, question: str, reference: str, prediction: str) -> str:
        return self.prompt_template.format(question=question, reference=reference, prediction=prediction)

    def key(self, prompt: str) -> str:
        """The cache key of one judgment: sha256 over (prompt, model, temperature)."""
        payload = json.dumps([prompt, self.model, float(self.temperature)], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def judge(self, question: str, reference: str, prediction: str) -> Judgment:
        """Score one prediction (from the cache when this exact prompt was judged before)."""
        prompt = self.prompt(question, reference, prediction)
        key = self.key(prompt)
        if key in self._cache:
            hit = self._cache[key]
            return Judgment(hit.get("score"), hit.get("reply", ""), cached=True)
        reply = self.ask(prompt)
        score = parse_judge_score(reply)
        if score is None:
            log.warning("judge reply has no score: %.80r", reply)
        record = {
            "key": key,
            "model": self.model,
            "temperature": self.temperature,
            "prompt": prompt,
            "reply": reply,
            "score": score,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._cache[key] = record
        self._append_cache(record)
        return Judgment(score, reply, cached=False)

    def ask(self, prompt: str) -> str:
        """One chat completion (retried with exponential backoff on connection errors, 5xx and 429)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning(
                    "judge request failed (%s); retry %d/%d in %.2fs", last, attempt, self.retries, delay
                )
                time.sleep(delay)
            try:
                return self._post(body)
            except urllib.error.HTTPError as err:
                if err.code not in _RETRY_STATUS and err.code < 500:
                    raise JudgeError(f"judge endpoint answered HTTP {err.code}: {err.reason}") from err
                last = err
            except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, KeyError) as err:
                last = err
        raise JudgeError(f"judge endpoint failed after {self.retries + 1} attempts: {last}") from last

    def describe(self) -> dict[str, Any]:
        """What the results record about the judge (no secrets)."""
        return {
            "url": self.url,
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "prompt_template": self.prompt_template,
            "cache": str(self.cache_path) if self.cache_path else None,
        }

    # --------------------------------------------------------------------------------------- internals
    def _post(self, body: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            chat_completions_url(self.url), data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        self.requests_made += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read().decode())
        content = reply["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"chat completion content is not text: {content!r:.80}")
        return content

    def _read_cache(self) -> dict[str, dict[str, Any]]:
        if not self.cache_path or not Path(self.cache_path).is_file():
            return {}
        cache = {}
        with open(self.cache_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from an interrupted run
                if isinstance(record, dict) and "key" in record:
                    cache[record["key"]] = record
        return cache

    def _append_cache(self, record: dict[str, Any]) -> None:
        if not self.cache_path:
            return
        path = Path(self.cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
