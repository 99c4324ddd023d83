"""Collator padding sides, packing equivalence (per-sample loss, attention isolation) and the sampler."""

from __future__ import annotations

import pytest
import torch

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.collate import (
    Collator,
    LengthGroupedSampler,
    PackingCollator,
    first_fit,
    model_inputs,
    padded_sample_index,
    per_sample_token_loss,
    sample_label_weights,
)


def _item(sid: str, ids: list[int], n_prompt: int, images: int = 0, size: int = 32, seed: int = 0) -> dict:
    """A dataset-style item: labels are IGNORE on the first `n_prompt` tokens, pixel_values [I, 3, S, S]."""
    g = torch.Generator().manual_seed(seed)
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    pixels = torch.randn(images, 3, size, size, generator=g) if images else None
    return {
        "id": sid,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": pixels,
        "image_count": images,
        "num_tiles": [1] * images,
        "length": len(ids),
    }


def test_collator_right_padding():
    items = [
        _item("a", [5, 6, 7, 8], 2, images=1),
        _item("b", [9, 10], 1),
        _item("c", [1, 2, 3], 1, images=2),
    ]
    batch = Collator(pad_token_id=0, padding_side="right")(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [1, 2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, 8],
        [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX],
    ]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][0], items[0]["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1:], items[2]["pixel_values"])
    assert batch["image_counts"] == [1, 0, 2]
    assert batch["sample_ids"] == ["a", "b", "c"]
    assert set(model_inputs(batch)) <= {
        "input_ids",
        "attention_mask",
        "labels",
        "pixel_values",
        "image_counts",
        "sample_ids",
        "position_ids",
    }


def test_collator_left_padding_and_no_images():
    items = [_item("a", [5, 6, 7], 1), _item("b", [9], 0)]
    items[1]["labels"] = None  # generation prompts carry no labels
    batch = Collator(pad_token_id=3, padding_side="left", pad_to_multiple_of=4)(items)
    assert batch["input_ids"].tolist() == [[3, 5, 6, 7], [3, 3, 3, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert "labels" not in batch
    assert batch["pixel_values"] is None and batch["image_counts"] == [0, 0]
    with pytest.raises(ValueError, match="padding_side"):
        Collator(0, padding_side="middle")


def test_left_padding_generation_matches_unpadded(tiny_vlm):
    """Left padding keeps the last position real: next-token logits equal the unpadded ones."""
    tok_id = tiny_vlm.image_token_id
    short = [1, 40, 41] + [tok_id] * 16 + [42]
    long = [1, 50, 51, 52, 53, 54] + [tok_id] * 16 + [55, 56]
    items = [_item("s", short, len(short), images=1, seed=1), _item("l", long, len(long), images=1, seed=2)]
    batch = Collator(tiny_vlm.tokenizer.pad_token_id, padding_side="left")(items)
    batch.pop("labels")
    with torch.no_grad():
        padded = tiny_vlm(**model_inputs(batch)).logits[:, -1]  # [B, V]
        alone = tiny_vlm(**model_inputs(Collator(0)([items[0]]))).logits[:, -1]
    assert torch.allclose(padded[0], alone[0], atol=1e-4)


def test_first_fit():
    assert first_fit([5, 3, 4, 2, 9], capacity=8) == [[0, 1], [2, 3], [4]]


def test_packed_matches_unpacked_per_sample_loss(tiny_vlm):
    tok_id = tiny_vlm.image_token_id
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> list[int]:
        return torch.randint(5, 700, (n,), generator=g).tolist()

    items = [
        _item("a", [1] + text(3) + [tok_id] * 16 + text(8), n_prompt=20, images=1, seed=10),
        _item("b", [1] + text(5) + text(6), n_prompt=6, seed=11),
        _item("c", [1] + text(2) + [tok_id] * 32 + text(4) + text(5), n_prompt=39, images=2, seed=12),
        _item("d", [1] + text(4) + text(9), n_prompt=0, seed=13),
    ]
    unpacked = Collator(tiny_vlm.tokenizer.pad_token_id, padding_side="right")(items)
    packed = PackingCollator(tiny_vlm.tokenizer.pad_token_id, max_length=64)(items)

    # Layout: fewer rows than samples, no attention mask, positions restart at every sample.
    assert packed["input_ids"].shape == (2, 64)
    assert packed["attention_mask"] is None
    assert packed["sample_ids"] == ["a+b+d", "c"]
    assert packed["image_counts"] == [1, 2]
    assert torch.equal(packed["pixel_values"][0], items[0]["pixel_values"][0])
    assert torch.equal(packed["pixel_values"][1:], items[2]["pixel_values"])
    pos, idx, labels = packed["position_ids"], packed["sample_index"], packed["labels"]
    for k, item in enumerate(items):
        row, cols = (idx == k).nonzero(as_tuple=True)
        assert len(cols) == item["length"] and len(set(row.tolist())) == 1
        assert pos[row, cols].tolist() == list(range(item["length"]))
        assert labels[row[0], cols[0]].item() == IGNORE_INDEX  # boundary token never predicted across samples
        assert torch.equal(labels[row, cols][1:], item["labels"][1:])  # assistant-only labels kept
    assert (labels[idx == -1] == IGNORE_INDEX).all()

    with torch.no_grad():
        out_u = tiny_vlm(**model_inputs(unpacked))
        out_p = tiny_vlm(**model_inputs(packed))
    loss_u, n_u = per_sample_token_loss(
        out_u.logits, unpacked["labels"], padded_sample_index(unpacked["attention_mask"]), len(items)
    )
    loss_p, n_p = per_sample_token_loss(out_p.logits, packed["labels"], packed["sample_index"], len(items))
    assert n_u.tolist() == [8, 6, 5, 13] and torch.equal(n_u, n_p)
    assert torch.allclose(loss_u, loss_p, atol=1e-4), (loss_u, loss_p)
    # The per-sample sums add up to the model's own (mean) loss.
    assert torch.allclose(loss_u.sum() / n_u.sum(), out_u.loss, atol=1e-5)
    assert torch.allclose(loss_p.sum() / n_p.sum(), out_p.loss, atol=1e-5)
    # The training path (LM head at labelled positions only) keeps packed samples apart too.
    with torch.no_grad():
        train_u = tiny_vlm(**model_inputs(unpacked), return_logits=False).loss
        train_p = tiny_vlm(**model_inputs(packed), return_logits=False).loss
    assert torch.allclose(train_u, out_u.loss, atol=1e-5) and torch.allclose(train_p, out_u.loss, atol=1e-5)
    # Sample averaging: every sample's mean counts once, however many label tokens it has.
    w_u = sample_label_weights(unpacked["labels"], padded_sample_index(unpacked["attention_mask"]))
    w_p = sample_label_weights(packed["labels"], packed["sample_index"])
    assert torch.allclose(w_u.sum(), torch.tensor(4.0)) and torch.allclose(w_p.sum(), torch.tensor(4.0))
    per_sample = (loss_u / n_u).mean()
    assert not torch.allclose(per_sample, out_u.loss, atol=1e-3)  # the two averages differ on this batch
    with torch.no_grad():
        for batch, w in ((unpacked, w_u), (packed, w_p)):
            for return_logits in (True, False):
                got = tiny_vlm(**model_inputs(batch), label_weights=w, return_logits=return_logits).loss
                assert torch.allclose(got, per_sample, atol=1e-5), (got, per_sample)


def test_packed_attention_is_isolated(tiny_vlm):
    """transformers' mask from restarting position_ids: changing sample A never changes sample B's logits."""
    ids_a = torch.randint(5, 700, (10,), generator=torch.Generator().manual_seed(1))
    ids_b = torch.randint(5, 700, (7,), generator=torch.Generator().manual_seed(2))
    collate = PackingCollator(0, max_length=32)

    def logits_of_b(a: torch.Tensor) -> torch.Tensor:
        batch = collate([_item("a", a.tolist(), 1), _item("b", ids_b.tolist(), 1)])
        assert batch["input_ids"].shape[0] == 1
        with torch.no_grad():
            out = tiny_vlm(**model_inputs(batch)).logits  # [1, L, V]
        return out[0, batch["sample_index"][0] == 1]

    base = logits_of_b(ids_a)
    changed = logits_of_b((ids_a + 3) % 700)
    assert torch.allclose(base, changed, atol=1e-5)
    with torch.no_grad():
        alone = tiny_vlm(input_ids=ids_b[None]).logits[0]
    assert torch.allclose(base, alone, atol=1e-4)
    # Control: with an all-ones attention mask the same packed row does leak across samples.
    batch = collate([_item("a", ids_a.tolist(), 1), _item("b", ids_b.tolist(), 1)])
    with torch.no_grad():
        leaky = tiny_vlm(
            input_ids=batch["input_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            position_ids=batch["position_ids"],
        ).logits[0, batch["sample_index"][0] == 1]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_length_grouped_sampler_covers_every_index_and_groups():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (203,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=7, mega_batch_mult=5)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and len(sampler) == 203
    assert lengths[order[0]] == max(lengths)  # the longest item comes first
    # Within a batch lengths are close: mean spread far below that of random batches.
    spread = [
        max(lengths[i] for i in order[k : k + 4]) - min(lengths[i] for i in order[k : k + 4])
        for k in range(0, 200, 4)
    ]
    rand = torch.randperm(203, generator=g).tolist()
    rand_spread = [
        max(lengths[i] for i in rand[k : k + 4]) - min(lengths[i] for i in rand[k : k + 4])
        for k in range(0, 200, 4)
    ]
    assert sum(spread) < 0.5 * sum(rand_spread)
    # Deterministic per (seed, epoch); a new epoch reshuffles.
    assert list(LengthGroupedSampler(lengths, 4, seed=7, mega_batch_mult=5)) == order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(203)) and epoch1 != order


def test_length_grouped_sampler_resumes_mid_epoch():
    lengths = list(range(1, 101))
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    sampler.set_epoch(2)
    full = sampler.indices()
    it = iter(sampler)
    seen = [next(it) for _ in range(37)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "position": 37, "seed": 3}

    resumed = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop's usual call must not discard the loaded position
    assert len(resumed) == 63
    rest = list(resumed)
    assert seen + rest == full
    assert resumed.state_dict()["position"] == 100
    resumed.set_epoch(3)
    assert len(list(resumed)) == 100
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"epoch": 0, "position": 0, "seed": 4})


def test_stage_data_passes_the_mega_batch_size_to_the_sampler():
    from types import SimpleNamespace

    from vlmkit.train.data import StageData

    lengths = torch.randint(1, 500, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    fake = SimpleNamespace(lengths=lengths, __len__=lambda: 96)
    orders = {}
    for mult in (None, 2):
        data = StageData(fake, None, None, 4, 3, True, length_group_mult=mult)
        orders[mult] = data.epoch_order(0)
        assert orders[mult] == LengthGroupedSampler(lengths, 4, seed=3, mega_batch_mult=mult).indices(0)
    assert orders[None] != orders[2]


def test_stage_loss_average_sample_adds_label_weights(tmp_path):
    from vlmkit.config import RecipeConfig, load_config
    from vlmkit.models.vlm import VisionLanguageModel
    from vlmkit.train.data import StageData
    from vlmkit.train.strategies import build_strategy

    recipe = load_config(RecipeConfig, "quickstart-tiny", ["train.feature_cache=false"])
    model = VisionLanguageModel.from_config(recipe.model)
    stage = recipe.stages[-1]  # the instruct stage
    for average in ("token", "sample"):
        stage.loss_average = average
        data = StageData.build(recipe, stage, model, tmp_path, build_strategy("single"))
        batch, _, _ = data.next_batch(0, 0)
        assert ("label_weights" in batch) == (average == "sample")
        if average == "sample":  # one unit of weight per sample of the batch
            assert torch.allclose(batch["label_weights"].sum(), torch.tensor(float(stage.batch_size)))
    stage.loss_average = "per-task"
    with pytest.raises(ValueError, match="loss_average"):
        StageData.build(recipe, stage, model, tmp_path, build_strategy("single"))


def test_stage_task_weights_set_the_mixture_of_the_training_data(tmp_path):
    from collections import Counter

    from vlmkit.config import RecipeConfig, load_config
    from vlmkit.models.vlm import VisionLanguageModel
    from vlmkit.train.data import StageData
    from vlmkit.train.strategies import build_strategy

    recipe = load_config(RecipeConfig, "quickstart-tiny", ["train.feature_cache=false"])
    model = VisionLanguageModel.from_config(recipe.model)
    stage = recipe.stages[-1]
    plain = StageData.build(recipe, stage, model, tmp_path, build_strategy("single"))
    stage.task_weights = {"counting": 3.0, "caption": 0.0}
    mixed = StageData.build(recipe, stage, model, tmp_path, build_strategy("single"))

    def tasks(data: StageData) -> Counter:
        return Counter(e.id.rsplit("-", 1)[1] for e in data.train.encoded)

    before, after = tasks(plain), tasks(mixed)
    assert before["counting"] > 0 and after["counting"] == 3 * before["counting"]
    assert after["caption"] == 0 and after["pope"] == before["pope"]
    assert mixed.num_samples == sum(after.values())
    assert mixed.train.report.to_dict() == plain.train.report.to_dict()  # each record encoded, counted once
    first = next(e for e in mixed.train.encoded if e.meta.get("task") == "counting")
    copies = [e for e in mixed.train.encoded if e.id == first.id]
    assert len(copies) == 3 and all(e is first for e in copies)  # one encoded sample, not encoded again
    assert mixed.val is not None and len(mixed.val) == len(plain.val)  # validation keeps the plain mix
    recipe.data.merge_turns = True
    with pytest.raises(ValueError, match="merge_turns"):
        StageData.build(recipe, stage, model, tmp_path, build_strategy("single"))
