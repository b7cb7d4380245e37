"""Stage 3, DPO (paper section 2.3): `python -m train.dpo --config FILE [section.key=value ...]`.

Data: pairs files written by eval/preferences.py (two student samples per input, judged in both
orders, ties dropped). The reference is the starting checkpoint (the KD result, its LoRA merged)
= the model with this stage's adapters disabled; its log-probs are computed once per pair.

beta: the paper does not state it; 0.1 (the DPO paper's and TRL's default) is the default here,
a middle value that keeps the policy near the KD model while the margin grows.
"""
import sys

from .recipe import run_recipe
from .stages import DPOStage


def main(argv=None) -> int:
    return run_recipe("dpo", lambda config, model, tokenizer: DPOStage(model, config.dpo.beta, config.dpo.label_smoothing),
                      task="pairs", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
