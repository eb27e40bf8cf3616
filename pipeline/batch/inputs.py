"""Where the batch job's records come from: planning shards and reading them.

A *shard* is the unit of work, of retry and of ``--resume``: a byte range of
a JSONL file, a run of row groups of a Parquet file, or a list of media files.
Shards are planned on the driver from file metadata only (sizes, Parquet
footers, directory listings), so planning never reads the records; each
decode task then reads one shard and streams its records, so no process ever
holds the whole input.

Shard keys hash the file's path, size and modification time and the range,
so a rerun over unchanged inputs plans the same keys (what ``--resume`` looks
up) and a changed file is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.config import Limits

Kind = Literal["jsonl", "parquet", "media"]
InputFormat = Literal["auto", "jsonl", "parquet", "media"]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
MEDIA_SUFFIXES: dict[str, str] = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".dcm"), "image"),
    **dict.fromkeys((".wav", ".flac", ".ogg", ".mp3"), "audio"),
    **dict.fromkeys((".mp4", ".webm", ".mkv", ".avi", ".mov"), "video"),
    ".txt": "text",
}


class InputError(ValueError):
    """The input cannot be planned (missing, empty, unknown format, bad filesystem options)."""


@dataclass(frozen=True)
class Shard:
    """One unit of work.  ``start``/``end``: byte range (jsonl) or row-group
    range (parquet); ``files``: media groups (media), JSON-encoded so the
    shard travels as one flat Arrow row."""

    key: str
    kind: Kind
    path: str
    start: int = 0
    end: int = 0
    files: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


def open_filesystem(uri: str, options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI (``s3://``, ``gs://``,
    ``hdfs://``, ``file://``).  ``options`` go to the scheme's pyarrow
    filesystem class (region, endpoint_override, credentials from the
    environment by default); without options pyarrow infers them."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower() if "://" in uri else ""
    if scheme in ("", "file"):
        local = parsed.path if scheme == "file" else uri
        return pafs.LocalFileSystem(), str(PurePosixPath(local)) if local.startswith("/") else _abspath(local)
    try:
        if options:
            cls = {"s3": pafs.S3FileSystem, "gs": pafs.GcsFileSystem, "gcs": pafs.GcsFileSystem,
                   "hdfs": pafs.HadoopFileSystem}.get(scheme)
            if cls is None:
                raise InputError(f"batch.filesystem options given, but scheme {scheme!r} takes none here")
            return cls(**options), f"{parsed.netloc}{parsed.path}"
        return pafs.FileSystem.from_uri(uri)
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / TypeError for bad URIs or options
        raise InputError(f"cannot open the input filesystem for scheme {scheme!r}: {exc}") from None


def _abspath(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:20]


def _visible(path: str, root: str) -> bool:
    """Hidden and underscore-prefixed names (``_SUCCESS``, ``.tmp``) are not inputs."""
    rel = PurePosixPath(path).relative_to(root) if path != root else PurePosixPath(PurePosixPath(path).name)
    return not any(part.startswith((".", "_")) for part in rel.parts)


def _suffix(path: str) -> str:
    return PurePosixPath(path).suffix.lower()


def list_files(fs: pafs.FileSystem, path: str) -> tuple[list[pafs.FileInfo], bool]:
    """The input's files, sorted, and whether ``path`` is a directory."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {path}")
    if info.type == pafs.FileType.File:
        return [info], False
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File and _visible(i.path, path)),
                   key=lambda i: i.path)
    return files, True


def plan_shards(
    fs: pafs.FileSystem, path: str, *, fmt: InputFormat = "auto", shard_bytes: int = 4 * 2**20,
    shard_rows: int = 256,
) -> list[Shard]:
    """All shards of the input, in a stable order."""
    files, is_dir = list_files(fs, path)
    if not files:
        raise InputError(f"input {path} holds no files")
    if fmt == "auto":
        manifests = [f for f in files if _suffix(f.path) in JSONL_SUFFIXES + PARQUET_SUFFIXES]
        if is_dir and not manifests:
            fmt = "media"
        else:
            files = manifests if is_dir else files
    shards: list[Shard] = []
    if fmt == "media":
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for f in files:
            modality = MEDIA_SUFFIXES.get(_suffix(f.path))
            if modality is None:
                continue
            p = PurePosixPath(f.path)
            entry = groups.setdefault((str(p.parent), p.stem), {})
            entry[modality] = f.path
            entry[f"{modality}_size"] = str(f.size)
        if not groups:
            raise InputError(f"input {path} holds no media files ({', '.join(sorted(MEDIA_SUFFIXES))})")
        ordered = [groups[k] for k in sorted(groups)]
        for i in range(0, len(ordered), shard_rows):
            chunk = ordered[i : i + shard_rows]
            blob = json.dumps(chunk, sort_keys=True)
            shards.append(Shard(key=_key("media", path, blob), kind="media", path=path, files=blob))
        return shards
    for f in files:
        kind: Kind = "parquet" if (fmt == "parquet" or (fmt == "auto" and _suffix(f.path) in PARQUET_SUFFIXES)) \
            else "jsonl"
        stamp = (f.size, f.mtime_ns)
        if kind == "jsonl":
            size = f.size or 0
            starts = range(0, max(size, 1), shard_bytes)
            for s in starts:
                e = min(s + shard_bytes, size)
                shards.append(Shard(key=_key("jsonl", f.path, *stamp, s, e), kind="jsonl", path=f.path, start=s, end=e))
        else:
            import pyarrow.parquet as pq

            try:
                with fs.open_input_file(f.path) as fh:
                    meta = pq.ParquetFile(fh).metadata
            except Exception as exc:  # not Parquet at all: nothing can be read from it
                raise InputError(f"{f.path} is not a readable Parquet file ({type(exc).__name__})") from None
            rg, n = 0, meta.num_row_groups
            if n == 0:
                shards.append(Shard(key=_key("parquet", f.path, *stamp, 0, 0), kind="parquet", path=f.path))
            while rg < n:
                first, rows = rg, 0
                while rg < n and (rows == 0 or rows + meta.row_group(rg).num_rows <= shard_rows):
                    rows += meta.row_group(rg).num_rows
                    rg += 1
                shards.append(Shard(key=_key("parquet", f.path, *stamp, first, rg), kind="parquet", path=f.path,
                                    start=first, end=rg))
    return shards


