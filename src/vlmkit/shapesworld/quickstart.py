"""`vlmkit quickstart`: teach the embedded SmolLM2 to see ShapesWorld on a laptop CPU, then measure it."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.config import RecipeConfig, load_config
from vlmkit.log import get_logger
from vlmkit.memory import peak_rss_gib

log = get_logger(__name__)

# Fixed text-only questions asked before and after training: the LLM's language ability should survive.
TEXT_QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is 2 plus 3?",
]

# Targets from the project's issue for the full (non-tiny) quickstart on a 2-core CPU.
TARGETS = {"attribute_qa_acc": 0.90, "pope_f1": 0.90, "counting_acc": 0.80, "grounding_acc50": 0.50}
RESULT_KEYS = (
    "attribute_qa_acc",
    "counting_acc",
    "pope_accuracy",
    "pope_f1",
    "pope_yes_ratio",
    "grounding_acc50",
    "caption_exact",
    "spatial_acc",
    "region_acc",
)


def ask_text(
    model: Any, questions: Sequence[str], max_new_tokens: int = 40, precision: str = "fp32"
) -> list[str]:
    """Greedy answers of the model to text-only questions (its chat template and saved system prompt)."""
    from vlmkit.infer.generate import ChatRequest, Predictor
    from vlmkit.models.generation import GenerationConfig

    predictor = Predictor(model, precision=precision)
    requests = [ChatRequest([{"role": "user", "content": q}]) for q in questions]
    results = predictor.generate(requests, GenerationConfig(max_new_tokens=max_new_tokens))
    return [r.text.strip() for r in results]


def run_quickstart(
    out_dir: str | Path, tiny: bool = False, overrides: Sequence[str] = (), resume: bool = False
) -> dict[str, Any]:
    """Data → tower pretraining → align → instruct → test-split evaluation → report. Returns the results."""
    import torch

    from vlmkit.models.vlm import VisionLanguageModel
    from vlmkit.shapesworld.scoring import evaluate_shapesworld
    from vlmkit.train.data import prepare_data
    from vlmkit.train.trainer import Trainer, seed_everything

    start = time.perf_counter()
    out = Path(out_dir)
    recipe = load_config(RecipeConfig, "quickstart-tiny" if tiny else "quickstart", list(overrides))
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(recipe.data, out)

    seed_everything(recipe.train.seed)
    model = None
    before_path = out / "text-answers-before.json"
    if resume and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        model = VisionLanguageModel.from_config(recipe.model)
        before = ask_text(model, TEXT_QUESTIONS, precision=recipe.train.precision)
        before_path.write_text(json.dumps(before, indent=1))
    final_dir = Trainer(recipe, out, resume=resume, model=model).run()
    del model

    final = VisionLanguageModel.from_pretrained(final_dir)
    torch.manual_seed(recipe.train.seed)
    from vlmkit.infer.generate import Predictor

    precision = recipe.train.precision
    metrics = evaluate_shapesworld(
        Predictor(final, precision=precision),
        data.test,
        data.image_root,
        batch_size=32,
        max_new_tokens=48,
        out_dir=out / "eval",
        progress=True,
        seed=recipe.train.seed,
    )
    after = ask_text(final, TEXT_QUESTIONS, precision=precision)
    changed = sum(a != b for a, b in zip(before, after))
    results: dict[str, Any] = {k: metrics.get(k) for k in RESULT_KEYS}
    results.update(
        text_answers_changed=changed,
        text_answers={"questions": TEXT_QUESTIONS, "before": before, "after": after},
        wall_s=round(time.perf_counter() - start, 1),
        peak_rss_gib=round(peak_rss_gib(), 3),
        targets=TARGETS if not tiny else {},
        model_dir=str(final_dir),
        tiny=tiny,
        counts={k: v for k, v in metrics.items() if k.startswith("n_")},
    )
    (out / "quickstart-results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, out / "quickstart-results.png")
    return results


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Bar chart of the quickstart metrics with the targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in RESULT_KEYS if isinstance(results.get(k), int | float)]
    values = [results[k] for k in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(range(len(names)), values, color="#4c78a8")
    for i, name in enumerate(names):
        target = results.get("targets", {}).get(name)
        if target is not None:
            ax.hlines(target, i - 0.4, i + 0.4, colors="#e45756", linestyles="--")
            bars[i].set_color("#54a24b" if results[name] >= target else "#f58518")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(
        f"vlmkit quickstart ({results['wall_s']:.0f} s, peak {results['peak_rss_gib']:.2f} GiB; "
        "dashed: target)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_report(results: dict[str, Any], out_dir: Path) -> None:
    """The results table, the text-ability check and the commands to use the model."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="quickstart: held-out ShapesWorld test split")
    for col in ("metric", "value", "target", ""):
        table.add_column(col)
    for key in RESULT_KEYS:
        value = results.get(key)
        target = results.get("targets", {}).get(key)
        mark = "" if target is None or value is None else ("met" if value >= target else "NOT met")
        table.add_row(
            key, "-" if value is None else f"{value:.3f}", "" if target is None else f">= {target}", mark
        )
    table.add_row(
        "text_answers_changed", f"{results['text_answers_changed']} / {len(TEXT_QUESTIONS)}", "", ""
    )
    table.add_row("wall_s", f"{results['wall_s']:.0f}", "<= 900" if not results["tiny"] else "", "")
    table.add_row("peak_rss_gib", f"{results['peak_rss_gib']:.2f}", "<= 4" if not results["tiny"] else "", "")
    console.print(table)
    model_dir = results["model_dir"]
    console.print(f"results: {out_dir / 'quickstart-results.json'} and {out_dir / 'quickstart-results.png'}")
    console.print(
        "chat with it:   [bold]vlmkit chat "
        + model_dir
        + f" --image {out_dir / 'data' / 'images' / 'test-000000.png'}[/bold]"
    )
    console.print(
        f"serve it:       [bold]vlmkit serve {model_dir} --port 8000[/bold]  (OpenAI-compatible API + web "
        "demo at http://127.0.0.1:8000/)"
    )
    console.print(
        f"evaluate it:    [bold]vlmkit eval {model_dir} --benchmark shapesworld --data "
        f"{out_dir / 'data' / 'test.json'}[/bold]"
    )
