"""STORE: one causal LLM for semantic tokenization and generative recommendation."""

__version__ = "0.1.0"
