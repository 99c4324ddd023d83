"""Benchmark adapters: read local files, build ChatRequests, turn model outputs into predictions, score."""

from __future__ import annotations

import base64
import csv
import inspect
import io
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.data.formats import IMAGE_MARKER
from vlmkit.data.grounding import Box, parse_boxes
from vlmkit.data.images import load_image
from vlmkit.eval import metrics as M
from vlmkit.eval.judge import Judge
from vlmkit.infer.generate import ChatRequest, ChatResult, Predictor
from vlmkit.log import get_logger
from vlmkit.models.generation import GenerationConfig
from vlmkit.registry import Registry

log = get_logger(__name__)

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


# ------------------------------------------------------------------------------------------------------- POPE
@register("pope")
class Pope(Benchmark):
    """POPE JSONL (`question_id, image, text, label`); the split is `category`/`split` or from the file name.

    `data` may be a directory of split files (coco_pope_random.json, ...): ids then become `<split>/<id>`.
    Answers are read by the official rule (`pope_yes_no`); `lenient` (recorded in the results) lowercases first.
    """

    prompt_format = "{text}\n" + SHORT_ANSWER

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        prompt_suffix: str = SHORT_ANSWER,
        lenient: bool = False,
    ):
        super().__init__(data, images)
        self.prompt_suffix = prompt_suffix
        self.prompt_format = "{text}" + (f"\n{prompt_suffix}" if prompt_suffix else "")
        self.lenient = lenient
        self.info["answer_rule"] = (
            "lenient (lowercased, punctuation split): not comparable with published POPE numbers"
            if lenient
            else "official (POPE evaluate.py: first sentence, case-sensitive No/no/not)"
        )

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "answer_rule": "lenient" if self.lenient else "official"}

    def load(self) -> list[EvalItem]:
        files = self.data_files() if self.data.is_dir() else [self.data]
        files = [f for f in files if f.suffix.lower() in (".json", ".jsonl")]
        items = []
        for path in files:
            from_name = next((s for s in POPE_SPLITS if s in path.stem.lower()), None)
            for row in read_rows(path):
                qid = _require(row, "question_id", "id", where=str(path))
                split = str(_first(row, "category", "split", "pope_split", default=from_name or "all"))
                if len(files) > 1:
                    qid = f"{from_name or path.stem}/{qid}"
                question = _require(row, "text", "question", where=str(path))
                label = str(_require(row, "label", "answer", where=str(path))).strip().lower()
                image = _require(row, "image", where=str(path))
                prompt = _with_suffix(question, self.prompt_suffix)
                items.append(EvalItem(qid, prompt, [image], label, {"split": split}))
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        return M.pope_metrics(
            [answer_text(predictions, it) for it in items],
            [it.target for it in items],
            [it.meta["split"] for it in items],
            lenient=self.lenient,
        )


