"""Run a benchmark: resumable batched predictions (predictions.jsonl); scores, provenance (results.json)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit import __version__
from vlmkit.config import to_dict
from vlmkit.eval.benchmarks import Benchmark, EvalItem, Prediction
from vlmkit.infer.generate import Predictor
from vlmkit.log import get_logger
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.progress import progress_bar
from vlmkit.templates import resolve_template

log = get_logger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
RUN_FILE = "run.json"
_ANSWER_KEYS = ("answer", "text", "prediction", "pred", "caption", "response", "output")
_ID_KEYS = ("question_id", "id", "image_id", "index")


# ------------------------------------------------------------------------------------------------- files
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _normalize_prediction(record: Mapping[str, Any]) -> Prediction | None:
    qid = next((record[k] for k in _ID_KEYS if record.get(k) is not None), None)
    if qid is None:
        return None
    out = dict(record)
    out["question_id"] = qid
    if "answer" not in out:
        out["answer"] = next((record[k] for k in _ANSWER_KEYS if k in record), "")
    return out


def load_predictions(path: str | Path) -> dict[str, Prediction]:
    """str(question_id) -> prediction, from JSONL `{"question_id", "answer", ...}` or a JSON list.

    Other toolkits' keys are accepted (`id`/`image_id`/`index`; `text`/`prediction`/`caption`/...); a later
    line for the same id wins; lines that are not JSON (a torn last line after a crash) are skipped.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    records: list[Any]
    try:
        whole = json.loads(text)
        records = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: not JSON (an interrupted write?); ignored", path, n)
    out: dict[str, Prediction] = {}
    for record in records:
        pred = _normalize_prediction(record) if isinstance(record, dict) else None
        if pred is not None:
            out[str(pred["question_id"])] = pred
    return out


def _append_predictions(path: Path, predictions: Sequence[Prediction]) -> None:
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":  # a torn last line: start on a fresh one
                f.write("\n")
        for pred in predictions:
            f.write(json.dumps(pred, ensure_ascii=False) + "\n")
        f.flush()


# -------------------------------------------------------------------------------------------- provenance
def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "vlmkit": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def config_sha256(model: VisionLanguageModel) -> str:
    """sha256 of the model's config (sorted JSON): identifies the architecture a result came from."""
    return hashlib.sha256(json.dumps(to_dict(model.cfg), sort_keys=True).encode()).hexdigest()


def _example_prompt(predictor: Predictor, benchmark: Benchmark) -> str | None:
    """The first item's rendered prompt, each run of image placeholders shortened to `<image>×N`."""
    items = benchmark.items()
    if not items:
        return None
    rendered = predictor.prompt_text([{"role": "user", "content": benchmark.user_text(items[0])}])
    token = predictor.model.llm.image_token
    return re.sub(f"(?:{re.escape(token)})+", lambda m: f"{token}×{len(m.group(0)) // len(token)}", rendered)


