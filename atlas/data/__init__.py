"""Data: the embedded Shakespeare corpus, tokenizers, token shards with provenance, batches.

    from atlas.data import build_embedded, Batches
    data = build_embedded("runs/x", vocab_size=8192)   # run_dir/data/{train,val}.bin
    batches = Batches(data, batch_size=8, seq_len=512, seed=0)
    x, y = batches.next()                                # int64 (8, 512) each
"""
from atlas.data.embedded import embedded_split, load_embedded_corpus
from atlas.data.loader import Batches, TokenData, build_embedded, val_batches
from atlas.data.shards import load_index, locate, prepare
from atlas.data.tokenizer import Tokenizer, train_bpe

__all__ = ["Batches", "TokenData", "Tokenizer", "build_embedded", "embedded_split",
           "load_embedded_corpus", "load_index", "locate", "prepare", "train_bpe", "val_batches"]
