"""Small models that ship with the package: the offline demo and the shared test models."""

from .tiny_llama import TinyLlama, TinyLlamaConfig

__all__ = ["TinyLlama", "TinyLlamaConfig"]
