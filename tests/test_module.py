"""The FNF step end to end on a tiny model: rewards rise, λ > 0 keeps pixels outside the mask (broken inputs:
test_step_errors.py)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fnf.data import collate
from fnf.masks import MaskArgs, heatmap_to_mask
from fnf.module import BaseReference, FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs
from fnf.rewards import ColorRegion
from fnf.sampling import Sample, SamplerArgs

PROMPTS = ["a red circle top left", "a blue square bottom right", "a green circle top right", "a red square"]
BOX = (0.0, 0.0, 0.5, 0.5)  # top-left quarter of the image must turn red


def _loader(n_items: int = 8, batch_size: int = 4) -> DataLoader:
    items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(n_items)]
    return DataLoader(items, batch_size=batch_size, collate_fn=collate)


def _module(model_dir: str, lam: float, **kwargs) -> FocusNFix:
    torch.manual_seed(0)
    defaults = dict(
        rewards=[RewardTerm(ColorRegion(color=(1.0, 0.0, 0.0), box=BOX), mask="heatmap")],
        pretrained=model_dir, lam=lam, sampler=SamplerArgs(num_steps=4, k=2, guidance_scale=2.0),
        lora=LoraArgs(rank=4), optimizer=partial(torch.optim.AdamW, lr=3e-2, weight_decay=0.0),
    )
    return FocusNFix(**{**defaults, **kwargs})


def _trainer(tmp_path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def _changes(module: FocusNFix) -> tuple[float, float, float]:
    """(reward gain, mean |I − I0| outside the box, inside the box) on the training prompts."""
    outputs = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(module, _loader())
    base = torch.cat([o["base"] for o in outputs])
    tuned = torch.cat([o["tuned"] for o in outputs])
    head = module.heads[0]
    gain = (head(tuned, [""] * len(tuned)).score - head(base, [""] * len(base)).score).mean().item()
    inside = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    inside[..., :8, :8] = True
    difference = (tuned - base).abs().mean(1, keepdim=True)
    return gain, difference[~inside.expand_as(difference)].mean().item(), difference[inside.expand_as(difference)].mean().item()


def test_focus_n_fix_raises_the_reward_and_preserves_outside_the_mask(tiny_model_dir, tmp_path):
    results = {}
    for lam in (0.0, 0.1):
        module = _module(tiny_model_dir, lam, masks=MaskArgs(threshold=0.01, dilation=0))
        _trainer(tmp_path, steps=30).fit(module, _loader())
        results[lam] = _changes(module)
    (gain_drft, outside_drft, _), (gain_fnf, outside_fnf, inside_fnf) = results[0.0], results[0.1]
    assert gain_drft > 0.01 and gain_fnf > 0.005, results
    assert outside_fnf < 0.5 * outside_drft, results
    assert inside_fnf > outside_fnf, results


def test_lora_starts_at_identity_and_only_lora_trains(tiny_model_dir):
    module = _module(tiny_model_dir, lam=1.0)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    gain, outside, inside = _changes(module)
    assert gain == 0 and outside == 0 and inside == 0


def test_base_cache_gives_the_same_step_as_recomputing(tiny_model_dir):
    """Keyed by (prompt, seed): the same prompt with two seeds (data.seeds_per_prompt) is two base images."""
    batch = next(iter(_loader(4)))
    batch["prompt"][1] = batch["prompt"][0]
    fresh = _module(tiny_model_dir, lam=1.0)
    cached = _module(tiny_model_dir, lam=1.0, base_cache="memory")
    cached._common_step(batch, "val")  # fills the cache
    assert len(cached._cache) == 4
    cached.sampler.with_base = None  # a second base pass would fail: the step must come from the cache
    with torch.no_grad():
        expected = fresh._common_step(batch, "val")
        got = cached._common_step(batch, "val")
    torch.testing.assert_close(got["loss"], expected["loss"])
    torch.testing.assert_close(got["base"], expected["base"])
    assert not torch.allclose(got["base"][0], got["base"][1])


@pytest.mark.parametrize("policy, expected_active", [("keep", 1.0), ("skip", 0.0), ("global", 1.0)])
def test_empty_mask_policy(tiny_model_dir, policy, expected_active):
    """An empty mask of a localising head follows the policy; a mask: none head has no mask to be empty."""
    module = _module(tiny_model_dir, lam=1.0, masks=MaskArgs(threshold=1.0, empty=policy),  # nothing reaches 1.0
                     rewards=[RewardTerm(ColorRegion(color=(1.0, 0.0, 0.0), box=BOX)),
                              RewardTerm(ColorRegion(), mask="none", name="whole")])
    images = torch.rand(2, 3, 16, 16) * 0.5
    masks, active, _ = module._localise(images, ["a", "b"])
    assert torch.equal(active, torch.tensor([[expected_active, 1.0]] * 2))
    assert masks[:, 0].min() == masks[:, 0].max() == (1.0 if policy == "global" else 0.0)
    assert masks[:, 1].abs().max() == 0


@pytest.mark.parametrize("mask_mode", ["union", "per_head"])
def test_global_frees_the_whole_image_only_where_the_mask_mode_found_nothing(tiny_model_dir, mask_mode):
    """Each head wants its half white. Image 0: the left head finds its black half, the right head nothing; image 1:
    neither finds anything. In union mode image 0 keeps the left half as its one region to change (a head that found
    nothing must not turn the union into the whole image: plain DRaFT for an image with a found defect); per head,
    each empty head's mask is the whole image."""
    left, right = (ColorRegion(color=(1.0, 1.0, 1.0), box=box) for box in ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)))
    module = _module(tiny_model_dir, lam=1.0, mask_mode=mask_mode, masks=MaskArgs(threshold=0.5, dilation=0,
                                                                                  empty="global"),
                     rewards=[RewardTerm(left, name="left"), RewardTerm(right, name="right")])
    images = torch.ones(2, 3, 16, 16)
    images[0, :, :, :8] = 0  # image 0: its left half is black
    masks, _, _ = module._localise(images, ["a", "b"])
    union = masks.amax(1)
    assert union[0, :, :8].min() == 1 and (union[0, :, 8:].max() == 1) == (mask_mode == "per_head")
    assert union[1].min() == 1  # nothing found anywhere: the whole image may change in both modes
    if mask_mode == "per_head":
        assert masks[0, 1].min() == 1 and masks[0, 0, :, 8:].max() == 0


