"""The memory layer: `memory_scan` (the function), `MemoryState` (what it carries), `MemoryLayer`."""
from .scan import IMPLS, memory_scan
from .state import MemoryState

__all__ = ["memory_scan", "MemoryState", "IMPLS"]
