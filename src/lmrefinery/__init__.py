"""lmrefinery: refine a fine-tuned LLM's data mixture (ScaleBiO + LISA) and trustworthiness (FIRST)."""

__version__ = "0.1.0"
