"""Tokenise documents into memory-mapped token files with a provenance table.

Output folder (written to a temp folder, then renamed: a failure leaves nothing):
  train.bin, val.bin      1-D token ids, uint16 if vocab_size <= 65536 else uint32;
                          every document is followed by tokenizer.eos_id
  train_lines.npy, ...    int64 (n, 2): (token offset, line) for every line start of
                          line-tracked documents (.txt inputs), so a sequence maps to its line
  tokenizer.json/.model   the tokenizer that made the ids
  index.json              dtype, token counts, sources, and per split a document table
                          {offset, length, source, line} (column lists, offsets in tokens)
Any token offset maps back to its source with locate(index, split, offset).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from atlas.data.sources import Doc, expand_inputs, read_docs, unit_of
from atlas.data.tokenizer import Tokenizer
from atlas.errors import UserError

FORMAT = "atlas-tokens/1"
SPLITS = ("train", "val")
_CHUNK = 8192  # chars per piece of a long text: pieces encode in parallel, ~2x faster than whole
# Cut long texts only at "\n" between two non-space characters: byte-level BPE
# pre-tokenisation splits there anyway, so chunked ids equal whole-text ids.
_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def prepare(inputs, out_dir, tokenizer: Tokenizer, text_field: str = "text",
            val_fraction: float = 0.01, overwrite: bool = False) -> Path:
    """Tokenise `inputs` (paths: .txt/.md, .jsonl, .parquet, save_to_disk folders) into out_dir.

    Validation holds out whole documents (chosen by a hash of source name + line, so the
    choice does not depend on input order or paths) until ~val_fraction of the tokens;
    when every document is larger than that (e.g. one big .txt), the last
    val_fraction of the token stream is held out instead. Returns out_dir.
    """
    files = expand_inputs(inputs)
    docs = (d for path, kind in files for d in read_docs(path, kind, text_field))
    return write_dataset(out_dir, tokenizer, docs, val_fraction=val_fraction, overwrite=overwrite,
                         meta={"text_field": text_field})


def write_dataset(out_dir, tokenizer: Tokenizer, docs, val_fraction: float = 0.01,
                  overwrite: bool = False, meta: dict | None = None,
                  tokenizer_file: str | None = None) -> Path:
    """Core writer for prepare() and the embedded corpus. `docs`: iterable of sources.Doc.

    tokenizer_file: where index.json says the tokenizer is, relative to out_dir; None
    saves a copy into out_dir.
    """
    out = Path(out_dir)
    if not 0.0 <= val_fraction <= 0.5:
        raise UserError(f"val_fraction={val_fraction} out of range (argument val_fraction); use 0 to 0.5")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {out} already exists; delete it, pick another, or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        index = _write(tmp, tokenizer, docs, val_fraction)
        if tokenizer_file is None:
            tokenizer_file = tokenizer.save(tmp).name
        index.update(tokenizer=tokenizer_file, tokenizer_sha256=tokenizer.sha256(), meta=meta or {})
        text = json.dumps(index, indent=1)
        # Number lists (the document tables) on one line each: readable and ~5x smaller.
        text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)
        (tmp / "index.json").write_text(text)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if out.exists():  # overwrite: move the old one aside first, so the swap is two renames
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _encode_tracked(tok: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """ids (int64, (n,)) and the token index where each line starts (int64, (lines,), -1 = none)."""
    cuts, i = [0], 0
    while tok.splits_at_newlines and i + _CHUNK < len(text):  # cuts that cannot change the ids
        m = _CUT.search(text, i + _CHUNK)
        if not m:
            break
        i = m.end()
        cuts.append(i)
    cuts.append(len(text))
    parts = tok.encode_with_offsets([text[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    ids = np.asarray([t for p_ids, _ in parts for t in p_ids], dtype=np.int64)
    starts = np.asarray([s + a for (_, p_st), a in zip(parts, cuts) for s in p_st], dtype=np.int64)
    starts = np.maximum.accumulate(starts) if len(starts) else starts
    line_chars = np.asarray([0] + [m.end() for m in re.finditer("\n", text)], dtype=np.int64)
    # The first token starting at or after a line's first character belongs to that line.
    first_tok = np.searchsorted(starts, line_chars, side="left")
    first_tok[first_tok >= len(ids)] = -1
    return ids, first_tok


def _write(tmp: Path, tok: Tokenizer, docs, val_fraction: float) -> dict:
    """Pass 1 streams all tokens to all.bin; pass 2 copies each split's ranges out of it."""
    dtype = token_dtype(tok.vocab_size)
    sources, src_idx = [], {}
    d_off, d_len, d_src, d_line, d_split = [], [], [], [], []
    marks: list[np.ndarray] = []  # (token offset, line) rows, global offsets, sorted
    total, pending = 0, []

    with open(tmp / "all.bin", "wb") as f:
        def emit(doc: Doc, ids: np.ndarray, first_tok=None):
            nonlocal total
            if doc.source not in src_idx:
                src_idx[doc.source] = len(sources)
                sources.append({"path": doc.source, "kind": doc.kind, "unit": unit_of(doc.kind)})
            ids = np.append(ids, tok.eos_id).astype(dtype)
            f.write(ids.tobytes())
            d_off.append(total); d_len.append(len(ids)); d_src.append(src_idx[doc.source])
            d_line.append(doc.line); d_split.append(doc.split)
            if first_tok is not None:
                keep = first_tok >= 0
                lines = np.flatnonzero(keep) + doc.line
                toks = first_tok[keep]
                last = np.r_[toks[1:] != toks[:-1], True]  # several empty lines -> one token: keep the last
                marks.append(np.stack([toks[last] + total, lines[last]], axis=1))
            total += len(ids)

        def flush():
            for doc, ids in zip(pending, tok.encode_batch([d.text for d in pending])):
                emit(doc, np.asarray(ids, dtype=np.int64))
            pending.clear()

        for doc in docs:
            if doc.tracked:
                flush()
                emit(doc, *_encode_tracked(tok, doc.text))
            else:
                pending.append(doc)  # short documents: encode in batches (parallel in HF)
                if len(pending) >= 512:
                    flush()
        flush()
    if total == 0:
        raise UserError("the inputs hold no text (every document is empty); pass files with text")

    d_off, d_len = np.asarray(d_off, np.int64), np.asarray(d_len, np.int64)
    marks_all = np.concatenate(marks) if marks else np.zeros((0, 2), np.int64)
    pieces, rule = _choose_val(d_off, d_len, d_split, sources, d_src, d_line, val_fraction, total)
    allm = np.memmap(tmp / "all.bin", dtype=dtype, mode="r", shape=(total,))
    index = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
             "eos_id": tok.eos_id, "total_tokens": int(total), "val_fraction": val_fraction,
             "val_rule": rule, "sources": sources, "splits": {}}
    tracked = {i for i, s in enumerate(sources) if s["kind"] in ("txt", "embedded")}
    for split in SPLITS:
        index["splits"][split] = _write_split(tmp, split, pieces[split], allm, dtype, d_off, d_src,
                                              d_line, marks_all, tracked)
    del allm
    os.unlink(tmp / "all.bin")
    return index