@pytest.mark.parametrize("policy", ["keep", "skip"])
def test_an_empty_mask_under_skip_takes_its_heads_reward_out_of_the_loss(tiny_model_dir, policy):
    """Threshold 1.0: ColorRegion's heatmap never reaches it, so every mask is empty. skip: the head's reward no
    longer counts for those images (λ = 0: the loss is the reward term alone); keep: it does."""
    module = _module(tiny_model_dir, lam=0.0, masks=MaskArgs(threshold=1.0, empty=policy))
    with torch.no_grad():
        out = module._common_step(next(iter(_loader(4))), "val")
    assert out["mask"].abs().max() == 0 and out["scores"].abs().min() > 0  # the premise: empty masks, real rewards
    expected = torch.zeros(()) if policy == "skip" else -out["scores"][:, 0].mean()
    torch.testing.assert_close(out["loss"], expected)


def test_checkpoint_holds_only_lora_weights(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, lam=1.0)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(module, _loader(4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state)
    restored = _module(tiny_model_dir, lam=1.0)
    restored.load_state_dict(state, strict=False)
    for (name, p), (_, q) in zip(module.model.unet.named_parameters(), restored.model.unet.named_parameters()):
        assert torch.equal(p, q), name


def test_each_rank_resumes_its_own_random_stream(tiny_model_dir, tmp_path):
    """A checkpoint holds every rank's RNG states (rank 0 writes it); loading restores the loading rank's own, so
    DRaFT-LV noise continues per rank (each rank draws it on its own device) as in a run that never stopped."""
    module = _module(tiny_model_dir, lam=1.0)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(module, _loader(4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(checkpoint["rng_states_per_rank"][0]["torch"], torch.get_rng_state())  # 1 process: its own
    rank_states = [torch.manual_seed(seed).get_state() for seed in (10, 11)]
    checkpoint["rng_states_per_rank"] = [{"torch": state} for state in rank_states]
    restored = _module(tiny_model_dir, lam=1.0)
    restored._trainer = SimpleNamespace(global_rank=1, world_size=2)
    restored.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.get_rng_state(), rank_states[1])
    torch.manual_seed(0)
    restored._trainer = SimpleNamespace(global_rank=2, world_size=3)  # evaluation on 3 processes: nothing to restore
    restored.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())


def _halves(heads: int) -> torch.Tensor:
    """Masks (1, heads, 4, 4): head 0 may change the left half, head 1 the right half, any further head nothing."""
    masks = torch.zeros(1, heads, 4, 4)
    masks[:, 0, :, :2] = 1
    masks[:, 1, :, 2:] = 1
    return masks


def _reference(masks: torch.Tensor) -> BaseReference:
    images, heads = masks.shape[:2]
    return BaseReference(torch.zeros(images, 4, 2, 2), torch.zeros(images, 3, 4, 4), masks,
                         torch.ones(images, heads), torch.zeros(images, heads))


def test_per_head_mode_sums_each_heads_lambda_times_its_own_penalty(tiny_model_dir):
    """The first of two images changes in its left half only: head 0's mask allows it, head 1's does not, a mask:
    none head has no term; the second image is unchanged. The penalty is each head's λ times its term's mean over
    the images (as in union mode)."""
    left, right = ColorRegion(box=(0.0, 0.0, 1.0, 0.5)), ColorRegion(box=(0.0, 0.5, 1.0, 1.0))
    module = _module(tiny_model_dir, lam=1.0, mask_mode="per_head", rewards=[
        RewardTerm(left, lam=2.0, name="left"), RewardTerm(right, lam=3.0, name="right"),
        RewardTerm(ColorRegion(), mask="none")])
    tuned = torch.zeros(2, 3, 4, 4)
    tuned[0, :, :, :2] = 1
    reference = _reference(_halves(3).repeat(2, 1, 1, 1))
    fidelity, penalty = module._fidelity(Sample(torch.zeros(2, 4, 2, 2), tuned), reference)
    half = (3 * 4 * 2) ** 0.5  # ‖ones over a 3×4×2 half‖_F
    assert penalty.item() == pytest.approx(3.0 * half / 2)  # head 1's λ times the mean change outside its mask
    torch.testing.assert_close(fidelity, torch.tensor([[0.0, 0.0], [half, 0.0]]))  # per masked head and image


def test_union_mode_keeps_only_what_no_heads_mask_covers(tiny_model_dir):
    """Two images: the first changes everywhere, the second not at all; the penalty is λ times the mean over them."""
    module = _module(tiny_model_dir, lam=0.5, rewards=[RewardTerm(ColorRegion()), RewardTerm(ColorRegion(), name="b")])
    tuned = torch.ones(2, 3, 4, 4)
    tuned[1] = 0
    first_changed = Sample(torch.zeros(2, 4, 2, 2), tuned)
    fidelity, penalty = module._fidelity(first_changed, _reference(_halves(2).repeat(2, 1, 1, 1)))
    assert fidelity.abs().sum().item() == penalty.item() == 0  # the two halves together cover the image
    only_left = _halves(2)
    only_left[:, 1] = 0
    fidelity, penalty = module._fidelity(first_changed, _reference(only_left.repeat(2, 1, 1, 1)))
    half = (3 * 4 * 2) ** 0.5  # ‖ones over a 3×4×2 half‖_F
    torch.testing.assert_close(fidelity, torch.tensor([[half, 0.0]]))
    assert penalty.item() == pytest.approx(0.5 * half / 2)


def test_two_heads_of_one_name_are_refused_unless_named_and_names_key_the_logs(tiny_model_dir):
    """Logs, metrics, masks and scans are keyed by head name: a second head of one class needs a name of its own."""
    with pytest.raises(ValueError, match=r"model.rewards\[1\]: its head is named ColorRegion, like model.rewards\[0\]'s; "
                                         r"two heads of one run need two names: set model.rewards\[1\].name"):
        _module(tiny_model_dir, lam=0.5, rewards=[RewardTerm(ColorRegion()), RewardTerm(ColorRegion())])
    module = _module(tiny_model_dir, lam=0.5, rewards=[RewardTerm(ColorRegion()),
                                                       RewardTerm(ColorRegion(box=(0.5, 0.5, 1, 1)), name="corner")])
    logged = {}
    module.log_dict = lambda logs, **kwargs: logged.update(logs)
    module.log = lambda name, value, **kwargs: logged.update({name: value})
    with torch.no_grad():
        for lora_b in _lora_b(module):  # a LoRA that changes the images: tuned ≠ base, non-zero reward gains
            lora_b.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        out = module._common_step(next(iter(_loader(4))), "val")
    assert module.head_names == ["ColorRegion", "corner"]
    torch.testing.assert_close(logged["val/reward/corner"], out["scores"][:, 1].mean())
    torch.testing.assert_close(logged["val/reward/ColorRegion"], out["scores"][:, 0].mean())
    gains = (out["scores"] - out["base_scores"]).mean(0)  # tuned − base, per head
    assert gains.abs().min() > 1e-4  # the premise: the LoRA moved both rewards
    for i, name in enumerate(module.head_names):
        torch.testing.assert_close(logged[f"val/reward_gain/{name}"], gains[i])
    torch.testing.assert_close(logged["val/mask_area"], out["mask"].mean())


def test_the_step_reports_the_union_of_the_heads_masks(tiny_model_dir):
    """Two heads on disjoint quarters: the mask the step hands to evaluation is their maximum (the union the
    fidelity term keeps out), covering both quarters."""
    module = _module(tiny_model_dir, lam=0.5, masks=MaskArgs(threshold=0.01, dilation=0), rewards=[
        RewardTerm(ColorRegion(box=(0.0, 0.0, 0.5, 0.5))), RewardTerm(ColorRegion(box=(0.5, 0.5, 1, 1)), name="b")])
    with torch.no_grad():
        out = module._common_step(next(iter(_loader(4))), "val")
        masks, _, _ = module._localise(out["base"], out["prompts"])
    torch.testing.assert_close(out["mask"], masks.amax(1, keepdim=True))
    assert (out["mask"][..., :8, :8].amax() > 0) and (out["mask"][..., 8:, 8:].amax() > 0)  # both quarters


def test_reward_weights_scale_each_heads_score_in_the_loss(tiny_model_dir):
    module = _module(tiny_model_dir, lam=0.0, rewards=[RewardTerm(ColorRegion(), weight=2.0),
                                                       RewardTerm(ColorRegion(box=(0.5, 0.5, 1, 1)), weight=0.0,
                                                                  name="corner")])
    with torch.no_grad():
        out = module._common_step(next(iter(_loader(4))), "val")
    assert not torch.allclose(out["scores"][:, 0], out["scores"][:, 1])  # the weight, not the score, removes head 1
    torch.testing.assert_close(out["loss"], -(2.0 * out["scores"][:, 0]).mean())


def test_the_train_mode_reaches_the_unet_only(tiny_model_dir):
    """LoRA dropout needs the UNet in train mode; the frozen text encoder, VAE and reward heads stay in eval."""
    module = _module(tiny_model_dir, lam=1.0, lora=LoraArgs(rank=4, dropout=0.1))
    module.train()
    assert module.model.unet.training
    frozen = [child for name, child in module.model.named_children() if name != "unet"] + [module.heads]
    assert frozen and not any(m.training for child in frozen for m in child.modules())
    module.eval()
    assert not module.model.unet.training


def test_the_mask_localises_the_problem_in_the_base_image_not_the_tuned_one(tiny_model_dir):
    """M comes from I0's heatmap (the paper): with a LoRA that changes the image, the step's mask is the base
    image's mask, which differs from the tuned image's; in training too, and its loss uses that mask."""
    head = ColorRegion(color=(1.0, 0.0, 0.0), box=(0.0, 0.0, 1.0, 1.0))
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(head)], masks=MaskArgs(threshold=0.4, dilation=0))
    with torch.no_grad():
        for p in module.model.lora_parameters():  # a LoRA that changes the image
            p.add_(0.3 * torch.randn_like(p))
    batch = next(iter(_loader(4)))
    out = module._common_step(batch, "train")
    with torch.no_grad():
        masks = {k: heatmap_to_mask(head(out[k], out["prompts"]).heatmap, module.mask_args) for k in ("base", "tuned")}
        assert 0 < masks["base"].mean() < 1 and not torch.equal(masks["base"], masks["tuned"])  # the premise
        torch.testing.assert_close(out["mask"], masks["base"], rtol=0, atol=0)
        outside = (1 - masks["base"]) * (out["tuned"] - out["base"])
        expected = -out["scores"][:, 0].mean() + torch.linalg.vector_norm(outside.flatten(1), dim=1).mean()
        torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-5, atol=1e-6)


