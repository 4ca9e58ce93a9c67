"""The Atlas model: attention + memory blocks (block.py), the LM around them (lm.py)."""
from .block import GateMode
from .lm import AtlasLM

__all__ = ["AtlasLM", "GateMode"]
