"""The demo and what it needs, apart from the serving package: `moeserve demo`, `moeserve eval`, the task suites,
HTTP and offline evaluation, and the pretraining of the built-in base model (docs/base_model.md, docs/results.md)."""
