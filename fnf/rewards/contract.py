"""``check_head(head)``: the reward-head contract as one call, for a head author's own tests.

The trainer checks each output's types, shapes and ranges as it runs (``check_reward_output``); what it cannot
see in one call is checked here on a small random batch: the score reaches the pixels, the head is deterministic,
each image is scored on its own (a batch of 1 gives the same number as that image in a batch), and the heatmap
is there exactly when ``gives_heatmap`` says.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnf.rewards.base import RewardHead, RewardOutput, check_reward_output, head_label

PROMPTS = ["a red circle", "a blue square top left", "a green triangle", "two red squares"]


def check_head(head: RewardHead, images: Tensor | None = None, prompts: list[str] | None = None,
               tolerance: float = 1e-4) -> RewardOutput:
    """Raise ``ValueError`` naming the head and the rule it breaks; return its output on ``images`` (default: 4
    seeded random 32×32 images) and ``prompts`` (default: 4 shapes-world prompts). The head is frozen and put in
    eval mode, as the trainer does. ``tolerance``: how far a batch of 1 may differ from the batch (float kernels
    depend on the batch size)."""
    head = head.requires_grad_(False).eval()
    if images is None:
        images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[: len(images)] if prompts is None else prompts
    images = images.detach().clone().requires_grad_(True)
    who = f"reward head {head_label(head)}"
    first = check_reward_output(head, head(images, prompts), images, trained_on=True)
    if not torch.isfinite(first.score).all():
        raise ValueError(f"{who}: scores must be finite, got {first.score.tolist()}")
    weights = torch.arange(1.0, len(images) + 1, device=images.device)  # unequal: no batch-centred score cancels
    (gradient,) = torch.autograd.grad((first.score * weights).sum(), images)
    if not torch.isfinite(gradient).all() or not gradient.abs().sum() > 0:
        raise ValueError(f"{who}: the score's gradient with respect to the pixels is zero or not finite; training "
                         "follows that gradient")
    declared = {"yes": True, "no": False}.get(head.gives_heatmap)
    if declared is not None and declared != (first.heatmap is not None):
        raise ValueError(f"{who}: gives_heatmap = {head.gives_heatmap!r}, but forward returned "
                         f"{'no heatmap' if first.heatmap is None else 'a heatmap'}")
    # Later calls with gradients too, as the first: some kernels differ without them (attention's fast path).
    again = head(images, prompts)
    if not torch.equal(again.score, first.score) or (
            first.heatmap is not None and not torch.equal(again.heatmap, first.heatmap)):
        raise ValueError(f"{who}: two calls on the same images differ; a head must be deterministic in eval mode "
                         "(base and tuned images are compared through it)")
    for i in range(len(images)):
        alone = head(images[i:i + 1], prompts[i:i + 1]).score.detach()
        if not torch.allclose(alone, first.score[i:i + 1].detach(), rtol=tolerance, atol=tolerance):
            raise ValueError(f"{who}: image {i} scores {alone.item():.6g} alone but {first.score[i].item():.6g} in "
                             "a batch; score each image on its own (no batch statistics)")
    return first
