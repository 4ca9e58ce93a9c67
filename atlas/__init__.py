"""Atlas: language models with a neural long-term memory in every layer."""
__version__ = "0.1.0"
