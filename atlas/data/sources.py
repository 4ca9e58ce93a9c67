"""Read user text inputs into documents, refusing bad input with one-line UserErrors.

Every document carries where it came from (source path + line or row) so each token
written to a shard can be traced back (see shards.locate). Supported inputs:
  .txt/.text/.md   one document per file; provenance per line (1-based)
  .jsonl           one document per line, the `text_field` string; provenance = line (1-based)
  .parquet         one document per row (needs pyarrow); provenance = row (0-based)
  a folder saved by datasets' save_to_disk (needs `datasets`); provenance = split + row
  any other folder: its supported files, recursively, in sorted order
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from atlas.errors import UserError

TEXT_EXT = {".txt", ".text", ".md"}
EXTS = TEXT_EXT | {".jsonl", ".parquet"}
_HF_MARKERS = ("dataset_dict.json", "state.json")  # files save_to_disk writes


@dataclass
class Doc:
    text: str
    source: str            # resolved path ("dir[split]" for a HF dataset split)
    kind: str              # "txt" | "jsonl" | "parquet" | "hf" | "embedded"
    line: int              # first line (1-based) or row (0-based) of the document
    tracked: bool = False  # True: record a token offset for every line of the text
    split: str | None = None  # forced split ("train"/"val"); None: decided by the writer


def unit_of(kind: str) -> str:
    return "row" if kind in ("parquet", "hf") else "line"


def expand_inputs(inputs) -> list[tuple[Path, str]]:
    """[(path, kind)] for every input, checked before any tokenising so errors come fast."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input not found: {p}; check the path")
        if p.is_dir():
            if any((p / m).is_file() for m in _HF_MARKERS):
                out.append((p, "hf"))
                continue
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTS)
            if not files:
                raise UserError(f"folder {p} holds no {'/'.join(sorted(EXTS))} files; "
                                f"pass text files or a folder saved with datasets' save_to_disk")
            out += [(f, _kind(f)) for f in files]
        else:
            out.append((p, _kind(p)))
    if not out:
        raise UserError("no inputs given (argument inputs); pass at least one .txt/.jsonl/.parquet file")
    return out


def _kind(p: Path) -> str:
    ext = p.suffix.lower()
    if ext in TEXT_EXT:
        return "txt"
    if ext in (".jsonl", ".parquet"):
        return ext[1:]
    raise UserError(f"unsupported input type '{ext or p.name}': {p}; "
                    f"use .txt, .md, .jsonl, .parquet or a datasets save_to_disk folder")


def _read_text_file(p: Path) -> str:
    """Bytes -> str with the checks every text format shares: empty, binary, UTF-8."""
    data = p.read_bytes()
    if not data.strip():
        raise UserError(f"empty input file: {p}; remove it from the inputs or add text")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{p} looks binary (NUL byte at byte offset {nul}); pass UTF-8 text files only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{p}: invalid UTF-8 at byte offset {e.start} (line {line}); "
                        f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    return text[1:] if text.startswith("\ufeff") else text  # drop a BOM, keep line numbers


def read_docs(path: Path, kind: str, text_field: str = "text") -> Iterator[Doc]:
    """Yield the documents of one input. Empty documents are skipped (they carry no tokens)."""
    src = str(path.resolve())
    if kind == "txt":
        yield Doc(_read_text_file(path), src, kind, 1, tracked=True)
    elif kind == "jsonl":
        yield from _read_jsonl(path, src, text_field)
    elif kind == "parquet":
        yield from _read_parquet(path, src, text_field)
    elif kind == "hf":
        yield from _read_hf(path, text_field)
    else:
        raise AssertionError(kind)


def _read_jsonl(path: Path, src: str, field: str) -> Iterator[Doc]:
    n = 0
    for i, line in enumerate(_read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno}); "
                            f"fix that line: each line must be one JSON object")
        if not isinstance(rec, dict) or field not in rec:
            keys = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"{path}:{i}: no '{field}' field (found: {keys}); "
                            f"pass text_field= the key that holds the text")
        if not isinstance(rec[field], str):
            raise UserError(f"{path}:{i}: field '{field}' is {type(rec[field]).__name__}, not a string; "
                            f"store the document text as a JSON string")
        n += 1
        if rec[field]:
            yield Doc(rec[field], src, "jsonl", i)
    if n == 0:
        raise UserError(f"empty input file: {path} has no JSON records; remove it from the inputs")


def _check_column(path, names, field) -> None:
    if field not in names:
        raise UserError(f"{path}: no column '{field}' (columns: {', '.join(names[:12])}); "
                        f"pass text_field= the column that holds the text")


def _read_parquet(path: Path, src: str, field: str) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is Parquet but pyarrow is not installed; run `pip install pyarrow`")
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:100]}); "
                        f"check the file or convert it to .jsonl")
    _check_column(path, pf.schema_arrow.names, field)
    if pf.metadata.num_rows == 0:
        raise UserError(f"empty input file: {path} has no rows; remove it from the inputs")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}: row {row} column '{field}' is {type(text).__name__}, "
                                f"not a string; pass text_field= a string column")
            if text:
                yield Doc(text, src, "parquet", row)
            row += 1


def _read_hf(path: Path, field: str) -> Iterator[Doc]:
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise UserError(f"{path} is a datasets save_to_disk folder but `datasets` is not installed; "
                        f"run `pip install datasets`")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path} could not be loaded with datasets.load_from_disk "
                        f"({str(e).splitlines()[0][:100]}); check that folder")
    splits = {"train": ds} if isinstance(ds, Dataset) else dict(ds)
    total = 0
    for name in sorted(splits):
        part = splits[name]
        _check_column(path, list(part.column_names), field)
        src = f"{path.resolve()}[{name}]"
        total += len(part)
        for row, text in enumerate(part[field] if len(part) < 100_000 else _iter_col(part, field)):
            if text:
                yield Doc(text, src, "hf", row)
    if total == 0:
        raise UserError(f"empty input: dataset {path} has no rows; remove it from the inputs")


def _iter_col(part, field):
    for start in range(0, len(part), 10_000):  # bounded memory on big datasets
        yield from part[start:start + 10_000][field]
