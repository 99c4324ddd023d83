"""Every tower x bridge x fusion combination listed in the README builds and runs forward + backward."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from vlmkit.config import BridgeConfig, FusionConfig
from vlmkit.models.bridges import BRIDGES
from vlmkit.models.vlm import IGNORE_INDEX, VisionLanguageModel

from conftest import TINY_TOWERS, random_image, tiny_model_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> dict[str, list[str]]:
    """Ids in backticks per column of the README's 'Supported combinations' table."""
    text = README.read_text().split("### Supported combinations", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cols: dict[str, list[str]] = {"tower": [], "bridge": [], "fusion": []}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name, cell in zip(cols, cells):
            ids = re.findall(r"`([a-z_0-9]+)`", cell)
            ids = ids if name == "fusion" else ids[:1]  # tower/bridge cells: the id leads, options follow
            cols[name] += [i for i in ids if i not in cols[name]]
    return cols


# every registered bridge is run, so a new bridge is covered with no edit here
BRIDGE_KINDS = sorted(set(BRIDGES.names()) | set(readme_table()["bridge"]))
COMBOS = [(t, b, f) for t in TINY_TOWERS for b in BRIDGE_KINDS for f in ("prefix", "xattn")]
COMBOS += [(t, "mlp+" + r, "prefix") for t in TINY_TOWERS for r in ("pixel_shuffle", "pool")]


def test_readme_table_names_only_real_parts():
    table = readme_table()
    assert set(table["bridge"]) <= set(BRIDGES.names()) and len(table["bridge"]) >= 5
    assert set(table["fusion"]) == {"prefix", "xattn"}
    assert {"vit", "hf", "fused"} <= set(table["tower"])


@pytest.mark.parametrize("tower,bridge,fusion", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_combination_forward_backward(tower, bridge, fusion):
    torch.manual_seed(0)
    kind, _, reduce = bridge.partition("+")
    cfg = tiny_model_config(
        vision=copy.deepcopy(TINY_TOWERS[tower]),
        bridge=BridgeConfig(kind=kind, num_queries=4, num_heads=2, num_layers=1, reduce=reduce or "none"),
        fusion=FusionConfig(mode=fusion, every=1, heads=2),
    )
    model = VisionLanguageModel.from_config(cfg)
    if fusion == "xattn":  # open the gates so gradients reach every part
        for name, p in model.named_parameters():
            if "gate" in name:
                torch.nn.init.constant_(p, 0.5)
    batch = model.prepare_prompts(["<image>\nA red circle.", "No image here."], [[random_image(0)], []])
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == model.image_token_id)] = IGNORE_INDEX
    out = model(**batch, labels=labels)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.vision, model.bridge):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
