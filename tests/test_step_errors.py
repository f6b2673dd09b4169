"""The FNF step refuses broken inputs with one line naming the culprit: reward heads (non-finite, wrong shape, no
gradient, raising), regularizers, module arguments; ``model.nonfinite: skip`` and its limit."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from fnf.errors import one_line
from fnf.module import RewardTerm
from fnf.nonfinite import MAX_SKIPPED_IN_A_ROW
from fnf.regularizers import Regularizer
from fnf.rewards import ColorRegion, RewardHead, RewardOutput
from ddp_probe import NaNAtStep1  # tests/ddp_probe.py
from test_module import _loader, _module, _trainer  # tests/test_module.py

class _NaNReward(RewardHead):
    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(1, 2, 3)) * float("nan"), heatmap=None)


class _WrongShape(RewardHead):
    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(2, 3)))


def test_non_finite_reward_stops_with_the_reward_named(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(_NaNReward(), mask="none")])
    with pytest.raises(FloatingPointError, match="_NaNReward"):
        _trainer(tmp_path, steps=1).fit(module, _loader(4))


def test_wrong_reward_shape_is_named(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(_WrongShape(), mask="none")])
    with pytest.raises(ValueError, match=r"_WrongShape: score must have shape \(4,\)"):
        _trainer(tmp_path, steps=1).fit(module, _loader(4))


class _Detached(RewardHead):
    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(1, 2, 3)).detach(), heatmap=None)


def test_a_score_without_gradient_is_refused_unless_its_weight_is_zero(tiny_model_dir):
    """A detached score would leave the LoRA untrained without a word; with weight 0 (a head for masks only) the
    loss does not backpropagate through it."""
    batch = next(iter(_loader(4)))
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(_Detached(), mask="none")])
    with pytest.raises(ValueError, match="reward head _Detached: score has no gradient with respect to the images"):
        module._common_step(batch, "train")
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(ColorRegion()), RewardTerm(_Detached(), weight=0.0,
                                                                                             mask="none")])
    assert module._common_step(batch, "train")["loss"].requires_grad


class _ConstantLeaf(RewardHead):
    def forward(self, images, prompts):
        return RewardOutput(score=torch.zeros(images.shape[0], requires_grad=True))  # requires grad, not from pixels


class _Raises(RewardHead):
    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(1, 2, 3))[[5]])  # an indexing bug


@pytest.mark.parametrize("head, mask, message", [
    (_ConstantLeaf(), "none", "reward head _ConstantLeaf: score has no gradient with respect to the images"),
    (_Detached(), "saliency", "reward head _Detached: mask: saliency needs a score differentiable with respect to "
                              "the images; give the head a heatmap, or mask: none"),
    (_Raises(), "none", "reward head _Raises: IndexError: index 5 is out of bounds"),
])
def test_a_head_s_errors_name_the_head(tiny_model_dir, head, mask, message):
    """Whatever goes wrong in or with a head, its one line names it (an error raised inside carries the name)."""
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(head, mask=mask)])
    with pytest.raises(Exception) as error:
        module._common_step(next(iter(_loader(4))), "train")
    assert one_line(error.value).startswith(message), one_line(error.value)


@pytest.mark.parametrize("head, message", [(_Raises(), "reward head second: IndexError: index 5 is out of bounds"),
                                           (_WrongShape(), "reward head second: score must have shape (4,)")])
def test_a_head_renamed_in_the_config_is_called_by_that_name(tiny_model_dir, head, message):
    """model.rewards[i].name: two heads of one class are told apart in error lines as in logs."""
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(ColorRegion()),
                                                       RewardTerm(head, mask="none", name="second")])
    with pytest.raises(Exception) as error:
        module._common_step(next(iter(_loader(4))), "train")
    assert one_line(error.value).startswith(message), one_line(error.value)


class _ScoreOnly(RewardHead):
    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("head, mask, message", [
    (_Detached(), "saliency", "reward head second: mask: saliency needs a score differentiable with respect to the "
                              "images"),
    (_ScoreOnly(), "heatmap", "reward head second returns no heatmap; set its mask to saliency or none"),
], ids=["saliency", "heatmap"])
def test_a_renamed_head_s_mask_errors_use_its_name(tiny_model_dir, head, mask, message):
    """The mask's own errors (no gradient for saliency, no heatmap) tell two heads of one class apart as well."""
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(ColorRegion()),
                                                       RewardTerm(head, mask=mask, name="second")])
    with pytest.raises(ValueError) as error:
        module._common_step(next(iter(_loader(4))), "train")
    assert one_line(error.value).startswith(message), one_line(error.value)