class _Projection(ColorRegion):
    """A score through a Linear layer (a CLIP-like head's matmuls), which bf16 autocast rounds to 8 bits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 1)

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        return type(out)(score=100 * self.linear(images.flatten(1))[:, 0], heatmap=out.heatmap)


def test_validation_and_test_score_rewards_in_float32_under_bf16_autocast(tiny_model_dir):
    """bf16-mixed (every real config): the reward means validate / test report are float32 scores of the decoded
    images, not bf16-rounded ones (a reward change below bf16's step came out as noise); training keeps bf16."""
    torch.manual_seed(0)
    head = _Projection()
    module = _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(head)])
    batch = next(iter(_loader(4)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.validation_step(batch, 0)
        trained = module._common_step(batch, "train")["scores"]
    assert trained.dtype == torch.bfloat16  # the premise: autocast rounds the head's matmul in training
    with torch.no_grad():
        for images, scores in ((out["tuned"], out["scores"]), (out["base"], out["base_scores"])):
            exact = head(images.float(), out["prompts"]).score
            assert scores.dtype == torch.float32
            torch.testing.assert_close(scores[:, 0], exact, rtol=1e-6, atol=1e-5)
            assert (exact.bfloat16().float() - exact).abs().max() > 1e-3  # bf16 would have moved them


def test_evaluation_and_predict_score_the_deterministic_images_of_base_and_tuned_model(tiny_model_dir):
    """Whatever the training's gradient mode (here DRaFT-LV, n re-noised samples per prompt), validation, test
    and predict show one deterministic image per item: the tuned model's I (LoRA on) beside the base model's I0
    (LoRA off), the same as plain sampling gives."""
    from fnf.sampling import initial_noise

    module = _module(tiny_model_dir, lam=1.0, sampler=SamplerArgs(num_steps=4, guidance_scale=2.0, grad_mode="lv",
                                                                  lv_samples=2))
    with torch.no_grad():
        for p in module.model.lora_parameters():  # a LoRA that changes the image
            p.add_(0.3 * torch.randn_like(p))
    batch = next(iter(_loader(2, batch_size=2)))
    text, uncond = module._encode(batch["prompt"])
    noise = initial_noise(batch["seed"], module.latent_shape, "cpu")
    with torch.no_grad():
        tuned = module.sampler(noise, text, uncond, "none").images
        with module.model.adapter_disabled():
            base = module.sampler(noise, text, uncond, "none").images
        assert (tuned - base).abs().amax() > 0.05
        predicted = module.predict_step(batch, 0)
        for stage in ("val", "test"):
            out = module._common_step(batch, stage)
            torch.testing.assert_close(out["tuned"], tuned, rtol=0, atol=1e-5)
            torch.testing.assert_close(out["base"], base, rtol=0, atol=1e-5)
    torch.testing.assert_close(predicted["tuned"], tuned, rtol=0, atol=1e-5)
    torch.testing.assert_close(predicted["base"], base, rtol=0, atol=1e-5)


def test_draft_lv_pairs_every_sample_with_its_own_prompts_base_image(tiny_model_dir):
    """n samples per prompt stacked as sample i of prompt b at row i·B + b: I0, masks, base scores and prompts
    must follow the same order (at identity LoRA each I lies near its own I0)."""
    module = _module(tiny_model_dir, lam=1.0, sampler=SamplerArgs(num_steps=4, guidance_scale=2.0, grad_mode="lv",
                                                                  lv_samples=2))
    batch = next(iter(_loader(2, batch_size=2)))
    out = module._common_step(batch, "train")
    assert out["prompts"] == batch["prompt"] * 2
    near = (out["tuned"] - out["base"]).abs().mean((1, 2, 3))
    crossed = (out["tuned"] - out["base"].roll(1, 0)).abs().mean((1, 2, 3))
    assert (near < 0.05 * crossed).all(), (near, crossed)


def _lora_b(module: FocusNFix) -> list[torch.Tensor]:
    """The LoRA up-projections B: zero at initialisation, so any non-zero entry was put there by training."""
    return [p for name, p in module.model.unet.named_parameters() if "lora_B" in name]


class _RecordLoraB(L.Callback):
    def __init__(self) -> None:
        self.after_step: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append([b.detach().clone() for b in _lora_b(pl_module)])


def test_each_training_step_moves_every_lora_b_by_one_adam_step(tiny_model_dir, tmp_path):
    """B starts at zero and Adam moves each weight by at most lr·(1 + 0.5%) per step in the first three steps (the
    bias-corrected m̂/√v̂ is a weighted mean of g over a weighted RMS of g: ≤ 1.0014 at step 2, ≤ 1.0037 at step 3
    by Cauchy–Schwarz), exactly lr·sign(g) at step 1; a weight whose gradient keeps its sign moves ~lr every step.
    So after step t the largest |B| lies in ((t − 0.5)·lr, 1.005·t·lr]: a step skipped, doubled or not reaching B
    falls outside."""
    lr = 1e-3  # small: gradient signs stay put over three steps
    module = _module(tiny_model_dir, lam=0.1, optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0))
    assert all(torch.equal(b, torch.zeros_like(b)) for b in _lora_b(module))
    record = _RecordLoraB()
    _trainer(tmp_path, steps=3, callbacks=[record]).fit(module, _loader())
    assert len(record.after_step) == 3
    for step, weights in enumerate(record.after_step, start=1):
        assert all(b.abs().amax() > 0 for b in weights), f"step {step}: a LoRA B never moved"
        largest = max(b.abs().amax().item() for b in weights)
        assert step - 0.5 < largest / lr <= 1.005 * step, (step, largest / lr)
    first = max(b.abs().amax().item() for b in record.after_step[0])
    assert first == pytest.approx(lr, rel=1e-3)  # Adam's first step: lr·g/(|g| + eps)


def test_bf16_mixed_on_cpu_trains_and_stays_finite(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, lam=0.1)
    before = [p.detach().clone() for p in module.model.lora_parameters()]
    _trainer(tmp_path, steps=3, precision="bf16-mixed").fit(module, _loader())
    after = module.model.lora_parameters()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in after)  # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_gradient_accumulation_trains_like_the_larger_batch(tiny_model_dir, tmp_path):
    """2 × batch 2 accumulated == batch 4 (λ = 0, SGD: the loss is a batch mean and Lightning divides by 2)."""
    sgd = partial(torch.optim.SGD, lr=20.0)
    large = _module(tiny_model_dir, lam=0.0, optimizer=sgd)
    _trainer(tmp_path, steps=2).fit(large, _loader(n_items=8, batch_size=4))
    accumulated = _module(tiny_model_dir, lam=0.0, optimizer=sgd)
    _trainer(tmp_path, steps=2, accumulate_grad_batches=2).fit(accumulated, _loader(n_items=8, batch_size=2))
    start = _module(tiny_model_dir, lam=0.0).model.lora_parameters()
    moved = max((a - s).abs().max().item() for a, s in zip(large.model.lora_parameters(), start))
    assert moved > 1e-3  # the comparison below is not between two untrained adapters
    for a, b in zip(large.model.lora_parameters(), accumulated.model.lora_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _count_base_passes(module: FocusNFix) -> list[int]:
    calls, disable = [], module.model.adapter_disabled

    def counting():
        calls.append(1)
        return disable()
    module.model.adapter_disabled = counting  # the base pass is the one sampling with the LoRA off
    return calls


def test_plain_draft_can_skip_the_base_pass_and_trains_exactly_the_same(tiny_model_dir, tmp_path):
    lora, passes = {}, {}
    for train_base in ("always", "if_needed"):
        # Separate passes: a fused base pass changes the tuned rows' batch, hence their float rounding (by ~1e-6
        # after 3 Adam steps, depending on the thread count), not what they compute.
        module = _module(tiny_model_dir, 0.0, train_base=train_base,
                         sampler=SamplerArgs(num_steps=4, k=2, guidance_scale=2.0, fused_base=False))
        passes[train_base] = _count_base_passes(module)
        _trainer(tmp_path, steps=3).fit(module, _loader())
        lora[train_base] = [p.detach().clone() for p in module.model.lora_parameters()]
    assert len(passes["always"]) == 3 and len(passes["if_needed"]) == 0
    assert all(b.abs().amax() > 0 for b in _lora_b(module))  # B is zero at init: the adapters below did train
    for skipped, sampled in zip(lora["if_needed"], lora["always"]):  # the base pass never reached the loss
        torch.testing.assert_close(skipped, sampled, rtol=0, atol=1e-7)


@pytest.mark.parametrize("needs_base", [dict(lam=0.1), dict(lam=0.0, masks=MaskArgs(empty="skip")),
                                        dict(lam=0.0, mask_mode="per_head",  # a head's own λ, none globally
                                             rewards=[RewardTerm(ColorRegion(box=BOX), lam=1.0)])])
def test_the_base_pass_stays_where_the_loss_uses_it(tiny_model_dir, tmp_path, needs_base):
    module = _module(tiny_model_dir, train_base="if_needed", **needs_base)
    passes = _count_base_passes(module)
    _trainer(tmp_path, steps=2).fit(module, _loader())
    assert len(passes) == 2
