"""Sharded training data: WebDataset tar shards and Parquet files found, counted and read one record at a time."""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.data.formats import SampleError

SHARD_SUFFIXES = {".tar": "wds", ".parquet": "parquet"}
INDEX_NAME = "shards.json"  # written by `vlmkit data shard`: every shard's path and record count
INDEX_FORMAT = "vlmkit-shards"
IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm"}
IMAGE_COLUMNS = ("image", "images")
JSON_COLUMNS = ("conversations", "messages")  # may hold a JSON string instead of a list
RECORD_COLUMN = "record"  # a JSON object with the record's other fields (as `vlmkit data shard` writes)


class ShardError(RuntimeError):
    """A shard that cannot be read or does not hold what its index says (names the file)."""


@dataclass(frozen=True)
class Shard:
    """One shard file: its path, kind (`wds` | `parquet`) and number of records."""

    path: str
    kind: str
    count: int

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class RawRecord:
    """One record as stored in a shard, before parsing: the record (or why it is not one), its embedded images
    and where it came from. `embedded(ref)` gives the bytes of the image a record's ref names."""

    key: str  # unique within the shard set: "<shard name>/<key or row>"
    record: dict[str, Any] | SampleError
    images: dict[str, bytes] = field(default_factory=dict)  # member ext (tar) or path/ref (parquet) -> bytes
    kind: str = "wds"

    def embedded(self, ref: str, refs: list[str] | None = None) -> bytes | None:
        """The bytes of the embedded image `ref` names (None: not embedded, a file to resolve as usual).
        `refs`: the record's image refs in order (the parsed sample's), to match numbered tar members."""
        data = self.images.get(ref)
        if data is None and self.kind == "wds":
            data = self._tar_member(ref, list(dict.fromkeys(refs if refs is not None else [ref])))
        return data

    def _tar_member(self, ref: str, refs: list[str]) -> bytes | None:
        """A tar sample's image member for `ref` (not named by it): the i-th distinct image ref of the record
        for members `0.png`, `1.jpg`, ... (as `vlmkit data shard` writes them), or the only image member when
        the record names one image (`KEY.json` + `KEY.jpg`, as other tools write LLaVA data)."""
        numbered = {ext.split(".", 1)[0]: data for ext, data in self.images.items() if "." in ext}
        if ref in refs and str(refs.index(ref)) in numbered:
            return numbered[str(refs.index(ref))]
        if len(self.images) == 1 and len(refs) == 1:
            return next(iter(self.images.values()))
        return None


# ------------------------------------------------------------------------------------------------ finding
def is_sharded(spec: str | None) -> bool:
    """Whether a `data.train` value names shards (a .tar/.parquet file, a glob or {a..b} range of them, a
    directory of them, or a `shards.json` index) rather than one JSON/JSONL file."""
    if not spec:
        return False
    path = Path(spec)
    return (
        path.is_dir() or path.name == INDEX_NAME or re.search(r"\.(tar|parquet)(?=$|[},])", spec) is not None
    )