def test_heatmap_mask_requires_a_heatmap(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(_WrongShape(), mask="heatmap")])
    with pytest.raises(ValueError, match="_WrongShape"):
        _trainer(tmp_path, steps=1).fit(module, _loader(4))


@pytest.mark.parametrize("bad, key", [(dict(lam=-1.0), "model.lam"), (dict(rewards=[]), "model.rewards")])
def test_bad_module_args_name_the_key(tiny_model_dir, bad, key):
    with pytest.raises(ValueError, match=key):
        _module(tiny_model_dir, **{"lam": 1.0, **bad})


@pytest.mark.parametrize("weight, lam, term_lam, message", [
    (math.inf, 1.0, None, r"model.rewards\[0\].weight must be a finite number >= 0 .* got inf"),
    (math.nan, 1.0, None, r"model.rewards\[0\].weight must be a finite number >= 0 .* got nan"),
    (-1.0, 1.0, None, r"model.rewards\[0\].weight must be a finite number >= 0"),
    (1.0, math.inf, None, r"model.lam must be a finite number >= 0, got inf"),
    (1.0, 1.0, math.nan, r"model.rewards\[0\].lam must be a finite number >= 0 or null, got nan")])
def test_weights_and_lambdas_must_be_finite_and_non_negative(weight, lam, term_lam, message):
    """An infinite weight would reach the first step as a non-finite loss, after the model has loaded."""
    from fnf.objective import check_objective

    with pytest.raises(ValueError, match=f"^{message}"):
        check_objective([RewardTerm(ColorRegion(), weight=weight, lam=term_lam)], lam, "per_head")


def test_non_finite_loss_can_skip_the_batch(tiny_model_dir):
    module = _module(tiny_model_dir, lam=1.0, nonfinite="skip",
                     rewards=[RewardTerm(ColorRegion(), mask="heatmap"), RewardTerm(_NaNReward(), mask="none")])
    n = 4  # the base pass is fine (masks, active flags, base scores); only the tuned reward is NaN
    module._localise = lambda images, prompts: (torch.zeros(n, 2, 16, 16), torch.ones(n, 2), torch.zeros(n, 2))
    with pytest.warns(UserWarning, match="skipping batch at step 0: non-finite reward _NaNReward"):
        skipped = module._common_step(next(iter(_loader(4))), "train")
    assert skipped.keys() == {"loss"} and skipped["loss"].item() == 0 and skipped["loss"].requires_grad
    assert module._drop_update  # its gradients never reach the optimizer
    with pytest.warns(UserWarning, match="skipping batch"):
        assert module._common_step(next(iter(_loader(4))), "val") is None  # no outputs for the metrics
    module._skipped_in_a_row = MAX_SKIPPED_IN_A_ROW - 2  # as after that many skipped batches
    with pytest.warns(UserWarning, match="skipping batch"):
        module._common_step(next(iter(_loader(4))), "train")
    with pytest.raises(FloatingPointError, match=f"in {MAX_SKIPPED_IN_A_ROW} batches in a row at step 0: the run "
                                                 "has diverged or a reward head is broken"):
        module._common_step(next(iter(_loader(4))), "train")
    healthy = _module(tiny_model_dir, lam=1.0, nonfinite="skip")
    healthy._skipped_in_a_row = MAX_SKIPPED_IN_A_ROW - 1
    assert healthy._common_step(next(iter(_loader(4))), "train") is not None and healthy._skipped_in_a_row == 0


