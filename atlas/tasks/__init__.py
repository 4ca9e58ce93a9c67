"""Retrieval tasks: MQAR (Zoology) and passkey retrieval in natural-text haystacks.

    from atlas.tasks import MQAR, mqar_accuracy, Passkey, passkey_accuracy
    task = MQAR(seq_len=256, kv_pairs=16, num_examples=40_000)   # vocab 8192, Zoology's layout
    batches = task.batches(batch_size=64, seed=0)                 # rank / world_size shard it
    x, y = batches.next()            # int64 (64, 256); y = -100 except at the 16 queries
    batches.last_modes               # int8 (64, 256): 1 on the pairs, 2 on the queries
    mqar_accuracy(model, task)       # held-out examples, argmax == label on scored positions
    passkey_accuracy(model, tokenizer, length=1024)   # greedy, exact match, validation works
"""
from atlas.tasks.mqar import MQAR, mqar_accuracy
from atlas.tasks.passkey import Passkey, passkey_accuracy, passkey_eval
from atlas.tasks.stream import IGNORE, TaskBatches

__all__ = ["IGNORE", "MQAR", "Passkey", "TaskBatches", "mqar_accuracy", "passkey_accuracy", "passkey_eval"]
