"""Tests for the ShapesWorld generator: determinism, disjoint splits, answers vs ground truth, CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.grounding import Box, format_box, parse_boxes
from vlmkit.shapesworld.world import (
    ALL_TASKS,
    COLORS,
    POPE_SPLITS,
    SHAPES,
    ShapeObject,
    caption_for,
    generate_shapesworld,
    make_records,
    make_scene,
    render,
)

SPLITS = {"train": 40, "val": 10, "test": 10}


def _load(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def _objects(rec: dict) -> list[dict]:
    return rec["meta"]["objects"]


def _sig(rec: dict) -> tuple:
    return tuple((o["color"], o["shape"], tuple(o["box"])) for o in _objects(rec))


def _holds(rel: str, a: list[int], b: list[int]) -> bool:
    return {
        "left": a[2] <= b[0],
        "right": a[0] >= b[2],
        "above": a[3] <= b[1],
        "below": a[1] >= b[3],
    }[rel]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("sw")
    paths = generate_shapesworld(out, 0, seed=3, max_objects=4, noise=True, splits={"train": 240, "test": 60})
    return {split: _load(p) for split, p in paths.items()}


# ------------------------------------------------------------------------------------ determinism/splits
def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = generate_shapesworld(tmp_path / "a", 0, seed=7, splits=SPLITS, noise=True)
    b = generate_shapesworld(tmp_path / "b", 0, seed=7, splits=SPLITS, noise=True)
    c = generate_shapesworld(tmp_path / "c", 0, seed=8, splits=SPLITS, noise=True)
    assert list(a) == ["train", "val", "test"]
    for split in SPLITS:
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    images_a = sorted((tmp_path / "a" / "images").iterdir())
    assert len(images_a) == sum(SPLITS.values())
    for img in images_a:
        assert img.read_bytes() == (tmp_path / "b" / "images" / img.name).read_bytes()
    records = _load(a["train"])
    assert len(records) >= SPLITS["train"] * (len(ALL_TASKS) - 1)  # ~one record per scene and task
    assert (tmp_path / "a" / records[0]["image"]).is_file()


def test_splits_are_disjoint_even_in_a_tiny_scene_space(tmp_path: Path) -> None:
    # 16 px with one object leaves ~2000 possible scenes: repeats would be certain without resampling.
    splits = {"train": 150, "val": 50, "test": 50}
    paths = generate_shapesworld(tmp_path, 0, seed=0, image_size=16, max_objects=1, splits=splits)
    sigs = {s: {_sig(r) for r in _load(p) if r["task"] == "caption"} for s, p in paths.items()}
    assert {s: len(v) for s, v in sigs.items()} == splits  # no repeats inside a split either
    assert not sigs["train"] & sigs["val"]
    assert not sigs["train"] & sigs["test"]
    assert not sigs["val"] & sigs["test"]


def test_test_split_does_not_depend_on_train_size(tmp_path: Path) -> None:
    a = generate_shapesworld(tmp_path / "a", 0, seed=1, splits={"train": 5, "test": 8}, tasks=["caption"])
    b = generate_shapesworld(tmp_path / "b", 0, seed=1, splits={"train": 30, "test": 8}, tasks=["caption"])
    assert a["test"].read_bytes() == b["test"].read_bytes()
    assert a["train"].read_bytes() != b["train"].read_bytes()


# ----------------------------------------------------------------------------------- answers vs meta
def test_record_schema_and_every_task_present(dataset: dict[str, list[dict]]) -> None:
    records = dataset["train"]
    assert set(Counter(r["task"] for r in records)) == set(ALL_TASKS)
    assert len({r["id"] for r in records + dataset["test"]}) == len(records) + len(dataset["test"])
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": r["answer"]}
        assert re.fullmatch(r"images/train-\d{6}\.png", r["image"])
        for o in _objects(r):
            assert o["color"] in COLORS and o["shape"] in SHAPES
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64


def test_caption_is_canonical_left_to_right(dataset: dict[str, list[dict]]) -> None:
    for r in (r for r in dataset["train"] if r["task"] == "caption"):
        objs = _objects(r)
        centers = [(o["box"][0] + o["box"][2]) / 2 for o in objs]
        assert centers == sorted(centers)
        expected = caption_for(
            [ShapeObject(o["color"], o["shape"], o["size"], tuple(o["box"])) for o in objs]
        )
        assert r["answer"] == expected
        assert r["answer"].count(",") + r["answer"].count(" and ") == len(objs) - 1


def test_caption_grammar() -> None:
    def obj(c: str, s: str) -> ShapeObject:
        return ShapeObject(c, s, "small", (0, 0, 8, 8))

    assert caption_for([obj("red", "circle")]) == "a red circle."
    assert caption_for([obj("red", "circle"), obj("orange", "star")]) == "a red circle and an orange star."
    three = [obj("red", "circle"), obj("blue", "square"), obj("green", "triangle")]
    assert caption_for(three) == "a red circle, a blue square and a green triangle."


def test_counting_answers(dataset: dict[str, list[dict]]) -> None:
    kinds = Counter()
    for r in (r for r in dataset["train"] if r["task"] == "counting"):
        objs, q = _objects(r), r["conversations"][0]["value"]
        if q.endswith("How many objects are there?"):
            expected = len(objs)
        elif m := re.search(r"How many (\w+) objects are there\?", q):
            expected = sum(o["color"] == m[1] for o in objs)
        else:
            shape = re.search(r"How many (\w+)s are there\?", q)[1]
            expected = sum(o["shape"] == shape for o in objs)
        kinds[r["meta"]["count_of"]] += 1
        assert r["answer"] == str(expected)
    assert set(kinds) == {"all", "color", "shape"}
    answers = {r["answer"] for r in dataset["train"] if r["task"] == "counting"}
    assert {"0", "1", "2"} <= answers


def test_attribute_answers_are_unambiguous_and_right(dataset: dict[str, list[dict]]) -> None:
    seen = set()
    for r in (r for r in dataset["train"] if r["task"] == "attribute_qa"):
        objs, q = _objects(r), r["conversations"][0]["value"]
        if m := re.search(r"What color is the (\w+)\?", q):
            matches = [o for o in objs if o["shape"] == m[1]]
            assert len(matches) == 1 and r["answer"] == matches[0]["color"]
            seen.add("color")
        elif m := re.search(r"What shape is the (\w+) object\?", q):
            matches = [o for o in objs if o["color"] == m[1]]
            assert len(matches) == 1 and r["answer"] == matches[0]["shape"]
            seen.add("shape")
        else:
            assert "leftmost" in q and r["answer"] == objs[0]["color"]
    assert seen == {"color", "shape"}


def test_spatial_answers(dataset: dict[str, list[dict]]) -> None:
    phrases = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
    alt = "|".join(phrases)
    answers = Counter()
    for r in (r for r in dataset["train"] if r["task"] == "spatial"):
        objs, q = _objects(r), r["conversations"][0]["value"]
        by_name = {f"{o['color']} {o['shape']}": o["box"] for o in objs}
        size = r["meta"]["width"]
        if m := re.search(rf"Is the (\w+ \w+) ({alt}) the (\w+ \w+)\?", q):
            a, b = by_name[m[1]], by_name[m[3]]
            truth = _holds(phrases[m[2]], a, b)
            assert truth or _holds(phrases[m[2]], b, a)  # "no" only when the opposite clearly holds
            assert r["answer"] == ("yes" if truth else "no")
        elif m := re.search(rf"What is ({alt}) the (\w+ \w+)\?", q):
            b = by_name[m[2]]
            holders = [n for n, box in by_name.items() if box is not b and _holds(phrases[m[1]], box, b)]
            assert holders == [r["answer"].removeprefix("the ")]
        else:
            m = re.search(r"Is the (\w+ \w+) in the (left|right|top|bottom) half of the image\?", q)
            x1, y1, x2, y2 = by_name[m[1]]
            inside = {"left": x2 <= size / 2, "right": x1 >= size / 2, "top": y2 <= size / 2}
            inside["bottom"] = y1 >= size / 2
            assert r["answer"] == ("yes" if inside[m[2]] else "no")
        answers[r["answer"]] += 1
    assert answers["yes"] > 0 and answers["no"] > 0 and len(answers) > 2


def test_pope_balanced_and_negatives_correct(dataset: dict[str, list[dict]]) -> None:
    records = [r for r in dataset["train"] if r["task"] == "pope"]
    freq = Counter((o["color"], o["shape"]) for r in records for o in _objects(r))
    per_split = Counter((r["meta"]["pope_split"], r["answer"]) for r in records)
    for split in POPE_SPLITS:
        assert per_split[(split, "yes")] == per_split[(split, "no")] > 0
    for r in records:
        q = r["meta"]["pope_object"]
        pair = (q["color"], q["shape"])
        present = {(o["color"], o["shape"]) for o in _objects(r)}
        assert f"{q['color']} {q['shape']} in the image?" in r["conversations"][0]["value"]
        assert r["answer"] == ("yes" if pair in present else "no")
        if r["answer"] == "no" and r["meta"]["pope_split"] == "adversarial":
            assert any(pair[0] == c or pair[1] == s for c, s in present)
        if r["answer"] == "no" and r["meta"]["pope_split"] == "popular":
            absent = sorted((p for p in freq if p not in present), key=lambda p: -freq[p])
            assert freq[pair] >= freq[absent[2]]  # among the 3 most frequent absent pairs


def _binds(pair: tuple[str, str], present: set[tuple[str, str]]) -> bool:
    """A binding negative: the colour and the shape are both in the scene, on different objects."""
    return (
        pair not in present
        and any(c == pair[0] for c, _ in present)
        and any(s == pair[1] for _, s in present)
    )


def test_train_pope_binding_makes_training_negatives_hard_and_leaves_val_and_test_alone(
    tmp_path: Path,
) -> None:
    splits = {"train": 300, "val": 30, "test": 60}
    plain = generate_shapesworld(tmp_path / "a", 0, seed=5, tasks=["pope"], splits=splits)
    hard = generate_shapesworld(
        tmp_path / "b", 0, seed=5, tasks=["pope"], splits=splits, train_pope_binding=1.0
    )
    for split in ("val", "test"):  # what is scored stays POPE's three standard splits, byte for byte
        assert plain[split].read_bytes() == hard[split].read_bytes()

    def binding(path: Path) -> tuple[int, int]:
        """(binding negatives, negatives whose scene allows one)"""
        records = [r for r in _load(path) if r["answer"] == "no"]
        found = possible = 0
        for r in records:
            present = {(o["color"], o["shape"]) for o in _objects(r)}
            q = r["meta"]["pope_object"]
            found += _binds((q["color"], q["shape"]), present)
            possible += any(_binds((c, s), present) for c in COLORS for s in SHAPES)
        return found, possible

    found, possible = binding(hard["train"])
    assert found == possible > 20  # every negative that can be a binding negative is one
    assert binding(plain["train"])[0] < possible / 2
    records = _load(hard["train"])
    assert Counter(r["answer"] for r in records)["yes"] == Counter(r["answer"] for r in records)["no"]
    for r in records:  # still right answers
        q = r["meta"]["pope_object"]
        present = {(o["color"], o["shape"]) for o in _objects(r)}
        assert r["answer"] == ("yes" if (q["color"], q["shape"]) in present else "no")
    half = generate_shapesworld(
        tmp_path / "c", 0, seed=5, tasks=["pope"], splits=splits, train_pope_binding=0.5
    )
    assert 0.3 * possible < binding(half["train"])[0] < 0.8 * possible
    cli = tmp_path / "cli"
    assert (
        main(["data", "synth", str(cli), "--seed", "5", "--tasks", "pope", "--train-pope-binding", "1"]) == 0
    )
    assert json.loads((cli / "shapesworld_info.json").read_text())["train_pope_binding"] == 1.0
    with pytest.raises(ValueError, match="train_pope_binding"):
        generate_shapesworld(tmp_path / "d", 2, seed=0, train_pope_binding=1.5)


def test_grounding_and_region_use_grounding_module(dataset: dict[str, list[dict]]) -> None:
    for r in (r for r in dataset["train"] if r["task"] in ("grounding", "region")):
        t, w, h = r["meta"]["target"], r["meta"]["width"], r["meta"]["height"]
        assert t in _objects(r)
        box = Box(*map(float, t["box"]))
        name = f"{t['color']} {t['shape']}"
        assert sum(f"{o['color']} {o['shape']}" == name for o in _objects(r)) == 1  # referent is unique
        if r["task"] == "grounding":
            assert r["answer"] == format_box(box, "qwen", w, h, ref=f"the {name}")
            assert r["answer"].startswith(f"<ref>the {name}</ref><box>(")
            nums = [int(v) for v in re.findall(r"\d+", r["answer"].split("<box>")[1])]
            assert len(nums) == 4 and all(0 <= v < 1000 for v in nums)
            [(ref, parsed)] = parse_boxes(r["answer"], "qwen", w, h)  # what evaluation will read back
            assert ref == f"the {name}" and parsed.iou(box) > 0.9
        else:
            assert format_box(box, "qwen", w, h) in r["conversations"][0]["value"]
            assert r["answer"] in (f"a {name}", f"an {name}")


@pytest.mark.parametrize("fmt", ["pixel", "kosmos"])
def test_grounding_format_option(fmt: str) -> None:
    scene = make_scene(np.random.default_rng(0), 64, 3, False)
    recs = make_records(scene, "x.png", "s", np.random.default_rng(0), ["grounding"], grounding_format=fmt)
    t = recs[0]["meta"]["target"]
    assert recs[0]["answer"] == format_box(
        Box(*map(float, t["box"])), fmt, 64, 64, ref=recs[0]["meta"]["ref"]
    )


# ------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("size", [32, 64, 224])
def test_boxes_lie_on_drawn_pixels(size: int) -> None:
    rng = np.random.default_rng(size)
    for _ in range(15):
        scene = make_scene(rng, size, 3, noise=True)
        pixels = np.asarray(render(scene))
        assert pixels.shape == (size, size, 3)
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            assert tuple(pixels[cy, cx]) == COLORS[o.color], (o, size)
            if o.shape == "square":  # tight box: filled inside, not drawn on the row above
                assert (pixels[y1:y2, x1:x2] == COLORS[o.color]).all()
                if y1 > 0:
                    assert not (pixels[y1 - 1, x1:x2] == COLORS[o.color]).all(axis=-1).any()


def test_written_png_matches_meta(tmp_path: Path) -> None:
    paths = generate_shapesworld(tmp_path, 20, seed=5, tasks=["region"])
    for r in _load(paths["train"]):
        img = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"))
        assert img.shape == (64, 64, 3)
        for o in _objects(r):
            x1, y1, x2, y2 = o["box"]
            assert tuple(img[(y1 + y2) // 2, (x1 + x2) // 2]) == COLORS[o["color"]]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_synth_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sw"
    argv = [
        "data",
        "synth",
        str(out),
        "--seed",
        "2",
        "--image-size",
        "32",
        "--splits",
        "train=6,val=2,test=2",
    ]
    assert main([*argv, "--tasks", "caption,pope", "--max-objects", "2"]) == 0
    printed = capsys.readouterr().out
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        records = _load(out / f"{split}.json")
        assert len(records) == 2 * n
        assert {r["task"] for r in records} == {"caption", "pope"}
        assert all(len(_objects(r)) <= 2 for r in records)
        assert f"{split}: {out / f'{split}.json'} ({n} images, {2 * n} records)" in printed
    assert Image.open(out / records[0]["image"]).size == (32, 32)
    assert main(["data"]) == 2


def test_cli_rejects_bad_splits(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["data", "synth", str(tmp_path), "--splits", "train:5"])


def test_describe_first_lists_the_objects_then_answers_and_scores_like_the_short_answer(
    tmp_path: Path,
) -> None:
    from vlmkit.shapesworld.scoring import score_shapesworld
    from vlmkit.shapesworld.world import described_answer

    tasks = ["caption", "counting", "pope", "spatial"]
    short = _load(generate_shapesworld(tmp_path / "a", 0, seed=5, tasks=tasks, splits={"train": 60})["train"])
    argv = ["data", "synth", str(tmp_path / "b"), "--seed", "5", "--splits", "train=60"]
    assert main([*argv, "--tasks", ",".join(tasks), "--describe-first", "counting,pope,spatial"]) == 0
    described = _load(tmp_path / "b" / "train.json")
    assert [r["id"] for r in described] == [r["id"] for r in short]
    for plain, r in zip(short, described):
        reply = r["conversations"][1]["value"]
        assert r["answer"] == plain["answer"] and r["conversations"][0] == plain["conversations"][0]
        if r["task"] == "caption" or not (r["answer"].isdigit() or r["answer"] in ("yes", "no")):
            assert reply == r["answer"]  # captions and spatial questions that ask for a name stay short
            continue
        names = [f"{o['color']} {o['shape']}" for o in _objects(r)]
        assert reply.startswith("I see") and reply.endswith(f" so {r['answer']}.")
        assert re.findall(r"\ban? (\w+ \w+)", reply) == names, reply  # every object, left to right
        objs = [ShapeObject(o["color"], o["shape"], o["size"], tuple(o["box"])) for o in _objects(r)]
        assert reply == described_answer(objs, r["answer"], numbered=r["task"] == "counting")
        if r["task"] == "counting":  # counts number the objects: "I see: first, a red circle; second, ..."
            ordinals = re.findall(r"(\w+), an? \w+ \w+", reply)
            assert ordinals == ["first", "second", "third", "fourth"][: len(names)], reply
    # the metrics read a described reply as its short answer: replaying the replies scores 1.0 everywhere
    scores = score_shapesworld(described, {r["id"]: r["conversations"][1]["value"] for r in described})
    assert scores["counting_acc"] == scores["spatial_acc"] == scores["pope_accuracy"] == 1.0
    with pytest.raises(ValueError, match="describe_first"):
        generate_shapesworld(tmp_path / "c", 2, seed=0, describe_first=["grounding"])
