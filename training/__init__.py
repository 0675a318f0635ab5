"""Training of adapters on transformers models and Trainer (installed as `moeserve.training`)."""