def test_a_skipped_step_leaves_the_lora_and_adams_state_as_they_were(tiny_model_dir, tmp_path):
    """Two steps, the second skipped, end where one step ends: no update from Adam's moments or weight decay (a
    zero gradient would still move both), and Adam's step count stays at 1."""
    def fit(steps: int, head: ColorRegion) -> tuple[dict, dict]:
        module = _module(tiny_model_dir, lam=1.0, nonfinite="skip", rewards=[RewardTerm(head)],
                         optimizer=partial(torch.optim.AdamW, lr=3e-2, weight_decay=0.1))
        trainer = _trainer(tmp_path, steps=steps)
        trainer.fit(module, _loader(8))
        lora = {k: v.clone() for k, v in module.state_dict().items() if "lora_" in k}
        return lora, trainer.optimizers[0].state_dict()["state"]

    one_step, one_state = fit(1, ColorRegion())
    with pytest.warns(UserWarning, match="skipping batch at step 1: non-finite reward NaNAtStep1"):
        skipped, skipped_state = fit(2, NaNAtStep1())
    assert one_step.keys() == skipped.keys()
    for name in one_step:
        assert torch.equal(skipped[name], one_step[name]), name
    assert {float(s["step"]) for s in skipped_state.values()} == {1.0} == {float(s["step"]) for s in one_state.values()}


def test_a_non_finite_reward_on_the_base_image_is_fatal_even_when_skipping(tiny_model_dir):
    """A reward that fails on I0 fails on every step of that prompt: skipping would hide a broken head."""
    module = _module(tiny_model_dir, lam=1.0, nonfinite="skip", rewards=[RewardTerm(_NaNReward(), mask="none")])
    with pytest.raises(FloatingPointError, match="non-finite reward _NaNReward on the base image"):
        module._common_step(next(iter(_loader(4))), "train")


class _Penalty(Regularizer):
    """A regularizer returning ``value`` per image (``per_image``) or as one number."""

    def __init__(self, value: float, per_image: bool = True, first_only: bool = False) -> None:
        super().__init__()
        self.value, self.per_image, self.first_only = value, per_image, first_only

    def forward(self, tuned, base, keep):
        penalty = (tuned.images - base.images).abs().sum((1, 2, 3)) * 0 + self.value
        if self.first_only:  # the value on the first image, 1 on the others
            penalty = torch.cat([penalty[:1], torch.ones_like(penalty[1:])])
        return penalty if self.per_image else penalty.mean()


class _PenaltyThatRaises(_Penalty):
    def forward(self, tuned, base, keep):
        raise TypeError("boom")


@pytest.mark.parametrize("regularizer, error, message", [
    (_Penalty(1.0, per_image=False), ValueError, r"regularizer _Penalty: forward must return one penalty per image, "
                                                 r"shape \(4,\), got \(\)"),
    (_Penalty(-1.0), ValueError, "regularizer _Penalty: penalty must be >= 0 on every image, got -1 at step 0"),
    (_Penalty(-1.0, first_only=True), ValueError, "regularizer _Penalty: penalty must be >= 0 on every image, got -1 "
                                                  "at step 0"),  # a batch mean of 0.5 would hide it
    (_Penalty(float("nan")), FloatingPointError, r"non-finite fidelity term \(_Penalty\) at step 0"),
    (_PenaltyThatRaises(1.0), TypeError, "boom"),  # raised inside: its one line names it (below)
])
def test_a_broken_regularizer_is_named(tiny_model_dir, regularizer, error, message):
    module = _module(tiny_model_dir, lam=1.0, regularizer=regularizer)
    with pytest.raises(error, match=message) as raised:
        module._common_step(next(iter(_loader(4))), "train")
    assert "_Penalty" in one_line(raised.value)