# -- reading one shard (inside a decode task) -------------------------------------------------------
def read_shard(fs: pafs.FileSystem, shard: Shard, workload: str, limits: Limits) -> Iterator[tuple[int, Any]]:
    """``(position, raw record)`` for every record of the shard.

    Positions locate a record in its file for the errors dataset: the byte
    offset of a JSONL line, the row number in a Parquet file, the group index
    in a media folder.  Raw records are what ``Predictor.prepare`` takes:
    line bytes (so bad JSON becomes a ``bad_json`` error row, not a crash),
    or dicts."""
    if shard.kind == "jsonl":
        yield from _read_jsonl(fs, shard)
    elif shard.kind == "parquet":
        yield from _read_parquet(fs, shard)
    else:
        yield from _read_media(fs, shard, workload, limits)


def _read_jsonl(fs: pafs.FileSystem, shard: Shard, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Lines that *start* inside ``[start, end)`` (a line crossing ``end``
    belongs to this shard; one crossing ``start`` to the previous one), the
    usual split rule, so every line is read by exactly one shard."""
    if shard.end <= shard.start:
        return
    with fs.open_input_file(shard.path) as fh:
        pos = shard.start
        if pos > 0:
            # Skip to the first line that starts at or after ``start``: the
            # byte before ``start`` tells whether one starts exactly there.
            fh.seek(pos - 1)
            pos -= 1
            buf = b""
            while True:
                block = fh.read(chunk)
                if not block:
                    return
                nl = block.find(b"\n")
                if nl >= 0:
                    pos += nl + 1
                    buf = block[nl + 1 :]
                    break
                pos += len(block)
        else:
            buf = b""
        while pos < shard.end:
            nl = buf.find(b"\n")
            while nl < 0:
                block = fh.read(chunk)
                if not block:
                    break
                buf += block
                nl = buf.find(b"\n")
            line = buf if nl < 0 else buf[:nl]
            if line.strip():
                yield pos, line.rstrip(b"\r")
            if nl < 0:
                return
            pos += nl + 1
            buf = buf[nl + 1 :]


_RECORD_COLUMNS = ("id", "workload", "text", "image", "audio", "video", "tabular", "metadata")


def _read_parquet(fs: pafs.FileSystem, shard: Shard, batch_rows: int = 64) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    if shard.end <= shard.start:
        return
    with fs.open_input_file(shard.path) as fh:
        pf = pq.ParquetFile(fh)
        row = sum(pf.metadata.row_group(i).num_rows for i in range(shard.start))
        names = set(pf.schema_arrow.names)
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(range(shard.start, shard.end))):
            for rec in batch.to_pylist():
                yield row, _manifest_row(rec, names)
                row += 1


def _manifest_row(rec: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """A Parquet row as a record dict: nulls dropped, ``tabular`` and
    ``metadata`` given as JSON text or as a struct/map column.  Unknown
    columns are kept so the record is refused (``bad_record``) by the same
    validation every path uses, rather than silently ignored."""
    out: dict[str, Any] = {}
    for key, value in rec.items():
        if value is None:
            continue
        if key in ("tabular", "metadata"):
            if isinstance(value, str):
                with contextlib.suppress(ValueError):  # left as text: validation rejects it, reason-coded
                    value = json.loads(value)
            elif isinstance(value, list):  # a map column reads as [(key, value), ...]
                value = dict(value)
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if v is not None}
        out[key] = value
    return out


def _read_media(
    fs: pafs.FileSystem, shard: Shard, workload: str, limits: Limits
) -> Iterator[tuple[int, dict[str, Any]]]:
    """One record per group of files sharing a stem (``a.png`` + ``a.txt`` +
    ``a.wav``); the id is the stem's path relative to the input folder.  At
    most ``limit + 1`` bytes of a file are read, so an oversize file is
    refused by the usual size check without being loaded whole."""
    from pipeline.records import MEDIA_FIELDS

    groups = json.loads(shard.files)
    root = PurePosixPath(shard.path)
    for i, group in enumerate(groups):
        first = PurePosixPath(next(v for k, v in group.items() if not k.endswith("_size")))
        try:
            rid = str(first.relative_to(root).with_suffix(""))
        except ValueError:
            rid = first.stem
        rec: dict[str, Any] = {"id": rid, "workload": workload}
        for field in (*MEDIA_FIELDS, "text"):
            p = group.get(field)
            if p is None:
                continue
            cap = limits.max_text_chars * 4 + 1 if field == "text" else getattr(limits, f"max_{field}_bytes") + 1
            with fs.open_input_file(p) as fh:
                data = fh.read(cap)
            rec[field] = data.decode("utf-8", errors="replace") if field == "text" else data
        yield i, rec