def _choose_val(d_off, d_len, d_split, sources, d_src, d_line, frac, total):
    """-> ({split: [(doc, start, end)] global token ranges}, rule name)."""
    n = len(d_off)
    whole = lambda docs: [(i, int(d_off[i]), int(d_off[i] + d_len[i])) for i in docs]
    if any(s is not None for s in d_split):  # caller decided (embedded corpus: by work)
        return {s: whole([i for i in range(n) if d_split[i] == s]) for s in SPLITS}, "fixed"
    if frac == 0:
        return {"train": whole(range(n)), "val": []}, "none"
    target = frac * total

    def key(i):  # name + line, not the full path: the same data anywhere gives the same split
        name = Path(sources[d_src[i]]["path"]).name
        return hashlib.blake2b(f"{name}:{d_line[i]}".encode(), digest_size=8).digest()

    val, got = set(), 0
    for i in sorted(range(n), key=key):
        if got >= target:
            break
        if got + d_len[i] <= 1.5 * target and len(val) < n - 1:
            val.add(i)
            got += int(d_len[i])
    if got >= 0.5 * target:  # else only a few tiny documents fitted: not a useful validation set
        return {"train": whole(i for i in range(n) if i not in val),
                "val": whole(i for i in range(n) if i in val)}, "documents"
    cut = total - max(1, int(round(target)))  # every document too big: hold out the stream's tail
    k = int(np.searchsorted(d_off, cut, side="right") - 1)
    train = whole(range(k)) + ([(k, int(d_off[k]), cut)] if cut > d_off[k] else [])
    val = [(k, cut, int(d_off[k] + d_len[k]))] + whole(range(k + 1, n))
    return {"train": train, "val": val}, "tail"


