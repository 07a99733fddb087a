"""Model layer: loading any HF causal LM (hub id, local directory or built-in alias) and finding its decoder blocks."""

from lmrefinery.models.layers import find_decoder_layers
from lmrefinery.models.loading import load_model, load_tokenizer, resolve_model_path

__all__ = ["find_decoder_layers", "load_model", "load_tokenizer", "resolve_model_path"]
