"""One tokenizer interface over HF `tokenizers` (byte-level BPE) and SentencePiece.

Ids are plain Python ints in [0, vocab_size). `eos_id` is the document separator the
shard writer appends after every document, so a model trained on the shards learns
where documents end. SentencePiece is optional and imported only when a `.model`
file is loaded.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from atlas.errors import UserError

EOS = "<|endoftext|>"
# Names other tokenizers give their end-of-document token, tried in this order.
_EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


class Tokenizer:
    """Wraps `tokenizers.Tokenizer` (kind "hf") or `sentencepiece.SentencePieceProcessor` ("spm")."""

    def __init__(self, backend, kind: str, source: str | None = None):
        self._tok, self.kind, self.source = backend, kind, source
        if kind == "hf":
            eos = next((backend.token_to_id(t) for t in _EOS_CANDIDATES
                        if backend.token_to_id(t) is not None), None)
            size = backend.get_vocab_size(with_added_tokens=True)
        else:
            eos = backend.eos_id() if backend.eos_id() >= 0 else None
            size = backend.get_piece_size()
        if eos is None:
            raise UserError(f"tokenizer {source or '(in memory)'} has no end-of-text token "
                            f"(looked for {', '.join(_EOS_CANDIDATES)}); add one or train with train_bpe()")
        self._eos, self._size = int(eos), int(size)

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added (the caller appends eos_id between documents)."""
        if self.kind == "hf":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, out_type=int)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """For each text: (ids, char_start of each token), to map tokens back to source lines.

        HF encodes the list in parallel on all cores.
        """
        if self.kind == "hf":
            encs = self._tok.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, [s for s, _ in e.offsets]) for e in encs]
        return [self._spm_offsets(t) for t in texts]

    def _spm_offsets(self, text: str) -> tuple[list[int], list[int]]:
        # sentencepiece >= 0.2.1: character offsets directly.
        try:
            r = self._tok.encode(text, return_type="offset_mapping")
            return list(r["ids"]), _skip_space(text, r["offsets"])
        except (TypeError, ValueError, KeyError):
            pass
        try:  # 0.1.99 - 0.2.0: UTF-8 byte offsets, converted to characters below
            pieces = self._tok.encode_as_immutable_proto(text).pieces
        except (AttributeError, TypeError, ValueError):
            # Oldest versions: encode line by line; every token starts where its line
            # starts, which is all line provenance needs (ids may differ slightly).
            ids, starts, pos = [], [], 0
            for line in text.splitlines(keepends=True):
                got = self._tok.encode(line, out_type=int)
                ids += got
                starts += [pos] * len(got)
                pos += len(line)
            return ids, starts
        ids, spans = [p.id for p in pieces], [(p.begin, p.end) for p in pieces]
        data = text.encode("utf-8")
        if len(data) != len(text):  # not ASCII: UTF-8 byte offsets -> character offsets
            char_of_byte, c = [0] * (len(data) + 1), 0
            for i, b in enumerate(data):
                char_of_byte[i] = c
                c += (b & 0xC0) != 0x80  # a lead byte starts a new character
            char_of_byte[len(data)] = len(text)
            spans = [(char_of_byte[a], char_of_byte[b]) for a, b in spans]
        return ids, _skip_space(text, spans)

    @property
    def splits_at_newlines(self) -> bool:
        """True when ids never cross a "\\n" between two non-space characters (GPT-2 style
        byte-level pre-tokenisation), so long texts may be encoded in pieces cut there."""
        if self.kind != "hf":
            return False
        from tokenizers import pre_tokenizers
        pre = self._tok.pre_tokenizer
        return isinstance(pre, pre_tokenizers.ByteLevel) and bool(pre.use_regex)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many short documents at once (HF runs these on all cores)."""
        if self.kind == "hf":
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return self._tok.encode(texts, out_type=int)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text; decode(encode(s)) == s for byte-level BPE (SentencePiece may normalise)."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._tok.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if not self._tok.is_control(i)]
        return self._tok.decode(ids)

    # --- facts ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """True number of ids (every id < vocab_size); may be less than what training asked for."""
        return self._size

    @property
    def eos_id(self) -> int:
        return self._eos

    def sha256(self) -> str:
        """Digest of the serialised tokenizer: datasets record it to detect a swapped tokenizer."""
        if self.kind == "hf":
            return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()
        return hashlib.sha256(self._tok.serialized_model_proto()).hexdigest()

    # --- files ----------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write dir/tokenizer.json (HF) or dir/tokenizer.model (SentencePiece); return the path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.kind == "hf":
            path, data = d / "tokenizer.json", self._tok.to_str(pretty=True).encode("utf-8")
        else:
            path, data = d / "tokenizer.model", self._tok.serialized_model_proto()
        _atomic_write(path, data)
        return path

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load tokenizer.json, a SentencePiece .model, or a folder holding either."""
        p = Path(path)
        if p.is_dir():
            found = [p / n for n in ("tokenizer.json", "tokenizer.model") if (p / n).is_file()]
            if not found:
                raise UserError(f"no tokenizer.json or tokenizer.model in {p}; pass the tokenizer file itself")
            p = found[0]
        if not p.is_file():
            raise UserError(f"tokenizer file not found: {p}; check the path")
        if p.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer
            try:
                tok = HFTokenizer.from_file(str(p))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise UserError(f"{p} is not a valid HF tokenizer.json ({str(e).splitlines()[0][:120]}); "
                                f"re-save it with tokenizers or train one with train_bpe()")
            return cls(tok, "hf", str(p))
        if p.suffix == ".model":
            try:
                import sentencepiece as spm
            except ImportError:
                raise UserError(f"{p} is a SentencePiece model but sentencepiece is not installed; "
                                f"run `pip install sentencepiece`")
            sp = spm.SentencePieceProcessor()
            try:
                sp.Load(str(p))
            except Exception as e:
                raise UserError(f"{p} is not a valid SentencePiece model ({str(e).splitlines()[0][:120]}); "
                                f"pass the .model file the tokenizer was trained into")
            return cls(sp, "spm", str(p))
        raise UserError(f"unsupported tokenizer file {p}; pass a tokenizer.json or a SentencePiece .model")

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _skip_space(text: str, spans) -> list[int]:
    """Token start, moved past leading whitespace inside the token: SentencePiece folds a
    newline into the next word's "▁", and that word belongs to the line after the newline."""
    out = []
    for a, b in spans:
        while a < b - 1 and text[a].isspace():
            a += 1
        out.append(a)
    return out


def check_bpe_vocab(vocab_size) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise UserError(f"vocab_size={vocab_size!r} is too small for byte-level BPE (argument vocab_size); "
                        f"use at least 257 (256 bytes + end-of-text)")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) with "<|endoftext|>" as id 0.

    Deterministic: the same texts and vocab_size give the same tokenizer.json. If the
    texts cannot support vocab_size merges (every word already one token), training
    stops early and `vocab_size` reports the smaller true size.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab(vocab_size)
    tok = HFTokenizer(models.BPE())
    # No normaliser and add_prefix_space=False keep decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, "hf")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a tokenizer is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