# -------------------------------------------------------------------------------------------------------- MME
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@register("mme")
class MME(Benchmark):
    """MME as JSON/JSONL (`question_id, image, question|text, answer (Yes/No), category|subtask`) or the
    official release directory: `<subtask>/[images/]NAME.jpg` with
    `<subtask>/[questions_answers_YES_or_NO/]NAME.txt` holding "question<TAB>answer" lines."""

    def __init__(self, data: str | Path, images: str | Path | None = None, prompt_suffix: str | None = None):
        super().__init__(data, images)
        self.prompt_suffix = prompt_suffix
        self.prompt_format = "{question}" + (f"\n{prompt_suffix}" if prompt_suffix else "")

    def load(self) -> list[EvalItem]:
        if self.data.is_dir():
            return self._load_release()
        items = []
        for n, row in enumerate(read_rows(self.data)):
            subtask = str(_require(row, "category", "subtask", "task", where=str(self.data)))
            image = str(_require(row, "image", "image_path", where=str(self.data)))
            question = _require(row, "question", "text", "prompt", where=str(self.data))
            answer = _require(row, "answer", "label", "gt_answer", where=str(self.data))
            qid = _first(row, "question_id", "id", default=f"{subtask}/{image}/{n}")
            prompt = _with_suffix(question, self.prompt_suffix)
            items.append(EvalItem(qid, prompt, [image], str(answer), {"subtask": subtask, "image": image}))
        return items

    def _load_release(self) -> list[EvalItem]:
        items = []
        for task_dir in sorted(p for p in self.data.iterdir() if p.is_dir()):
            qa_dir = task_dir / "questions_answers_YES_or_NO"
            qa_dir = qa_dir if qa_dir.is_dir() else task_dir
            img_dir = task_dir / "images" if (task_dir / "images").is_dir() else task_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next(
                    (img_dir / (txt.stem + e) for e in _IMAGE_EXTS if (img_dir / (txt.stem + e)).is_file()),
                    None,
                )
                if image is None:
                    log.warning("MME: no image for %s; skipped", txt)
                    continue
                ref = str(image.relative_to(self.data))
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for k, line in enumerate(lines):
                    question, _, answer = line.rpartition("\t")
                    prompt = _with_suffix(question.strip(), self.prompt_suffix)
                    meta = {"subtask": task_dir.name, "image": ref}
                    items.append(
                        EvalItem(f"{task_dir.name}/{image.name}/{k}", prompt, [ref], answer.strip(), meta)
                    )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        return M.mme_metrics(
            (it.meta["subtask"], it.meta["image"], answer_text(predictions, it), it.target) for it in items
        )


# ------------------------------------------------------------------------------------------------------ VQAv2
@register("vqav2")
class VQAv2(Benchmark):
    """Official VQAv2 questions JSON (or a JSONL of `question_id, image, question/text`) as `data`; the
    official annotations JSON as `annotations` (without it only predictions are made)."""

    max_new_tokens = 16

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        annotations: str | Path | None = None,
        prompt_suffix: str = SHORT_ANSWER,
    ):
        super().__init__(data, images)
        self.annotations = Path(annotations) if annotations else None
        self.prompt_suffix = prompt_suffix
        self.prompt_format = "{question}" + (f"\n{prompt_suffix}" if prompt_suffix else "")

    def data_files(self) -> list[Path]:
        return [self.data] + ([self.annotations] if self.annotations else [])

    def load(self) -> list[EvalItem]:
        subtype = None
        if self.data.suffix.lower() == ".json":
            head = json.loads(self.data.read_text(encoding="utf-8"))
            subtype = head.get("data_subtype") if isinstance(head, dict) else None
        answers = self._answers()
        items = []
        for row in read_rows(self.data):
            qid = _require(row, "question_id", where=str(self.data))
            image = _first(row, "image", "image_path")
            if image is None:
                image_id = int(_require(row, "image_id", where=str(self.data)))
                image = f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else f"{image_id:012d}.jpg"
            question = _require(row, "question", "text", where=str(self.data))
            gold = answers.get(str(qid))
            meta = {"answer_type": gold[1]} if gold else {}
            items.append(
                EvalItem(
                    qid,
                    _with_suffix(question, self.prompt_suffix),
                    [str(image)],
                    gold[0] if gold else None,
                    meta,
                )
            )
        return items

    def _answers(self) -> dict[str, tuple[list[str], str]]:
        if self.annotations is None:
            return {}
        out = {}
        for ann in read_rows(self.annotations):
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in ann["answers"]]
            out[str(ann["question_id"])] = (answers, str(ann.get("answer_type", "all")))
        return out

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        scored = [it for it in items if it.target]
        if not scored:
            self.info["note"] = "no annotations: predictions only"
            return {"n": 0}
        accs = {it.key: M.vqa_accuracy(answer_text(predictions, it), it.target) for it in scored}
        out = {"accuracy": M.mean(accs.values()), "n": len(scored)}
        by_type: dict[str, list[float]] = defaultdict(list)
        for it in scored:
            by_type[it.meta["answer_type"]].append(accs[it.key])
        for kind in sorted(by_type):
            out[f"accuracy_{re.sub(r'[^0-9a-zA-Z]+', '_', kind)}"] = M.mean(by_type[kind])
        return out


