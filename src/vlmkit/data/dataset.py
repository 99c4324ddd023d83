"""VLMDataset: samples validated up front (images opened, placeholders counted), bad ones skipped and reported.

Over 400 lines: validation up front (every bad-sample reason with its counting and reporting) is most of it;
the reasons are kept in one place so `data check` and training report the same ones.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import DataConfig
from vlmkit.data.formats import (
    DEFAULT_CAPTION_INSTRUCTIONS,
    DataError,
    Sample,
    SampleError,
    merge_image_turns,
    parse_record,
    read_records,
    select_tasks,
)
from vlmkit.data.images import ImageError
from vlmkit.data.processor import ImageProcessor, Processor
from vlmkit.data.prompts import EncodedSample
from vlmkit.data.samples import weight_tasks
from vlmkit.data.sources.shards import RawRecord, Shard, find_shards, is_sharded, read_shard
from vlmkit.log import get_logger

log = get_logger(__name__)

MALFORMED_JSON = "malformed_json"  # a JSONL line that is not valid JSON
REMOTE_IMAGE = "remote_image"  # an http(s) image ref: never downloaded
_WORDS = re.compile(r"\w+|[^\w\s]+")


def usable_record(index: int, item: dict[str, Any] | Exception) -> dict[str, Any]:
    """A record from `read_records`, or the `SampleError` that says why that record cannot be used (a line
    that is not JSON becomes `malformed_json` naming its line)."""
    if isinstance(item, SampleError):
        raise item
    if isinstance(item, Exception):
        raise SampleError(MALFORMED_JSON, f"not valid JSON ({item})", sample_id=f"line {index + 1}")
    return item


# ------------------------------------------------------------------------------------------------ report
class DataQualityError(DataError):
    """Too large a share of a data file was rejected (see `DataReport.check`)."""


@dataclass
class DataReport:
    """What a data pass kept and why it skipped the rest (`total == ok + sum(rejected.values())`)."""

    source: str = ""
    total: int = 0
    ok: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> id of the first sample skipped for it
    messages: dict[str, str] = field(default_factory=dict)  # reason -> that sample's error message

    def accept(self) -> None:
        self.total += 1
        self.ok += 1

    def reject(self, reason: str, sample_id: str, message: str = "") -> None:
        """Count a skipped sample; the first sample of each reason is logged (once per reason)."""
        self.total += 1
        self.rejected[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = sample_id
            self.messages[reason] = message
            where = f"{self.source}: " if self.source else ""
            text = message if message.startswith(reason) else f"{reason}: {message}" if message else reason
            log.warning(
                "%sskipping sample '%s': %s [later '%s' samples are counted, not logged]",
                where,
                sample_id,
                text,
                reason,
            )

    def check(self, max_bad: float) -> None:
        """Raise `DataQualityError` when more than `max_bad` of the samples were rejected."""
        if self.bad_fraction > max_bad:
            raise DataQualityError(
                f"{self.source or 'data'}: {self.bad_fraction:.1%} of samples rejected (max_bad {max_bad:.1%}); "
                f"{self.summary()}; examples: {self.examples}"
            )

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_rejected / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """{"total": N, "ok": N, "rejected": {reason: count}} (reasons by count, then name)."""
        rejected = dict(sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0])))
        return {"total": self.total, "ok": self.ok, "rejected": rejected}

    def table(self) -> Any:
        """A rich `Table` of the skip reasons: count, share of all samples, an example sample id."""
        from rich.table import Table

        table = Table(title=f"{self.source or 'data'}: {self.ok}/{self.total} samples ok")
        for name, justify in (
            ("reason", "left"),
            ("count", "right"),
            ("share", "right"),
            ("example id", "left"),
        ):
            table.add_column(name, justify=justify)
        for reason, count in self.to_dict()["rejected"].items():
            table.add_row(reason, str(count), f"{count / self.total:.1%}", self.examples.get(reason, ""))
        return table

    def summary(self) -> str:
        parts = ", ".join(f"{r}={n}" for r, n in self.to_dict()["rejected"].items())
        return f"{self.ok}/{self.total} samples ok" + (f"; skipped {parts}" if parts else "")


# ------------------------------------------------------------------------------------------------ images
def image_source(ref: str, image_root: str | Path | None = None) -> str | Path | bytes:
    """Where an image ref points: a path (relative refs joined to `image_root`) or the bytes of a `data:` URL.
    Remote (http/https) refs are never downloaded: `SampleError` (remote_image)."""
    if ref.startswith("data:"):
        _, sep, payload = ref.partition(",")
        if not sep:
            raise ImageError("corrupt", "data URL without ','", source=ref[:40])
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError("corrupt", f"bad base64 in data URL: {exc}", source=ref[:40]) from exc
    if ref.startswith(("http://", "https://")):
        raise SampleError(REMOTE_IMAGE, f"remote image {ref} is not downloaded; fetch it first")
    path = Path(ref)
    return path if path.is_absolute() or image_root is None else Path(image_root) / path


# ------------------------------------------------------------------------------------------------ reading
def read_samples(
    path: str | Path,
    fmt: str = "auto",
    *,
    report: DataReport | None = None,
    caption_instructions: Sequence[str] = DEFAULT_CAPTION_INSTRUCTIONS,
    seed: int = 0,
) -> list[Sample]:
    """Parse every record of a JSON/JSONL file; bad records are counted in `report` (never raised).

    Reasons: malformed_json (a JSONL line that is not JSON), bad_encoding (bytes that are not UTF-8; the sample
    id names the line), bad_schema, no_assistant_turn, image_count_mismatch. A file that is not records at all
    (neither one JSON document nor JSON lines) raises `DataError` naming its first bad line.
    """
    report = report if report is not None else DataReport(source=str(path))
    samples: list[Sample] = []
    for index, item in read_records(path):
        try:
            record = usable_record(index, item)
            samples.append(
                parse_record(record, fmt, index=index, caption_instructions=caption_instructions, seed=seed)
            )
        except SampleError as err:
            report.reject(err.reason, err.sample_id if err.sample_id is not None else str(index), str(err))
    return samples


def _check_images(
    sample: Sample, images: ImageProcessor, image_root: str | Path | None
) -> list[tuple[int, int]] | tuple[str, str]:
    """Open every image of `sample` within the limits: the (width, height) of each, or (reason, message) for
    the first bad one."""
    try:
        return [images.open(image_source(ref, image_root)).size for ref in sample.images]
    except (ImageError, SampleError) as err:
        return err.reason, str(err)


def _map(fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int) -> Iterable[Any]:
    """`map`, in order; threads when `num_workers` > 0 (image decoding releases the GIL)."""
    if num_workers <= 0 or len(items) < 2:
        return map(fn, items)
    pool = ThreadPoolExecutor(max_workers=num_workers)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------------------------ dataset
class VLMDataset(torch.utils.data.Dataset):
    """Encoded samples that passed validation; items are dicts ready for `Collator` / `PackingCollator`.

    Everything model-specific comes from `processor` (chat template, placeholder counts, image pixels), so the
    dataset needs no model and pickles into data-loader workers. Validation runs at construction, before any
    training: every sample is encoded (placeholders expanded, labels from role spans, `max_length` enforced)
    and every image is opened within the limits. Bad samples are skipped and counted in `report` by reason,
    each reason logged once with an example sample id. Relative image refs resolve against `image_root`.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        processor: Processor,
        *,
        image_root: str | Path | None = None,
        max_length: int | None = 512,
        report: DataReport | None = None,
        num_workers: int = 0,
    ) -> None:
        self.processor = processor
        self.image_root = image_root
        self.max_length = max_length
        self.report = report if report is not None else DataReport()
        # When set (by a frozen-tower `FeatureCache`): image ref -> cached tower features [tiles, N, Dv];
        # items then carry `vision_features` and no image is decoded.
        self.feature_source: Callable[[str], torch.Tensor] | None = None
        self.encoded: list[EncodedSample] = []
        # Images are checked in threads (decoding releases the GIL); the tokenizer runs in this thread only.
        check = partial(_check_images, images=self.images, image_root=image_root)
        for sample, sizes in zip(samples, _map(check, samples, num_workers)):
            result = sizes if isinstance(sizes, tuple) else self._encode(sample, sizes)
            if isinstance(result, EncodedSample):
                self.encoded.append(result)
                self.report.accept()
            else:
                self.report.reject(result[0], sample.id, result[1])
        log.info("%s%s", f"{self.report.source}: " if self.report.source else "", self.report.summary())

    @property
    def images(self) -> ImageProcessor:
        return self.processor.images

    def _encode(self, sample: Sample, sizes: list[tuple[int, int]]) -> EncodedSample | tuple[str, str]:
        """The encoded sample, or (reason, message) when it must be skipped."""
        try:
            return self.processor.encode_training(sample, max_length=self.max_length, sizes=sizes)
        except SampleError as err:
            return err.reason, str(err)

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        path: str | Path,
        processor: Processor,
        *,
        num_workers: int = 0,
        enforce_max_bad: bool = True,
        tasks: Sequence[str] | None = None,
        task_weights: dict[str, float] | None = None,
        merge_turns: bool = False,
    ) -> VLMDataset:
        """Read `path` (any supported format, or shards: read whole into memory) and encode it with
        `processor`. Relative image paths resolve against `cfg.image_root`, else the data file's directory.

        Raises `DataQualityError` when more than `cfg.max_bad` of the samples were rejected (unless
        `enforce_max_bad` is False); the rejections are logged first, one line per reason. `tasks` keeps only
        records whose `task` field is listed; `merge_turns` then joins the records of one image into one
        multi-turn conversation (`merge_image_turns`); `task_weights` repeats the encoded samples by task
        (`weight_tasks`).
        """
        report = DataReport(source=str(path))
        if is_sharded(str(path)):  # read whole: for validation splits (training streams them, see loader.py)
            shards = find_shards(str(path))
            read = partial(read_shard_samples, shards)
        else:
            read = partial(read_samples, path)
        samples = read(cfg.format, report=report, caption_instructions=cfg.caption_instructions)
        if tasks:  # keep only these task types (records' `task` field, e.g. ShapesWorld's); not a rejection
            samples = select_tasks(samples, tasks, path)
        if merge_turns:
            before = len(samples)
            samples = merge_image_turns(samples)
            log.info(
                "%s: %d samples merged into %d conversations (one per image)", path, before, len(samples)
            )
        dataset = cls(
            samples,
            processor,
            image_root=cfg.image_root if cfg.image_root is not None else Path(path).parent,
            max_length=cfg.max_length,
            report=report,
            num_workers=num_workers,
        )
        if enforce_max_bad:
            report.check(cfg.max_bad)
        if task_weights:  # after encoding: each record is encoded and counted in the report once
            dataset.encoded = weight_tasks(dataset.encoded, task_weights, path)
        return dataset

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def lengths(self) -> list[int]:
        """Token count of every item (for `LengthGroupedSampler` and packing)."""
        return [len(e.input_ids) for e in self.encoded]

    def image_source(self, ref: str) -> str | Path | bytes:
        return image_source(ref, self.image_root)

    def load_pixels(self, ref: str) -> torch.Tensor:
        """One image ref -> pixel tensors [tiles, 3, S, S]."""
        return self.images.tensors(self.images.open(self.image_source(ref)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        enc = self.encoded[index]
        if self.feature_source is not None:  # cached tower output, one [tiles, N, Dv] per image: no decoding
            return make_item(enc, [self.feature_source(ref) for ref in enc.images], "vision_features")
        return make_item(enc, self._pixels(enc))  # one [tiles, 3, S, S] per image

    def _pixels(self, enc: EncodedSample) -> list[torch.Tensor]:
        try:
            return [self.load_pixels(ref) for ref in enc.images]
        except (ImageError, SampleError) as err:  # validated at construction: the file changed since
            raise RuntimeError(f"sample '{enc.id}': an image changed after validation: {err}") from err


def make_item(
    enc: EncodedSample, pixels: Sequence[torch.Tensor], field_name: str = "pixel_values"
) -> dict[str, Any]:
    """An encoded sample + one tensor per kept image ([tiles, 3, S, S] pixels, or [tiles, N, Dv] cached
    features with `field_name="vision_features"`) -> the item `Collator` / `PackingCollator` take."""
    for ref, p, tiles in zip(enc.images, pixels, enc.num_tiles):
        if p.shape[0] != tiles:
            raise RuntimeError(
                f"sample '{enc.id}': image {ref} gave {p.shape[0]} tiles, {tiles} at validation"
            )
    item: dict[str, Any] = {
        "id": enc.id,
        "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),  # [T]
        "labels": torch.tensor(enc.labels, dtype=torch.long),  # [T]
        "pixel_values": None,
        "image_count": len(enc.images),
        "num_tiles": list(enc.num_tiles),
        "image_sizes": list(enc.image_sizes),  # (width, height) of each image
        "length": len(enc.input_ids),
    }
    # pixel_values [sum tiles, 3, S, S] | vision_features [sum tiles, N, Dv] | None
    item[field_name] = torch.cat(list(pixels)) if len(pixels) else None
    return item


# ------------------------------------------------------------------------------------------------ streaming
def parse_shard_record(
    raw: RawRecord, fmt: str = "auto", caption_instructions: Sequence[str] = DEFAULT_CAPTION_INSTRUCTIONS
) -> Sample:
    """A shard record -> `Sample` with `parse_record` (raises `SampleError` with a reason). A caption record's
    instruction is chosen by a stable number of the record (from its shard and key)."""
    if isinstance(raw.record, SampleError):
        raise raw.record
    index = zlib.crc32(raw.key.encode())
    return parse_record(raw.record, fmt, index=index, caption_instructions=caption_instructions)


@dataclass
class RecordEncoder:
    """One shard record -> a training item, checked as `VLMDataset` checks a sample (parsed, images opened
    within the limits, placeholders expanded, `max_length` enforced), each image decoded once.

    The streaming counterpart of `VLMDataset`: it holds only the processor and settings, so it pickles into
    data-loader workers. A record that cannot be used gives (reason, sample id, message) instead of an item.
    """

    processor: Processor
    fmt: str = "auto"
    image_root: str | Path | None = None
    max_length: int | None = 512
    caption_instructions: Sequence[str] = DEFAULT_CAPTION_INSTRUCTIONS

    def sample(self, raw: RawRecord) -> Sample:
        """The parsed record (raises `SampleError` with a reason)."""
        return parse_shard_record(raw, self.fmt, self.caption_instructions)

    def __call__(self, raw: RawRecord) -> dict[str, Any] | tuple[str, str, str]:
        try:
            sample = self.sample(raw)
        except SampleError as err:
            return err.reason, err.sample_id or raw.key, str(err)
        images = self.processor.images
        try:
            opened = {
                ref: images.open(shard_image_source(raw, ref, self.image_root, sample.images))
                for ref in dict.fromkeys(sample.images)
            }
            sizes = [opened[ref].size for ref in sample.images]
            enc = self.processor.encode_training(sample, max_length=self.max_length, sizes=sizes)
        except (ImageError, SampleError) as err:
            return err.reason, sample.id, str(err)
        return make_item(enc, [images.tensors(opened[ref]) for ref in enc.images])

    def length(self, raw: RawRecord) -> int:
        """Estimated tokens of a record, without a tokenizer or any image (for length grouping; 0 if bad)."""
        try:
            sample = self.sample(raw)
        except SampleError:
            return 0
        per_image = self.processor.tokens_per_image(1)
        return sum(estimate_tokens(m.text) + m.num_images * per_image for m in sample.messages)


def read_shard_samples(
    shards: Sequence[Shard],
    fmt: str = "auto",
    *,
    report: DataReport | None = None,
    caption_instructions: Sequence[str] = DEFAULT_CAPTION_INSTRUCTIONS,
) -> list[Sample]:
    """Every record of `shards` parsed into memory, embedded images as `data:` URLs (for validation splits,
    which are read whole); bad records are counted in `report` as `read_samples` counts them."""
    report = report if report is not None else DataReport()
    samples = []
    for shard in shards:
        for raw in read_shard(shard):
            try:
                sample = parse_shard_record(raw, fmt, caption_instructions)
                refs = {ref: _embedded(raw, ref, sample.images) for ref in dict.fromkeys(sample.images)}
            except SampleError as err:
                report.reject(err.reason, err.sample_id or raw.key, str(err))
                continue
            samples.append(dataclasses.replace(sample, images=[refs[ref] for ref in sample.images]))
    return samples


def _embedded(raw: RawRecord, ref: str, refs: list[str]) -> str:
    """An embedded image as a `data:` URL; a ref that names a file stays as it is."""
    data = raw.embedded(ref, refs)
    return ref if data is None else "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def shard_image_source(
    raw: RawRecord, ref: str, image_root: str | Path | None, refs: list[str] | None = None
) -> str | Path | bytes:
    """A shard record's image: its embedded bytes, else the ref resolved as a file (`image_source`)."""
    data = raw.embedded(ref, refs)
    return data if data is not None else image_source(ref, image_root)


# ------------------------------------------------------------------------------------------------ checking
def estimate_tokens(text: str) -> int:
    """Tokenizer-free length estimate: words and punctuation runs (roughly a lower bound for BPE tokenizers)."""
    return len(_WORDS.findall(text))


def _first_round_estimate(sample: Sample, tokens_per_image: int) -> int:
    """Estimated tokens of the first (user..., assistant...) round: the part `encode_sample` never drops."""
    n, seen_assistant = 0, False
    for m in sample.messages:
        if m.role == "user" and seen_assistant:
            break
        seen_assistant |= m.role == "assistant"
        n += estimate_tokens(m.text) + m.num_images * tokens_per_image
    return n


def check_data(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    fmt: str = "auto",
    max_length: int | None = None,
    tokens_per_image: int = 0,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    processor: Processor | None = None,
    data_cfg: DataConfig | None = None,
    num_workers: int = 0,
) -> DataReport:
    """Validate a data file and return its `DataReport`; never raises on bad records.

    Without `processor` no tokenizer is needed: records are parsed, image markers counted against images, every
    image opened within the limits, and the first round's length estimated with `estimate_tokens` +
    `tokens_per_image` per image and flagged `too_long` over `max_length`. With a model's `processor`, the exact
    training path is run (`VLMDataset.from_config`) with `data_cfg` (default `DataConfig()`); the arguments given
    here override it. `max_length` None is `data_cfg.max_length` (512 by default, a recipe's `data.max_length`),
    0 checks no length. Image limits default to `data_cfg`'s; relative image paths resolve against
    `image_root`, else the file's dir.
    """
    cfg = dataclasses.replace(data_cfg) if data_cfg is not None else DataConfig()
    cfg.format = fmt
    if image_root is not None:
        cfg.image_root = str(image_root)
    limits = {"max_image_pixels": max_pixels, "max_image_bytes": max_bytes}
    limits = {k: v for k, v in limits.items() if v is not None}
    if max_length is None:
        max_length = cfg.max_length
    if processor is not None:
        cfg.max_length = max_length or None  # type: ignore[assignment]  # None: no limit
        processor = processor.replace(**limits) if limits else processor
        return VLMDataset.from_config(
            cfg, path, processor, num_workers=num_workers, enforce_max_bad=False
        ).report

    report = DataReport(source=str(path))
    samples = read_samples(path, fmt, report=report)
    images = ImageProcessor(**{k.replace("max_image_", "max_"): v for k, v in limits.items()})
    root = cfg.image_root if cfg.image_root is not None else Path(path).parent

    def check(sample: Sample) -> tuple[str, str] | None:
        bad = _check_images(sample, images, root)
        if isinstance(bad, tuple):
            return bad
        if max_length:
            n = _first_round_estimate(sample, tokens_per_image)
            if n > max_length:
                return "too_long", f"~{n} tokens (estimated) > max_length={max_length}"
        return None

    for sample, result in zip(samples, _map(check, samples, num_workers)):
        if result is None:
            report.accept()
        else:
            report.reject(result[0], sample.id, result[1])
    log.info("%s: %s", report.source, report.summary())
    return report
