"""moeserve: fine-tune Mixture-of-Experts adapters and serve many of them from one base model."""

__version__ = "0.1.0"
