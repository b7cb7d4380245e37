"""An SFT stage that counts its loss calls (micro-batches), for tests of where a run starts and stops."""
from train.stages import SFTStage


class CountingSFT(SFTStage):
    """SFT that counts its loss calls: 0 means no step began; grad_accum per optimizer step trained."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        return super().loss(model, batch)
