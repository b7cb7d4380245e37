"""Training: one DDP loop shared by the SFT, on-policy KD and DPO stage recipes.

Each stage runs as `python -m train.<stage> --config configs/...toml` (or under torchrun).
This is the only package that wires model, rollout, losses and data together.
"""
