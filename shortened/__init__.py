"""shortened: depth pruning of causal LMs (Shortened LLaMA, Kim et al. 2024), exported for GPU serving."""

__version__ = "0.1.0"
