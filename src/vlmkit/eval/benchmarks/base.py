"""The benchmark adapter contract: items, file reading helpers, the `Benchmark` base class and the registry."""

from __future__ import annotations

import base64
import csv
import inspect
import io
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.data.formats import IMAGE_MARKER
from vlmkit.data.images import load_image
from vlmkit.infer.generate import ChatRequest, ChatResult, Predictor
from vlmkit.models.generation import GenerationConfig
from vlmkit.registry import Registry

SHORT_ANSWER = "Answer the question using a single word or phrase."
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")  # POPE's negative-sampling settings
Prediction = dict[str, Any]  # {"question_id", "answer", ...}; keyed by str(question_id) when collected


@dataclass
class EvalItem:
    """One benchmark question: the user text (`<image>` marks where images go; else they lead), image refs,
    the gold answer in the benchmark's own form, and whatever else scoring needs."""

    question_id: Any
    prompt: str
    images: list[str] = field(default_factory=list)
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return str(self.question_id)


# ----------------------------------------------------------------------------------------------- file reading
def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL, JSON (a list; `{"questions": [...]}`-like; or {id: record}), TSV or CSV file.

    A `.json` file holding JSON lines (as POPE's official files do) is read as JSONL. Records from an {id:
    record} mapping get `question_id` = the id.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".tsv", ".csv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images (MMBench TSV) exceed the default
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return [dict(r) for r in csv.DictReader(io.StringIO(text), delimiter=delimiter)]
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            for key in ("questions", "data", "items", "annotations"):
                if isinstance(data.get(key), list):
                    return data[key]
            if data and all(isinstance(v, dict) for v in data.values()):
                return [{"question_id": k, **v} for k, v in data.items()]
            return [data]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return rows


def _first(row: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and value != value) and value != "":
            return value
    return default


def _require(row: Mapping[str, Any], *keys: str, where: str) -> Any:
    value = _first(row, *keys)
    if value is None:
        raise ValueError(f"{where}: record has none of the keys {', '.join(keys)}: {str(dict(row))[:120]}")
    return value


def _with_suffix(question: str, suffix: str | None) -> str:
    if not suffix or suffix in question:
        return question
    return f"{question}\n{suffix}"


def answer_text(predictions: Mapping[str, Prediction], item: EvalItem) -> str:
    """A prediction's answer as a string ('' when the item has no prediction)."""
    value = predictions.get(item.key, {}).get("answer")
    return "" if value is None else str(value)


# ------------------------------------------------------------------------------------------------- base class
class Benchmark:
    """Adapter base. Subclasses implement `load` and `score`; `predict` runs a Predictor by default."""

    name = "benchmark"
    max_new_tokens = 16
    prompt_format = "{question}"

    def __init__(self, data: str | Path, images: str | Path | None = None) -> None:
        self.data = Path(data)
        if not self.data.exists():
            raise FileNotFoundError(f"no such benchmark data: {self.data}")
        self.image_root = Path(images) if images else (self.data if self.data.is_dir() else self.data.parent)
        self.info: dict[str, Any] = {}  # notes for the results (e.g. the caption tokenizer used)
        self._items: list[EvalItem] | None = None

    # ------------------------------------------------------------------------------------------ items
    def items(self) -> list[EvalItem]:
        """The benchmark's items (loaded once); question ids must be unique."""
        if self._items is None:
            items = self.load()
            seen: set[str] = set()
            for item in items:
                if item.key in seen:
                    raise ValueError(f"{self.data}: duplicate question_id {item.question_id!r}")
                seen.add(item.key)
            self._items = items
        return self._items

    def load(self) -> list[EvalItem]:
        raise NotImplementedError

    def data_files(self) -> list[Path]:
        """The files whose sha256 the results record."""
        if self.data.is_dir():
            exts = {".json", ".jsonl", ".txt", ".tsv", ".csv"}
            return sorted(p for p in self.data.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        return [self.data]

    def settings(self) -> dict[str, Any]:
        """Prompt and scoring settings recorded in the results."""
        return {"prompt_format": self.prompt_format}

    # ----------------------------------------------------------------------------------------- running
    def open_image(self, ref: str) -> Image.Image:
        """An image ref: a path (relative to the image root) or base64 data (MMBench TSVs, data: URLs)."""
        if ref.startswith("data:"):
            return load_image(base64.b64decode(ref.split(",", 1)[1]))
        path = Path(ref) if Path(ref).is_absolute() else self.image_root / ref
        if len(ref) > 256 and not path.exists() and re.fullmatch(r"[A-Za-z0-9+/=\s]+", ref[:1024]):
            return load_image(base64.b64decode(ref))
        return load_image(path)

    def user_text(self, item: EvalItem) -> str:
        """The user turn: the item's prompt, its images first (as `<image>` markers) unless it places them."""
        if item.images and IMAGE_MARKER not in item.prompt:
            return IMAGE_MARKER * len(item.images) + "\n" + item.prompt
        return item.prompt

    def request(self, item: EvalItem) -> ChatRequest:
        images = [self.open_image(r) for r in item.images]
        return ChatRequest([{"role": "user", "content": self.user_text(item)}], images)

    def predict(
        self, predictor: Predictor, items: Sequence[EvalItem], config: GenerationConfig
    ) -> list[Prediction]:
        """Predictions for a batch of items (batched generation by default)."""
        results = predictor.generate([self.request(item) for item in items], config)
        return [self.prediction(item, result) for item, result in zip(items, results)]

    def prediction(self, item: EvalItem, result: ChatResult) -> Prediction:
        return {"question_id": item.question_id, "answer": result.text}

    # ----------------------------------------------------------------------------------------- scoring
    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        raise NotImplementedError


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")


def register(*names: str) -> Callable[[type[Benchmark]], type[Benchmark]]:
    """Register a Benchmark class under one or more ids."""

    def add(cls: type[Benchmark]) -> type[Benchmark]:
        for name in names:
            BENCHMARKS.register(name)(cls)
        cls.name = names[0]
        return cls

    return add


def build_benchmark(
    name: str, data: str | Path, images: str | Path | None = None, **options: Any
) -> Benchmark:
    """The adapter `name` for `data`; options it does not take (or that are None) are left out."""
    cls = BENCHMARKS.get(name)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if v is not None and k in params}
    bench = cls(data, images, **kwargs)
    bench.name = name
    return bench
