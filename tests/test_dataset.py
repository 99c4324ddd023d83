"""VLMDataset validation (every bad case skipped and counted by reason), items, AnyRes and `vlmkit data check`."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import pytest
import torch

from vlmkit.cli import main
from vlmkit.config import DataConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.collate import Collator, model_inputs
from vlmkit.data.dataset import (
    DataError,
    DataQualityError,
    DataReport,
    VLMDataset,
    check_data,
    read_samples,
)
from vlmkit.data.processor import ImageProcessor

from conftest import random_image

GOOD_IDS = ["ok-0", "ok-1", "ok-2", "ok-3", "ok-two-images", "ok-text-only", "ok-messages", "ok-caption"]
# Rejections in the corpus below, per reason (tokenizer-free and model checks agree on all of them).
EXPECTED = {
    "corrupt": 1,
    "truncated": 1,
    "missing_file": 2,
    "empty_file": 1,
    "too_many_pixels": 1,
    "bad_schema": 2,
    "malformed_json": 1,
    "no_assistant_turn": 1,
    "image_count_mismatch": 1,
    "too_long": 1,
    "remote_image": 1,
}
MAX_LENGTH = 200


def _png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid small PNG whose IHDR claims 100000 x 100000 pixels (CRC fixed): a decompression bomb header."""
    data = _png(0)
    chunk = b"IHDR" + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def _llava(
    sid: str, image: str | list[str] | None, question: str, answer: str | None = "A red circle."
) -> dict:
    conv = [{"from": "human", "value": question}]
    if answer is not None:
        conv.append({"from": "gpt", "value": answer})
    record: dict = {"id": sid, "conversations": conv}
    if image is not None:
        record["image"] = image
    return record


def make_corpus(root: Path) -> Path:
    """A JSONL file with 8 good samples and one or more of every bad case; images under root/images."""
    img = root / "images"
    img.mkdir(parents=True)
    for i in range(5):
        (img / f"ok{i}.png").write_bytes(_png(i))
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (img / "truncated.png").write_bytes(_png(7, (64, 64))[: len(_png(7, (64, 64))) // 2])
    (img / "empty.png").write_bytes(b"")
    (img / "bomb.png").write_bytes(_bomb_png())
    q = "<image>\nWhat is in the image?"
    lines = [
        json.dumps(_llava("ok-0", "images/ok0.png", q)),
        json.dumps(_llava("corrupt-bytes", "images/corrupt.png", q)),
        json.dumps(_llava("ok-1", "images/ok1.png", q)),
        json.dumps(_llava("truncated-png", "images/truncated.png", q)),
        json.dumps(_llava("missing-1", "images/nope.png", q)),
        json.dumps(_llava("missing-2", "images/nope2.png", q)),
        json.dumps(_llava("zero-bytes", "images/empty.png", q)),
        json.dumps(_llava("bomb", "images/bomb.png", q)),
        json.dumps(_llava("ok-2", "images/ok2.png", q)),
        json.dumps({"id": "wrong-schema", "conversations": "not a list", "image": "images/ok0.png"}),
        json.dumps([1, 2, 3]),  # a JSON line that is not an object
        '{"id": "broken", "conversations": [',  # malformed JSON line
        json.dumps(_llava("no-assistant", "images/ok0.png", q, answer=None)),
        json.dumps(_llava("mismatch", "images/ok0.png", "<image>\n<image>\nCompare the images.")),
        json.dumps(_llava("too-long", "images/ok0.png", q, answer=" ".join(["circle"] * 400))),
        json.dumps(_llava("remote", "https://example.com/cat.png", q)),
        json.dumps(_llava("ok-3", "images/ok3.png", q)),
        json.dumps(
            _llava("ok-two-images", ["images/ok3.png", "images/ok4.png"], "<image>\n<image>\nSame?", "No.")
        ),
        json.dumps(_llava("ok-text-only", None, "What is the capital of France?", "Paris.")),
        json.dumps(
            {
                "id": "ok-messages",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}],
                    },
                    {"role": "assistant", "content": "A blue square."},
                ],
                "images": ["images/ok1.png"],
            }
        ),
        json.dumps({"id": "ok-caption", "image": "images/ok2.png", "caption": "Two green stars."}),
        "",  # blank lines are not records
    ]
    path = root / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def dataset(corpus, tiny_vlm) -> VLMDataset:
    return VLMDataset.from_config(DataConfig(max_length=MAX_LENGTH, max_bad=1.0), corpus, tiny_vlm.processor)