def provenance(
    benchmark: Benchmark,
    *,
    predictor: Predictor | None = None,
    model_path: str | Path | None = None,
    generation: GenerationConfig | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    predictions_file: str | Path | None = None,
) -> dict[str, Any]:
    """Everything a result depends on: model (path + config hash), benchmark files (sha256), prompt template,
    decoding, judge, versions, seed and time."""
    prov: dict[str, Any] = {"time": _now(), "seed": seed, "versions": versions()}
    prov["benchmark"] = {
        "name": benchmark.name,
        "data": str(benchmark.data),
        "images": str(benchmark.image_root),
        "files": {str(p): sha256_file(p) for p in benchmark.data_files()},
        **benchmark.settings(),
    }
    prov["judge"] = prov["benchmark"].pop("judge", None)
    if predictor is not None:
        model = predictor.model
        template = resolve_template(model.tokenizer, predictor.template)
        prov["model"] = {
            "path": str(model_path) if model_path else None,
            "config_sha256": config_sha256(model),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        prov["prompt"] = {
            "chat_template": predictor.template,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "system_prompt": predictor.system_prompt,
            "prompt_format": benchmark.settings().get("prompt_format"),
            "example": _example_prompt(predictor, benchmark),
            "resize": predictor.resize,
            "grounding_format": predictor.grounding_format,
        }
    else:
        prov["model"] = None
    if generation is not None:
        prov["decoding"] = {**dataclasses.asdict(generation), "batch_size": batch_size}
    if predictions_file is not None:
        prov["predictions"] = {"file": str(predictions_file), "sha256": sha256_file(predictions_file)}
    return prov


# ---------------------------------------------------------------------------------------------------- running
def _check_resume(out: Path, prov: dict[str, Any]) -> None:
    """Refuse to mix predictions of another model or benchmark file into `out`."""
    run_file = out / RUN_FILE
    if not run_file.is_file():
        return
    before = json.loads(run_file.read_text(encoding="utf-8"))
    old_model = (before.get("model") or {}).get("config_sha256")
    new_model = (prov.get("model") or {}).get("config_sha256")
    old_files = set(before.get("benchmark", {}).get("files", {}).values())
    new_files = set(prov["benchmark"]["files"].values())
    if old_model != new_model or old_files != new_files:
        raise RuntimeError(
            f"{out} holds predictions of another model or benchmark file; choose a new output directory "
            "or pass overwrite=True (--overwrite)"
        )


def run_eval(
    model: VisionLanguageModel | Predictor,
    benchmark: Benchmark,
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 8,
    generation: GenerationConfig | None = None,
    seed: int = 0,
    model_path: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict every item not yet in `out_dir/predictions.jsonl` (appended batch by batch), then score all.

    Returns (and writes to `out_dir/results.json`) {"benchmark", "metrics", counts, "info", "provenance"}.
    Without `out_dir` nothing is written and nothing resumes. Greedy decoding unless `generation` samples
    (its seed defaults to `seed`).
    """
    predictor = model if isinstance(model, Predictor) else Predictor(model)
    generation = generation or GenerationConfig(max_new_tokens=benchmark.max_new_tokens)
    if generation.seed is None:
        generation = dataclasses.replace(generation, seed=seed)
    items = benchmark.items()
    prov = provenance(
        benchmark,
        predictor=predictor,
        model_path=model_path,
        generation=generation,
        batch_size=batch_size,
        seed=seed,
    )
    out = Path(out_dir) if out_dir is not None else None
    done: dict[str, Prediction] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (PREDICTIONS_FILE, RESULTS_FILE, RUN_FILE):
                (out / name).unlink(missing_ok=True)
        _check_resume(out, prov)
        if (out / PREDICTIONS_FILE).is_file():
            done = load_predictions(out / PREDICTIONS_FILE)
        if not (out / RUN_FILE).is_file():
            _write_json_atomic(out / RUN_FILE, prov)
    keys = {it.key for it in items}
    # Questions of one kind go together (their answers have similar lengths, so a batch stops generating
    # when its longest answer ends, not the longest answer of any kind); the order is deterministic.
    todo = sorted(
        (it for it in items if it.key not in done),
        key=lambda it: (str(it.meta.get("task", "")), len(it.prompt)),
    )
    if done:
        log.info(
            "%s: resuming, %d of %d items already predicted",
            benchmark.name,
            len(keys & set(done)),
            len(items),
        )
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(f"eval {benchmark.name}", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            preds = benchmark.predict(predictor, batch, generation)
            if out is not None:
                _append_predictions(out / PREDICTIONS_FILE, preds)
            done.update({str(p["question_id"]): p for p in preds})
            bar.advance(task, len(batch))
    results = _results(benchmark, items, done, prov, num_new=len(todo))
    if out is not None:
        results["predictions"] = str(out / PREDICTIONS_FILE)
        _write_json_atomic(out / RESULTS_FILE, results)
    return results


def _results(
    benchmark: Benchmark,
    items: Sequence[EvalItem],
    predictions: Mapping[str, Prediction],
    prov: dict[str, Any],
    num_new: int | None = None,
) -> dict[str, Any]:
    missing = sum(it.key not in predictions for it in items)
    if missing:
        log.warning(
            "%s: %d of %d items have no prediction (scored as empty answers)",
            benchmark.name,
            missing,
            len(items),
        )
    metrics = benchmark.score(items, predictions)
    prov["finished"] = _now()
    results: dict[str, Any] = {
        "benchmark": benchmark.name,
        "metrics": metrics,
        "num_items": len(items),
        "num_missing": missing,
    }
    if num_new is not None:
        results["num_generated"] = num_new
    results["info"] = dict(benchmark.info)
    results["provenance"] = prov
    return results


def score_predictions(
    benchmark: Benchmark, predictions_file: str | Path, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Score saved predictions (ours or another toolkit's) without a model; results.json goes to `out_dir`."""
    predictions = load_predictions(predictions_file)
    items = benchmark.items()
    prov = provenance(benchmark, predictions_file=predictions_file)
    unknown = set(predictions) - {it.key for it in items}
    if unknown:
        log.warning(
            "%d predictions match no question_id of the benchmark (e.g. %s)", len(unknown), sorted(unknown)[0]
        )
    results = _results(benchmark, items, predictions, prov)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results["predictions"] = str(predictions_file)
        _write_json_atomic(out / RESULTS_FILE, results)
    return results
