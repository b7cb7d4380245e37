"""Stage 1, SFT (paper section 2.1): `python -m train.sft --config FILE [section.key=value ...]`.

Teacher-forced cross-entropy on (audio, instruction) -> reference summary; the data are manifests
with `instruction` and `summary` (data/synth.py makes them from transcripts).
"""
import sys

from .recipe import run_recipe
from .stages import SFTStage


def main(argv=None) -> int:
    return run_recipe("sft", lambda config, model, tokenizer: SFTStage(), task="sft", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
