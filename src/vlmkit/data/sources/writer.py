"""`vlmkit data shard`: a JSON/JSONL data file -> WebDataset tar shards or Parquet files, images embedded."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.data.dataset import DataReport, image_source, usable_record
from vlmkit.data.formats import SampleError, parse_record, read_records
from vlmkit.data.images import ImageError
from vlmkit.data.sources.shards import IMAGE_EXTENSIONS, INDEX_NAME, Shard, need, write_index
from vlmkit.log import get_logger

log = get_logger(__name__)

SHARD_FORMATS = ("wds", "parquet")
_SUFFIX = {"wds": ".tar", "parquet": ".parquet"}


def _image_bytes(ref: str, image_root: str | Path | None) -> bytes:
    """The bytes of an image ref (a file, or a `data:` URL's payload), as they are: not decoded here, so a bad
    image stays in the shard and is counted where training reads it."""
    source = image_source(ref, image_root)
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if not path.is_file():
        raise ImageError("missing_file", "no such file", source=str(path))
    return path.read_bytes()


def _extension(ref: str, data: bytes) -> str:
    """A tar member extension for an image: the ref's own, else the decoded header's format, else `img`."""
    ext = Path(ref.split("?")[0]).suffix.lower().lstrip(".")
    if ext in IMAGE_EXTENSIONS and not ref.startswith("data:"):
        return ext
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except Exception:  # noqa: BLE001 - any undecodable bytes: stored as they are
        fmt = ""
    fmt = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
    return fmt if fmt in IMAGE_EXTENSIONS else "img"


class _TarShard:
    """One WebDataset shard: per record `KEY.json` (the record as given) and its images, `KEY.<ext>` for one,
    `KEY.0.<ext>`, `KEY.1.<ext>`, ... for several (in the order the record first names them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = need("webdataset").TarWriter(str(path), encoder=False, mtime=0.0)

    def add(self, key: str, record: dict[str, Any], images: Sequence[tuple[str, bytes]]) -> None:
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(record, ensure_ascii=False).encode()}
        for i, (ref, data) in enumerate(images):
            ext = _extension(ref, data)
            sample[ext if len(images) == 1 else f"{i}.{ext}"] = data
        self.writer.write(sample)

    def close(self) -> None:
        self.writer.close()


class _ParquetShard:
    """One Parquet file: `id`; `conversations` (LLaVA's list of {from, value}, where the record has it in that
    shape); `images`, a list of {bytes, path} (path: the record's ref); `record`, the other fields as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def add(self, key: str, record: dict[str, Any], images: Sequence[tuple[str, bytes]]) -> None:
        rest = dict(record)
        convs = rest.get("conversations")
        llava = isinstance(convs, list) and all(
            isinstance(t, dict)
            and set(t) == {"from", "value"}
            and all(isinstance(v, str) for v in t.values())
            for t in convs
        )
        self.rows.append(
            {
                "id": str(rest.pop("id", key)),
                "conversations": rest.pop("conversations") if llava else None,
                "images": [{"bytes": data, "path": ref} for ref, data in images],
                "record": json.dumps(rest, ensure_ascii=False),
            }
        )

    def close(self) -> None:
        pa, pq = need("pyarrow"), need("pyarrow.parquet")
        turn = pa.struct([("from", pa.string()), ("value", pa.string())])
        schema = pa.schema(
            [
                ("id", pa.string()),
                ("conversations", pa.list_(turn)),
                ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                ("record", pa.string()),
            ]
        )
        pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), str(self.path))


def write_shards(
    path: str | Path,
    out_dir: str | Path,
    *,
    image_root: str | Path | None = None,
    shard_size: int = 1000,
    kind: str = "wds",
    fmt: str = "auto",
) -> tuple[list[Shard], DataReport]:
    """Write the records of a data file into shards of `shard_size` records (`shard-000000.tar`, ... or
    `.parquet`) with every image's bytes embedded, plus `shards.json` (paths and record counts).

    Records that cannot be parsed, or name an image that cannot be read (missing file, remote URL), are left
    out and counted in the returned `DataReport`; image bytes are copied as they are (a corrupt image is
    written, and skipped with its reason when training reads it). Relative image refs resolve against
    `image_root`, else the data file's directory. `out_dir` must not hold shards already.
    """
    if kind not in SHARD_FORMATS:
        raise ValueError(f"unknown shard format '{kind}'; known: {', '.join(SHARD_FORMATS)}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, not {shard_size}")
    out = Path(out_dir)
    if out.is_dir() and any(p.suffix in (".tar", ".parquet") or p.name == INDEX_NAME for p in out.iterdir()):
        raise FileExistsError(f"{out} already holds shards; choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    root = image_root if image_root is not None else Path(path).parent
    report = DataReport(source=str(path))
    shards: list[Shard] = []
    current: _TarShard | _ParquetShard | None = None
    count = 0

    def finish() -> None:
        nonlocal current, count
        if current is None:
            return
        current.close()
        final = current.path.with_name(current.path.name.removeprefix("."))
        os.replace(current.path, final)  # written under a hidden name, then renamed: never half a shard
        shards.append(Shard(str(final), kind, count))
        current, count = None, 0

    for index, item in read_records(path):
        try:
            sample = parse_record(usable_record(index, item), fmt, index=index)
            images = [(ref, _image_bytes(ref, root)) for ref in dict.fromkeys(sample.images)]
        except (SampleError, ImageError) as err:
            sample_id = getattr(err, "sample_id", None) or (
                item.get("id") if isinstance(item, dict) else None
            )
            report.reject(err.reason, str(sample_id if sample_id is not None else index), str(err))
            continue
        if current is None:
            name = f".shard-{len(shards):06d}{_SUFFIX[kind]}"
            current = _TarShard(out / name) if kind == "wds" else _ParquetShard(out / name)
        record = dict(item)
        record.setdefault("id", sample.id)
        current.add(f"{report.total:09d}", record, images)
        report.accept()
        count += 1
        if count >= shard_size:
            finish()
    finish()
    write_index(out, shards, source=str(path), shard_format=kind)
    log.info("%s: %d records into %d shards in %s (%s)", path, report.ok, len(shards), out, report.summary())
    return shards, report
