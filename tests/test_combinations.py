"""Every tower x bridge x fusion combination listed in the README builds and runs forward + backward."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from vlmkit.config import BridgeConfig, FusionConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.bridges import BRIDGES
from vlmkit.models.fusion import FUSIONS
from vlmkit.models.vision import VISION_TOWERS
from vlmkit.models.vlm import VisionLanguageModel

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


# every registered tower, bridge and fusion is run (their own tiny configs; a kind without them runs on its
# defaults), so a new part is covered with no edit here
def _tiny(registry, cfg_cls) -> dict[str, object]:
    tiny = registry.tiny_configs()
    covered = {label.split(":")[0] for label in tiny}
    return {**tiny, **{name: cfg_cls.make(name) for name in registry.names() if name not in covered}}


BRIDGE_CFGS = _tiny(BRIDGES, BridgeConfig)
FUSION_CFGS = _tiny(FUSIONS, FusionConfig)
COMBOS = [(t, b, f) for t in TINY_TOWERS for b in BRIDGE_CFGS for f in FUSION_CFGS]
COMBOS += [(t, "mlp+" + r, "prefix") for t in TINY_TOWERS for r in ("pixel_shuffle", "pool")]


def test_readme_table_lists_exactly_the_registered_parts():
    table = readme_table()
    assert sorted(table["tower"]) == VISION_TOWERS.names()
    assert sorted(table["bridge"]) == BRIDGES.names()
    assert sorted(table["fusion"]) == FUSIONS.names()


@pytest.mark.parametrize("tower,bridge,fusion", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_combination_forward_backward(tower, bridge, fusion):
    torch.manual_seed(0)
    kind, _, reduce = bridge.partition("+")
    bridge_cfg = copy.deepcopy(BRIDGE_CFGS[kind])
    bridge_cfg.reduce = reduce or "none"
    cfg = tiny_model_config(
        vision=copy.deepcopy(TINY_TOWERS[tower]), bridge=bridge_cfg, fusion=copy.deepcopy(FUSION_CFGS[fusion])
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