# -------------------------------------------------------------------------------------------- multiple choice
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_SUFFIX = {
    "letter": "Answer with the option's letter from the given choices directly.",
    "text": "Answer with the option's text from the given choices directly.",
}
MC_MODES = ("generate", "constrained", "likelihood")


def _options(row: Mapping[str, Any], where: str) -> dict[str, str]:
    raw = _first(row, "options", "choices")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if isinstance(raw, list):
        return {_LETTERS[i]: str(v) for i, v in enumerate(raw)}
    if isinstance(raw, dict):
        return {str(k).upper(): str(v) for k, v in raw.items()}
    options = {k: str(row[k]) for k in _LETTERS if _first(row, k) is not None}
    if not options:
        raise ValueError(f"{where}: record has no options (an `options`/`choices` list or A/B/C/D keys)")
    return options


def _gold_letter(row: Mapping[str, Any], options: Mapping[str, str], where: str) -> str:
    answer = _require(row, "answer", "label", where=where)
    if isinstance(answer, int):  # ScienceQA: the index of the right choice
        return list(options)[answer]
    answer = str(answer).strip()
    if answer.upper() in options:
        return answer.upper()
    by_text = [k for k, v in options.items() if v.strip().lower() == answer.lower()]
    if by_text:
        return by_text[0]
    raise ValueError(f"{where}: answer {answer!r} is neither an option letter nor an option's text")