def test_report_counts_every_reason_and_keeps_every_good_sample(dataset):
    report = dataset.report
    assert dict(report.rejected) == EXPECTED
    assert report.ok == len(GOOD_IDS) and report.total == len(GOOD_IDS) + sum(EXPECTED.values())
    assert [e.id for e in dataset.encoded] == GOOD_IDS  # no good sample lost, order kept
    assert report.examples["missing_file"] == "missing-1"  # the first one, named
    assert report.examples["image_count_mismatch"] == "mismatch"
    assert report.examples["malformed_json"] == "line 12"
    assert report.to_dict() == {"total": report.total, "ok": report.ok, "rejected": dict(report.rejected)}


def test_rejections_logged_once_per_reason(corpus, tiny_vlm, caplog):
    with caplog.at_level(logging.WARNING, logger="vlmkit"), pytest.raises(DataQualityError, match="max_bad"):
        VLMDataset.from_config(
            DataConfig(max_length=MAX_LENGTH), corpus, tiny_vlm.processor
        )  # 13/21 bad > 5%
    skipped = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(skipped) == len(EXPECTED)  # one line per reason, not per sample
    missing = [m for m in skipped if "missing_file" in m]
    assert len(missing) == 1 and "missing-1" in missing[0]


def test_threaded_validation_matches(corpus, tiny_vlm, dataset):
    cfg = DataConfig(max_length=MAX_LENGTH, max_bad=1.0)
    threaded = VLMDataset.from_config(cfg, corpus, tiny_vlm.processor, num_workers=2)
    assert threaded.report == dataset.report
    assert [e.input_ids for e in threaded.encoded] == [e.input_ids for e in dataset.encoded]