def _write_split(tmp, split, pieces, allm, dtype, d_off, d_src, d_line, marks, tracked) -> dict:
    n = sum(e - s for _, s, e in pieces)
    path = tmp / f"{split}.bin"
    if n == 0:
        path.write_bytes(b"")  # np.memmap cannot create an empty file
    else:
        mm = np.memmap(path, dtype=dtype, mode="w+", shape=(n,))
    table = {"offset": [], "length": [], "source": [], "line": []}
    lines, pos = [], 0
    for doc, s, e in pieces:
        if n:
            mm[pos:pos + e - s] = allm[s:e]
        line = int(d_line[doc])
        if d_src[doc] in tracked:
            a, b = np.searchsorted(marks[:, 0], [s, e], side="left")
            m = marks[a:b].copy()
            m[:, 0] += pos - s
            if len(m) == 0 or m[0, 0] != pos:  # piece starts mid-line (tail split)
                j = np.searchsorted(marks[:, 0], s, side="right") - 1
                line = int(marks[j, 1]) if j >= 0 and marks[j, 0] >= d_off[doc] else line
                m = np.concatenate([np.asarray([[pos, line]], np.int64), m])
            lines.append(m)
            line = int(m[0, 1])
        for k, v in zip(table, (pos, e - s, int(d_src[doc]), line)):
            table[k].append(v)
        pos += e - s
    if n:
        mm.flush()
        del mm
    lines_file = None
    if lines:
        lines_file = f"{split}_lines.npy"
        np.save(tmp / lines_file, np.concatenate(lines).astype(np.int64))
    return {"file": f"{split}.bin", "tokens": int(n), "documents": len(pieces),
            "lines_file": lines_file, "table": table}


def load_index(directory) -> dict:
    """Read directory/index.json (adds "_dir"); a missing or foreign file is a UserError."""
    d = Path(directory)
    p = d / "index.json"
    if not p.is_file():
        raise UserError(f"no prepared data in {d} (index.json missing); run prepare() / `atlas prepare` first")
    try:
        index = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is not valid JSON ({e}); prepare the data again")
    if index.get("format") != FORMAT:
        raise UserError(f"{p} has format {index.get('format')!r}, expected {FORMAT!r}; prepare the data again")
    index["_dir"] = str(d)
    return index


def locate(index, split: str, token_offset: int) -> dict:
    """Where token `token_offset` of `split` came from.

    index: a dict from load_index, a TokenData, or a prepared folder path.
    Returns {"source", "line", "unit", "document", "offset_in_document"}: `line` is the
    1-based line of a .txt/.jsonl/embedded source, or the 0-based row (unit "row",
    also under "row") of a Parquet / datasets source.
    """
    if not isinstance(index, dict):
        index = getattr(index, "index", None) or load_index(index)
    if split not in index["splits"]:
        raise UserError(f"unknown split {split!r} (argument split); use one of {', '.join(index['splits'])}")
    sp = index["splits"][split]
    if not 0 <= token_offset < sp["tokens"]:
        raise UserError(f"token offset {token_offset} outside {split} split of {sp['tokens']} tokens "
                        f"({index.get('_dir')}); pass 0 <= offset < {sp['tokens']}")
    t = sp["table"]
    doc = int(np.searchsorted(t["offset"], token_offset, side="right") - 1)
    src = index["sources"][t["source"][doc]]
    line = t["line"][doc]
    if sp.get("lines_file") and src["kind"] in ("txt", "embedded"):
        cache = index.setdefault("_lines", {})
        if split not in cache:
            cache[split] = np.load(Path(index["_dir"]) / sp["lines_file"], mmap_mode="r")
        m = cache[split]
        j = int(np.searchsorted(m[:, 0], token_offset, side="right") - 1)
        line = int(m[j, 1])
    out = {"source": src["path"], "line": int(line), "unit": src["unit"], "document": doc,
           "offset_in_document": int(token_offset - t["offset"][doc])}
    if src["unit"] == "row":
        out["row"] = int(line)
    return out