@register("multiple-choice", "mmbench", "scienceqa")
class MultipleChoice(Benchmark):
    """`question_id, question, options (list or A/B/C/D keys), answer (letter), hint?, image?` (JSON[L]/TSV).

    mode: `generate` (free text; the letter is extracted), `constrained` (decoding restricted to the options
    by a prefix trie) or `likelihood` (the option with the best sum/mean log-prob). `target`: what the
    model writes, the option's `letter` or its `text`.
    """

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        mode: str = "generate",
        target: str = "letter",
        reduce: str = "sum",
        prompt_suffix: str | None = None,
    ):
        super().__init__(data, images)
        if mode not in MC_MODES:
            raise ValueError(f"unknown multiple-choice mode {mode!r}; known: {', '.join(MC_MODES)}")
        if target not in MC_SUFFIX:
            raise ValueError(f"unknown multiple-choice target {target!r}; known: letter, text")
        if reduce not in ("sum", "mean"):
            raise ValueError(f"unknown likelihood reduction {reduce!r}; known: sum, mean")
        self.mode, self.target, self.reduce = mode, target, reduce
        self.prompt_suffix = prompt_suffix if prompt_suffix is not None else MC_SUFFIX[target]
        self.prompt_format = "[{hint}\\n]{question}\\n{letter}. {option}...\\n" + self.prompt_suffix

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mode": self.mode, "target": self.target, "reduce": self.reduce}

    def load(self) -> list[EvalItem]:
        items = []
        where = str(self.data)
        for n, row in enumerate(read_rows(self.data)):
            options = _options(row, where)
            qid = _first(row, "question_id", "index", "id", default=n)
            hint = _first(row, "hint", "context")
            question = str(_require(row, "question", "text", where=where))
            lines = ([str(hint)] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
            prompt = "\n".join(lines + ([self.prompt_suffix] if self.prompt_suffix else []))
            image = _first(row, "image", "image_path")
            meta = {"options": options, "category": str(_first(row, "category", default="")) or None}
            items.append(
                EvalItem(qid, prompt, [str(image)] if image else [], _gold_letter(row, options, where), meta)
            )
        return items

    def predict(
        self, predictor: Predictor, items: Sequence[EvalItem], config: GenerationConfig
    ) -> list[Prediction]:
        if self.mode == "generate":
            return super().predict(predictor, items, config)
        from vlmkit.eval.choice import constrained_choice, option_logprobs

        model, tok = predictor.model, predictor.model.tokenizer
        out = []
        for item in items:
            batch, _ = predictor.prepare([self.request(item)])  # one row: no padding
            prompt_ids = batch["input_ids"][0].tolist()
            pixel_values, images = batch["pixel_values"], batch["image_counts"][0]
            letters = list(item.meta["options"])
            texts = letters if self.target == "letter" else [item.meta["options"][k] for k in letters]
            option_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            record: Prediction = {"question_id": item.question_id}
            if self.mode == "constrained":
                index = constrained_choice(model, prompt_ids, pixel_values, option_ids, images)
            else:
                scores = option_logprobs(model, prompt_ids, pixel_values, option_ids, images)
                pick = [s if self.reduce == "sum" else m for s, m in scores]
                index = max(range(len(pick)), key=pick.__getitem__)
                record["option_logprobs"] = {k: {"sum": s, "mean": m} for k, (s, m) in zip(letters, scores)}
            record["answer"] = texts[index]
            record["choice"] = letters[index]
            out.append(record)
        return out

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        right, unparsed = [], 0
        by_cat: dict[str, list[bool]] = defaultdict(list)
        for it in items:
            pred = predictions.get(it.key, {})
            letter = pred.get("choice") or M.extract_choice(answer_text(predictions, it), it.meta["options"])
            unparsed += letter is None
            ok = letter == it.target
            right.append(ok)
            if it.meta.get("category"):
                by_cat[it.meta["category"]].append(ok)
        out = {
            "accuracy": M.mean(right),
            "unparsed": unparsed / len(items) if items else 0.0,
            "n": len(items),
        }
        for cat in sorted(by_cat):
            out[f"accuracy_{re.sub(r'[^0-9a-zA-Z]+', '_', cat).strip('_')}"] = M.mean(by_cat[cat])
        return out


# -------------------------------------------------------------------------------------------------- grounding
@register("grounding", "refcoco")
class Grounding(Benchmark):
    """RefCOCO-style JSONL: `question_id, image, text, bbox` (COCO xywh pixels), `width, height`; Acc@0.5.

    A prediction's `box` (original pixels, written when this toolkit ran the model) is used as is; otherwise
    it is parsed from the answer text in `grounding_format` (any format when None) against the image size.
    """

    max_new_tokens = 48

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        prompt_template: str = "Give the bounding box of {text}.",
        grounding_format: str | None = None,
        threshold: float = 0.5,
    ):
        super().__init__(data, images)
        self.prompt_format = prompt_template
        self.grounding_format = grounding_format
        self.threshold = threshold

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "grounding_format": self.grounding_format,
            "iou_threshold": self.threshold,
        }

    def load(self) -> list[EvalItem]:
        items = []
        where = str(self.data)
        for row in read_rows(self.data):
            qid = _require(row, "question_id", "id", where=where)
            text = str(_require(row, "text", "sent", "expression", "referring_expression", where=where))
            x, y, w, h = (float(v) for v in _require(row, "bbox", where=where))
            meta = {"width": _first(row, "width"), "height": _first(row, "height"), "text": text}
            image = str(_require(row, "image", "file_name", where=where))
            items.append(
                EvalItem(qid, self.prompt_format.format(text=text), [image], Box.from_xywh(x, y, w, h), meta)
            )
        return items

    def prediction(self, item: EvalItem, result: ChatResult) -> Prediction:
        box = list(result.boxes[0][1].to_xyxy()) if result.boxes else None
        return {"question_id": item.question_id, "answer": result.text, "box": box}

    def predicted_box(self, item: EvalItem, prediction: Prediction) -> Box | None:
        if "box" in prediction:
            return Box(*prediction["box"]) if prediction["box"] else None
        width, height = item.meta.get("width"), item.meta.get("height")
        if not width or not height:
            with Image.open(self.image_root / item.images[0]) as im:
                width, height = im.size
        found = parse_boxes(
            str(prediction.get("answer") or ""), self.grounding_format, int(width), int(height)
        )
        return found[0][1] if found else None

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        boxes = [
            self.predicted_box(it, predictions[it.key]) if it.key in predictions else None for it in items
        ]
        gold = [it.target for it in items]
        return {
            "acc50": M.box_accuracy(boxes, gold, self.threshold),
            "mean_iou": M.mean(b.iou(g) if b is not None else 0.0 for b, g in zip(boxes, gold)),
            "no_box": M.mean(float(b is None) for b in boxes),
            "n": len(items),
        }


