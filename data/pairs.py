"""Preference pairs for DPO (paper section 2.3) in the batch layout train.stages.DPOStage reads.

A pair shares one prompt (and clip) between the preferred response y+ and the rejected y-.
`PairSource` plans batches over *pairs* exactly as `ExampleSource` plans them over examples
(same sharding and determinism), and loads each pair as two consecutive rows: y+ then y-,
both with the pair's id.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batching import Batch, Example, ExampleSource, collate


@dataclass
class PreferencePair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]  # y+
    rejected_ids: list[int]  # y-
    features: torch.Tensor | None = None  # (frames, 80)
    instruction: str = ""
    transcript: str = ""

    def rows(self) -> list[Example]:
        """[y+ row, y- row], sharing the prompt, the clip and the pair id."""
        return [Example(self.id, self.prompt_ids, response, self.features, self.instruction, self.transcript)
                for response in (self.chosen_ids, self.rejected_ids)]


class PairSource(ExampleSource):
    """ExampleSource over pairs; a loaded batch of P pairs has 2P rows (y+, y-, y+, y-, ...)."""

    def load(self, plan: list[int]) -> Batch:
        rows = [row for i in plan for row in self.examples[i].rows()]
        batch = collate(rows, self.pad_token_id)
        return batch.to(self.device) if self.device is not None else batch

    def sample_ids(self, batch: Batch) -> list[str]:
        return batch.ids[0::2]