def need(module: str) -> Any:
    """Import one of the optional shard libraries, or say how to install them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"sharded data needs the `{module.split('.')[0]}` package: pip install 'vlmkit[shards]'"
        ) from err


def _expand(spec: str) -> list[str]:
    """Brace ranges (`shard-{000..009}.tar`), then globs, in sorted order per pattern."""
    patterns = need("braceexpand").braceexpand(spec) if "{" in spec else [spec]
    out: list[str] = []
    for pattern in patterns:
        out += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    return out


def find_shards(spec: str) -> list[Shard]:
    """The shards `spec` names, in order, with their record counts (from `shards.json` where there is one,
    else counted: tar members grouped by key, Parquet row counts from the file footer)."""
    path = Path(spec)
    if path.is_dir() and (path / INDEX_NAME).is_file():
        path = path / INDEX_NAME
    if path.name == INDEX_NAME and path.is_file():
        return _read_index(path)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in SHARD_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{spec}: no shards (*.tar, *.parquet) in this directory")
    else:
        files = _expand(spec)
        if not files:
            raise FileNotFoundError(f"{spec}: no shard matches this pattern")
    shards = []
    for name in files:
        kind = SHARD_SUFFIXES.get(Path(name).suffix)
        if kind is None:
            raise ValueError(f"{name}: not a shard (expected *.tar or *.parquet)")
        if not Path(name).is_file():
            raise FileNotFoundError(f"{name}: no such shard")
        shards.append(Shard(name, kind, count_records(name, kind)))
    return shards


def _read_index(path: Path) -> list[Shard]:
    try:
        data = json.loads(path.read_text())
        entries = data["shards"]
        shards = [
            Shard(str(path.parent / e["path"]), SHARD_SUFFIXES[Path(e["path"]).suffix], int(e["count"]))
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: not a readable shard index ({type(err).__name__}: {err})") from err
    missing = [s.path for s in shards if not Path(s.path).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists shards that do not exist: {missing[:3]}")
    return shards


def write_index(out_dir: Path, shards: list[Shard], **info: Any) -> Path:
    """`OUT/shards.json`: the shards (paths relative to OUT) and their record counts."""
    path = out_dir / INDEX_NAME
    entries = [{"path": Path(s.path).name, "count": s.count} for s in shards]
    payload = {"format": INDEX_FORMAT, "version": 1, **info, "shards": entries}
    tmp = path.with_name(f".{INDEX_NAME}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def count_records(path: str, kind: str) -> int:
    """Records in one shard: Parquet rows (footer only), or tar samples (member headers only, no data read)."""
    try:
        if kind == "parquet":
            return int(need("pyarrow.parquet").ParquetFile(path).metadata.num_rows)
        base_plus_ext = need("webdataset.tariterators").base_plus_ext

        count, last = 0, None
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if member.isreg() and key is not None and not _is_meta(member.name) and key != last:
                    count, last = count + 1, key
        return count
    except (OSError, tarfile.TarError, ValueError) as err:
        raise ShardError(f"{path}: cannot count its records ({type(err).__name__}: {err})") from err


def _is_meta(name: str) -> bool:
    base = Path(name).name
    return base.startswith("__") and base.endswith("__")


# ------------------------------------------------------------------------------------------------ reading
def read_shard(shard: Shard, skip: int = 0) -> Iterator[RawRecord]:
    """The shard's records from the `skip`-th on (exactly `shard.count - skip` of them: a shard holding fewer
    raises `ShardError`; records past the count are not read)."""
    reader = _read_parquet if shard.kind == "parquet" else _read_tar
    n = skip
    try:
        for raw in reader(shard, skip):
            if n >= shard.count:
                return
            yield raw
            n += 1
    except (OSError, tarfile.TarError, ValueError) as err:
        raise ShardError(f"{shard.path}: unreadable after record {n} ({type(err).__name__}: {err})") from err
    if n < shard.count:
        raise ShardError(f"{shard.path}: {n} records, but its index says {shard.count}")


def _read_tar(shard: Shard, skip: int) -> Iterator[RawRecord]:
    """WebDataset samples (members grouped by key): `KEY.json` holds the record (`KEY.txt` alone: a caption),
    image members (`KEY.jpg`, `KEY.0.png`, ...) its images."""
    wds = need("webdataset.tariterators")
    with open(shard.path, "rb") as stream:
        files = wds.tar_file_expander([{"url": shard.path, "stream": stream}])
        for i, sample in enumerate(wds.group_by_keys(files)):
            if i < skip:
                continue
            yield _tar_record(shard, sample)


def _tar_record(shard: Shard, sample: dict[str, Any]) -> RawRecord:
    key = f"{shard.name}/{sample['__key__']}"
    images = {
        ext: data
        for ext, data in sample.items()
        if not ext.startswith("__") and ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
    }
    record: dict[str, Any] | SampleError
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            record = SampleError("malformed_json", f"{key}.json is not valid JSON ({err})", sample_id=key)
        else:
            if not isinstance(record, dict):
                record = SampleError("bad_schema", f"{key}.json is not a JSON object", sample_id=key)
    elif "txt" in sample and images:
        record = {"caption": sample["txt"].decode("utf-8", "replace"), "image": next(iter(images))}
    else:
        members = ", ".join(k for k in sample if not k.startswith("__"))
        record = SampleError(
            "bad_schema", f"no .json (or .txt + image) member, only: {members}", sample_id=key
        )
    if isinstance(record, dict):
        record.setdefault("id", sample["__key__"])
        if not any(k in record for k in ("image", "images", "messages")) and len(images) == 1:
            record["image"] = next(iter(images))  # KEY.json + KEY.jpg: the record's one image
    return RawRecord(key, record, images, "wds")


def _read_parquet(shard: Shard, skip: int) -> Iterator[RawRecord]:
    """Rows -> records: `image` / `images` columns hold bytes, {bytes, path} structs (as HF `datasets` writes)
    or paths; `conversations` / `messages` a list or its JSON text; a `record` column a JSON object of the
    record's other fields; every other column is a field."""
    pf = need("pyarrow.parquet").ParquetFile(shard.path)
    start = 0
    groups = []
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if start + rows > skip:
            groups.append(g)
        else:
            start += rows
    index = start
    for batch in pf.iter_batches(batch_size=64, row_groups=groups):
        for row in batch.to_pylist():
            if index >= skip:
                yield _parquet_record(shard, index, row)
            index += 1


def _parquet_record(shard: Shard, index: int, row: dict[str, Any]) -> RawRecord:
    key = f"{shard.name}/{index}"
    record: dict[str, Any] = {}
    images: dict[str, bytes] = {}
    try:
        text = row.pop(RECORD_COLUMN, None)
        if text is not None:
            extra = json.loads(text)
            if not isinstance(extra, dict):
                raise SampleError(
                    "bad_schema", f"column '{RECORD_COLUMN}' is not a JSON object", sample_id=key
                )
            record.update(extra)
        for name, value in row.items():
            if value is None:
                continue
            if name in IMAGE_COLUMNS:
                refs = [_image_entry(v, key, i, images) for i, v in enumerate(_as_list(value))]
                if text is None:  # with a `record` column, the record names its images itself
                    record.setdefault(name, refs if isinstance(value, list) else refs[0])
            elif name in JSON_COLUMNS and isinstance(value, str):
                record[name] = json.loads(value)
            else:
                record[name] = value
    except json.JSONDecodeError as err:
        return RawRecord(
            key, SampleError("malformed_json", f"not valid JSON ({err})", sample_id=key), {}, "parquet"
        )
    except SampleError as err:
        return RawRecord(key, err, {}, "parquet")
    record.setdefault("id", key)
    return RawRecord(key, record, images, "parquet")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _image_entry(value: Any, key: str, i: int, images: dict[str, bytes]) -> str:
    """One image cell -> its ref; embedded bytes go into `images` under that ref (its `path`, else `KEY#i`)."""
    if isinstance(value, bytes | bytearray):
        images[f"{key}#{i}"] = bytes(value)
        return f"{key}#{i}"
    if isinstance(value, dict):
        ref = value.get("path") or f"{key}#{i}"
        if value.get("bytes") is not None:
            images[ref] = bytes(value["bytes"])
        return ref
    if isinstance(value, str):
        return value
    raise SampleError(
        "bad_schema",
        f"an image cell must be bytes, {{bytes, path}} or a path, not {type(value).__name__}",
        sample_id=key,
    )