# ------------------------------------------------------------------------------------------------- captioning
@register("captioning", "coco-captions")
class Captioning(Benchmark):
    """COCO captions JSON (`images: [{id, file_name}]`, `annotations: [{image_id, caption}]`): BLEU-1..4 and
    CIDEr from pycocoevalcap (PTB tokenizer when java is installed, else a Python one, noted in results).
    Question ids are image ids."""

    max_new_tokens = 32

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        prompt: str = "Provide a one-sentence caption for the provided image.",
        tokenizer: str = "auto",
    ):
        super().__init__(data, images)
        self.prompt_format = prompt
        self.tokenizer = tokenizer

    def load(self) -> list[EvalItem]:
        data = json.loads(self.data.read_text(encoding="utf-8"))
        refs: dict[Any, list[str]] = defaultdict(list)
        for ann in data["annotations"]:
            refs[ann["image_id"]].append(str(ann["caption"]))
        return [
            EvalItem(img["id"], self.prompt_format, [img["file_name"]], refs[img["id"]])
            for img in data["images"]
            if refs.get(img["id"])
        ]

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        refs = {it.key: it.target for it in items}
        cands = {it.key: answer_text(predictions, it) for it in items}
        out, used = M.caption_metrics(refs, cands, self.tokenizer)
        self.info["caption_tokenizer"] = used
        if used == "python":
            self.info["note"] = (
                "java not found: a Python tokenizer replaced PTBTokenizer (numbers may differ)"
            )
        return out


# ----------------------------------------------------------------------------------------------- LLM-as-judge
@register("judge", "mmvet")
class JudgedQA(Benchmark):
    """Open-ended QA graded by an LLM judge (MM-Vet style): `question_id, image, question, answer (reference),
    category/capability?` (JSON list, JSONL, or MM-Vet's {id: {imagename, question, answer, capability}})."""

    max_new_tokens = 256

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        judge: Judge | None = None,
        prompt_suffix: str | None = None,
    ):
        super().__init__(data, images)
        self.judge = judge
        self.prompt_suffix = prompt_suffix

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "judge": self.judge.describe() if self.judge else None}

    def load(self) -> list[EvalItem]:
        items = []
        where = str(self.data)
        for row in read_rows(self.data):
            qid = _require(row, "question_id", "id", where=where)
            question = str(_require(row, "question", "text", where=where))
            reference = str(_require(row, "answer", "reference", "gt", where=where))
            image = _first(row, "image", "imagename", "image_path")
            cats = _first(row, "capability", "category", default=[])
            cats = [cats] if isinstance(cats, str) else list(cats)
            meta = {"question": question, "categories": cats}
            items.append(
                EvalItem(
                    qid,
                    _with_suffix(question, self.prompt_suffix),
                    [str(image)] if image else [],
                    reference,
                    meta,
                )
            )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        if self.judge is None:
            self.info["note"] = "no judge: predictions only (score them with --judge-url and --judge-model)"
            return {"n": len(items)}
        scores: list[float] = []
        failed = 0
        by_cat: dict[str, list[float]] = defaultdict(list)
        for it in items:
            verdict = self.judge.judge(it.meta["question"], it.target, answer_text(predictions, it))
            failed += verdict.score is None
            value = verdict.score or 0.0
            scores.append(value)
            for cat in it.meta["categories"]:
                by_cat[cat].append(value)
        out = {"judge_score": M.mean(scores), "judge_failed": failed, "n": len(items)}
        for cat in sorted(by_cat):
            out[f"score_{re.sub(r'[^0-9a-zA-Z]+', '_', cat).strip('_')}"] = M.mean(by_cat[cat])
        return out
