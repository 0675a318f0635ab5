"""ESFT (Expert-Specialized Fine-Tuning): score experts, select, train only the selected ones, convert checkpoints.

scoring -> selection -> expert_config (the JSON) -> overlay (training) -> method (the AdapterMethod) -> tensors
(the saved adapter) -> convert (reference-layout import, merged export); plot and cli on top.
"""
