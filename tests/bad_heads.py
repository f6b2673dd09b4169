"""Reward heads that break the contract, for the bad-input matrix (imported by ``fnf fit`` by class_path)."""

from fnf.rewards.base import RewardHead, RewardOutput


class RaisesInInit(RewardHead):
    def __init__(self) -> None:
        super().__init__()
        raise RuntimeError("driver exploded")

    def forward(self, images, prompts):
        raise AssertionError("never constructed")


class ReturnsATensor(RewardHead):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class ScoreOnly(RewardHead):
    """A valid scalar head; used with ``mask: heatmap``, which needs a heatmap it does not give."""

    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(1, 2, 3)), heatmap=None)


class Detached(RewardHead):
    """A score the LoRA cannot learn from: detached from the images (as a head that scores under no_grad)."""

    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(1, 2, 3)).detach(), heatmap=None)
