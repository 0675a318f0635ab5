"""moeserve: fine-tune Mixture-of-Experts adapters and serve many of them from one base model."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import moeserve` (e.g. for the CLI's --help) does not pay for torch and transformers.
    if name in ("LLM", "SamplingParams"):
        from moeserve import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'moeserve' has no attribute {name!r}")