def test_items_and_batches_match_the_model(dataset, tiny_vlm):
    per_image = tiny_vlm.tokens_per_image()
    two = dataset[GOOD_IDS.index("ok-two-images")]
    assert two["pixel_values"].shape == (2, 3, 32, 32) and two["pixel_values"].dtype == torch.float32
    assert two["image_count"] == 2 and two["num_tiles"] == [1, 1]
    assert two["input_ids"].dtype == torch.long and two["length"] == len(two["input_ids"]) == len(
        two["labels"]
    )
    assert (two["input_ids"] == tiny_vlm.image_token_id).sum().item() == 2 * per_image
    assert (two["labels"][two["input_ids"] == tiny_vlm.image_token_id] == IGNORE_INDEX).all()
    assert tiny_vlm.tokenizer.decode(two["labels"][two["labels"] != IGNORE_INDEX]).startswith("No.")
    text = dataset[GOOD_IDS.index("ok-text-only")]
    assert text["pixel_values"] is None and text["image_count"] == 0
    assert max(dataset.lengths) <= MAX_LENGTH

    batch = Collator(tiny_vlm.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    assert batch["image_counts"] == [1, 1, 1, 1, 2, 0, 1, 1]
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    with torch.no_grad():
        out = tiny_vlm(**model_inputs(batch))  # placeholder counts agree with the images: no mismatch error
    assert torch.isfinite(out.loss)


def test_anyres_tiles_and_pad_resize(corpus, tiny_vlm):
    cfg = DataConfig(max_length=MAX_LENGTH, max_bad=1.0)
    anyres = tiny_vlm.processor.replace(resize="anyres", anyres_grid=[[64, 32], [32, 64], [64, 64]])
    ds = VLMDataset.from_config(cfg, corpus, anyres)
    item = ds[0]  # a 40x30 image: best grid 64x32 -> 2 tiles + the global view
    assert item["num_tiles"] == [3] and item["pixel_values"].shape == (3, 3, 32, 32)
    assert (item["input_ids"] == tiny_vlm.image_token_id).sum().item() == tiny_vlm.tokens_per_image(3)
    batch = Collator(tiny_vlm.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["image_counts"] == [3, 3]
    with torch.no_grad():
        assert torch.isfinite(tiny_vlm(**model_inputs(batch)).loss)

    settings = ImageProcessor(image_size=32, resize="pad", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    wide = settings.tensors(random_image(3, (64, 16)))  # [1, 3, 32, 32]: letterboxed, mean-colored bars
    assert wide.shape == (1, 3, 32, 32)
    assert wide[0, :, :8].abs().max() < 0.01 and wide[0, :, 12:20].abs().max() > 0.1


def test_all_labels_masked_is_a_reason_not_a_crash(corpus, tiny_vlm):
    samples = [s for s in read_samples(corpus) if s.id.startswith("ok-")][:3]
    user_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    ds = VLMDataset(samples, tiny_vlm.processor.replace(template=user_only), image_root=corpus.parent)
    assert len(ds) == 0 and dict(ds.report.rejected) == {"all_labels_masked": 3}


def test_check_data_without_model(corpus):
    report = check_data(corpus, corpus.parent, max_length=MAX_LENGTH, tokens_per_image=16)
    assert isinstance(report, DataReport)
    assert dict(report.rejected) == EXPECTED and report.ok == len(GOOD_IDS)
    threaded = check_data(corpus, corpus.parent, max_length=MAX_LENGTH, tokens_per_image=16, num_workers=2)
    assert threaded == report
    lowered = check_data(corpus, max_length=MAX_LENGTH, max_pixels=1000)  # 40x30 = 1200 pixels > 1000
    # Only the text-only sample survives.
    assert lowered.ok == 1 and lowered.examples["too_many_pixels"] == "ok-0"
    small = check_data(corpus, max_bytes=100)  # every non-empty image file is larger
    assert small.ok == 1 and small.examples["too_large"] == "ok-0" and small.rejected["empty_file"] == 1


def test_cli_check_json_counts_and_exit_codes(corpus, capsys):
    args = [
        "data",
        "check",
        str(corpus),
        "--image-root",
        str(corpus.parent),
        "--json",
        "--max-length",
        str(MAX_LENGTH),
        "--tokens-per-image",
        "16",
    ]
    assert main(args) == 1  # 13 of 21 rejected > 5%
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON object and nothing else
    assert out == {
        "total": len(GOOD_IDS) + sum(EXPECTED.values()),
        "ok": len(GOOD_IDS),
        "rejected": {k: EXPECTED[k] for k in out["rejected"]},
    }
    assert out["rejected"] == EXPECTED
    assert main([*args, "--max-bad", "0.7"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == len(GOOD_IDS)


def test_cli_check_table_and_clean_file(corpus, tmp_path, capsys):
    assert main(["data", "check", str(corpus), "--max-length", str(MAX_LENGTH)]) == 1
    out = capsys.readouterr().out
    assert "missing_file" in out and "missing-1" in out and "malformed_json" in out
    clean = tmp_path / "clean.jsonl"
    good = [line for line in corpus.read_text().splitlines() if '"id": "ok-' in line]
    clean.write_text("\n".join(good) + "\n")
    assert main(["data", "check", str(clean), "--image-root", str(corpus.parent), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"total": 8, "ok": 8, "rejected": {}}


def test_cli_check_with_model_dir(corpus, tiny_vlm, tmp_path, capsys):
    model_dir = tiny_vlm.save_pretrained(tmp_path / "model")
    args = [
        "data",
        "check",
        str(corpus),
        "--json",
        "--model",
        str(model_dir),
        "--max-length",
        str(MAX_LENGTH),
    ]
    assert main(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["rejected"] == EXPECTED and out["ok"] == len(GOOD_IDS)
    (model_dir / "model.safetensors").unlink()  # the check reads the config and tokenizer, never the weights
    assert main(args) == 1
    assert json.loads(capsys.readouterr().out) == out
    (
        model_dir / "processor_config.json"
    ).unlink()  # as saved by a vlmkit before the Processor: still no weights
    assert main(args) == 1
    assert json.loads(capsys.readouterr().out) == out


def test_merge_turns_pays_each_image_once_and_keeps_every_answer(tmp_path, tiny_vlm):
    from vlmkit.shapesworld.world import generate_shapesworld

    paths = generate_shapesworld(tmp_path, 5, seed=3, image_size=32)
    records = json.loads(paths["train"].read_text())
    cfg, chatml = DataConfig(max_length=1024), tiny_vlm.processor.replace(template="chatml")
    single = VLMDataset.from_config(cfg, paths["train"], chatml)
    merged = VLMDataset.from_config(cfg, paths["train"], chatml, merge_turns=True)
    assert len(single) == len(records) and len(merged) == 5
    image_id = tiny_vlm.image_token_id
    for i in range(len(merged)):
        item = merged[i]
        assert (item["input_ids"] == image_id).sum() == tiny_vlm.tokens_per_image()
    supervised = lambda ds: sum(int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(ds)))  # noqa: E731
    assert supervised(merged) == supervised(single)  # every answer still trained on, once
    assert sum(len(merged[i]["input_ids"]) for i in range(5)) < sum(
        len(single[i]["input_ids"]) for i in range(len(single))
    )


# ------------------------------------------------------------------------------------------- bad files
def _qa(i: int, answer: str | None = None) -> dict:
    return _llava(f"g{i}", None, f"Question {i}?", answer or f"Answer {i}.")


def test_bad_bytes_in_jsonl_skip_that_line_and_keep_the_rest(tmp_path, capsys):
    lines = [json.dumps(_qa(i)).encode() for i in range(6)]
    lines[2] = lines[2].replace(b"Answer 2.", b"Answer \xff\xfe 2.")  # not UTF-8
    lines[4] = lines[4].replace(b"Question 4?", b"Caf\xe9 4?")  # Latin-1
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = DataReport(source=str(path))
    assert [s.id for s in read_samples(path, report=report)] == ["g0", "g1", "g3", "g5"]
    assert dict(report.rejected) == {"bad_encoding": 2}
    assert report.examples["bad_encoding"] == "line 3"
    assert "UTF-8" in report.messages["bad_encoding"]
    assert main(["data", "check", str(path), "--json", "--max-bad", "0.5"]) == 0  # no crash: a report
    assert json.loads(capsys.readouterr().out) == {"total": 6, "ok": 4, "rejected": {"bad_encoding": 2}}


def test_bad_bytes_in_a_json_array_skip_that_record_named_by_its_line(tmp_path):
    text = json.dumps([_qa(i) for i in range(5)], indent=2).encode()
    text = text.replace(b"Answer 3.", b"Answer \xe9 3.")
    bad_line = text[: text.index(b"\xe9")].count(b"\n") + 1
    path = tmp_path / "array.json"
    path.write_bytes(text)
    report = DataReport()
    assert [s.id for s in read_samples(path, report=report)] == ["g0", "g1", "g2", "g4"]
    assert dict(report.rejected) == {"bad_encoding": 1}
    assert report.examples["bad_encoding"] == f"line {bad_line}"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8-sig"])
@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_utf16_and_bom_files_are_read_like_utf8(tmp_path, encoding, layout):
    records = [_qa(i, answer="Ça va, très bien.") for i in range(4)]
    text = "\n".join(map(json.dumps, records)) if layout == "jsonl" else json.dumps(records, indent=1)
    plain, other = tmp_path / f"plain.{layout}", tmp_path / f"other.{layout}"
    plain.write_text(text, encoding="utf-8")
    other.write_bytes(text.encode(encoding))  # utf-16: with a BOM; -le / -be: without
    report = DataReport()
    assert read_samples(other, report=report) == read_samples(plain)
    assert report.ok == 0 and report.total == 0  # read_samples counts only rejections; none here
    assert check_data(other).to_dict() == {"total": 4, "ok": 4, "rejected": {}}


def test_json_array_followed_by_garbage_is_a_clear_error_naming_the_line(tmp_path, capsys):
    good = json.dumps([_qa(i) for i in range(30)], indent=2)
    path = tmp_path / "data.json"
    path.write_text(good + "\nthis line is not JSON\n")
    garbage_line = good.count("\n") + 2
    with pytest.raises(
        DataError, match=rf"data\.json:{garbage_line}: .*neither one JSON document nor JSON lines"
    ):
        read_samples(path)
    with pytest.raises(SystemExit) as err:  # the CLI prints the message, not a traceback
        main(["data", "check", str(path)])
    assert f"data.json:{garbage_line}" in str(err.value) and str(err.value).startswith("error:")


def test_a_file_that_is_neither_json_nor_jsonl_names_its_first_bad_line(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text("id,question,answer\n1,What?,That.\n")
    with pytest.raises(DataError, match=r"table\.jsonl:1: .*neither one JSON document nor JSON lines"):
        read_samples(path)
    broken = tmp_path / "broken.json"  # a JSON array with a syntax error in its 3rd record
    body = json.dumps([_qa(i) for i in range(4)], indent=2)
    cut = body.index('"g2"')
    broken.write_text(body[:cut] + body[cut:].replace('"id"', "id", 1))
    with pytest.raises(DataError, match=r"broken\.json:\d+: "):
        read_samples(broken)


def test_cli_check_without_max_length_flags_a_huge_first_turn(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    huge = _llava("huge", None, " ".join(["word"] * 40_000), "Fine.")
    path.write_text("\n".join(json.dumps(r) for r in [_qa(0), huge, _qa(1)]) + "\n")
    assert main(["data", "check", str(path), "--json", "--max-bad", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["rejected"] == {"too_long": 1}
    report = check_data(path)  # the library default too: data.max_length's default
    assert dict(report.rejected) == {"too_long": 1} and report.examples["too_long"] == "huge"
    assert f"max_length={DataConfig().max_length}" in report.messages["too_long"]
    assert check_data(path, max_length=0).ok == 3  # 0: no length check
