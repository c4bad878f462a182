"""Model loading: local HF folders, the packaged SmolLM2 GGUF, tiny random models for tests."""

from rollmill.models.load import ModelLoadError, load_model, load_tokenizer
from rollmill.models.tiny import build_char_tokenizer, build_tiny_model

__all__ = ["ModelLoadError", "build_char_tokenizer", "build_tiny_model", "load_model", "load_tokenizer"]
