"""FocusNFix: region-aware reward fine-tuning (Xing et al., CVPR 2025) as a LightningModule.

The FNF step, for prompts c and initial noise x_T (same x_T for both passes):

    I0 = sample(θ0, c, x_T)                 no grad, LoRA disabled (one UNet in memory)
    I  = sample(θ, c, x_T)                  gradients through the last K steps (DRaFT-K); steps without grad
                                            share one UNet call with I0's (fused_base)
    M  = mask(heatmap or saliency of I0)    no grad, per reward head
    loss = −Σ_i w_i r_i(I, c) + λ · reg(I, I0, 1 − M)        (paper Fig. 2; λ = 0 is plain DRaFT)

Only LoRA weights train; checkpoints hold only them; inference is the tuned model alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from fnf.compute import ComputeArgs, ComputeLevers
from fnf.device_copies import to_device
from fnf.lora_optimizer import LoraOptimizer
from fnf.masks import MaskArgs, heatmap_to_mask
from fnf.nonfinite import NonFiniteSteps
from fnf.objective import RewardTerm, check_objective, term_heatmaps
from fnf.pipeline import LoraArgs, Text2ImageModel, TextEmbedding
from fnf.regularizers import PixelFrobenius, Regularizer
from fnf.rewards.base import check_reward_output, float32_rewards, scores_only
from fnf.resume import LoraOnlyCheckpoints
from fnf.sampling import Sample, SamplerArgs, initial_noise, make_sampler
from fnf.sharding import ShardedUnet


@dataclass
class BaseReference:
    """What the base pass yields for a batch; every field is batch-first so it can be cached per item."""

    latents: Tensor  # (B, C, h, w)
    images: Tensor  # (B, 3, H, W)
    masks: Tensor  # (B, heads, H, W), 1 = may change; zeros for heads without a mask
    active: Tensor  # (B, heads), 0 where the empty-mask policy "skip" switched the reward off
    scores: Tensor  # (B, heads) base rewards r_i(I0, c)

    def map(self, fn) -> BaseReference:
        return BaseReference(*(fn(getattr(self, f.name)) for f in fields(self)))

    @staticmethod
    def cat(items: list[BaseReference]) -> BaseReference:
        return BaseReference(*(torch.cat([getattr(i, f.name) for i in items]) for f in fields(BaseReference)))

    @property
    def sample(self) -> Sample:
        return Sample(self.latents, self.images)


class FocusNFix(NonFiniteSteps, LoraOnlyCheckpoints, LoraOptimizer, ComputeLevers, ShardedUnet):
    def __init__(
        self,
        rewards: list[RewardTerm],
        pretrained: str = "embedded:shapes-t2i",
        regularizer: Regularizer | None = None,
        lam: float = 1.0,
        mask_mode: Literal["union", "per_head"] = "union",
        sampler: SamplerArgs = SamplerArgs(),
        masks: MaskArgs = MaskArgs(),
        lora: LoraArgs = LoraArgs(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        base_cache: Literal["off", "memory"] = "off",
        train_base: Literal["always", "if_needed"] = "always",
        compute: ComputeArgs = ComputeArgs(),
    ) -> None:
        """Region-aware reward fine-tuning of a text-to-image model's LoRA.

        Args:
            rewards: reward terms r_i (head, weight, mask source, optional per-head λ).
            pretrained: diffusers model folder, hub id, or ``embedded:<name>`` for a shipped model.
            regularizer: fidelity term outside the mask (default PixelFrobenius, the paper's).
            lam: λ, weight of the fidelity term; 0 gives plain DRaFT (global fine-tuning).
            mask_mode: union: one mask M = max_i M_i; per_head: Σ_i λ_i reg(I, I0, 1 − M_i).
            sampler: sampling (DDIM or flow-matching Euler) and gradient path (DRaFT, DRaFT-K, DRaFT-LV).
            masks: heatmap/saliency -> mask post-processing and the empty-mask policy.
            lora: LoRA on the denoiser (UNet or transformer).
            optimizer: optimizer over the LoRA parameters.
            lr_scheduler: optional learning-rate schedule, stepped every optimizer step.
            nonfinite: a non-finite reward or loss: raise (stop, naming it) or skip the batch on every process (up
                to ``fnf.nonfinite.MAX_SKIPPED_IN_A_ROW`` in a row: more is a diverged run or a broken head).
            base_cache: memory: keep I0, masks and base scores per (prompt, seed) after the first visit.
            train_base: if_needed: training steps skip I0 and its masks when the loss does not use them (λ = 0
                everywhere and masks.empty != skip): plain DRaFT at DRaFT's cost, without the fidelity,
                mask-area and reward-gain logs or the base column of image grids. Validation and test always
                sample I0. always: every step samples I0, so DRaFT runs log how far they drift from it.
            compute: speed levers for the frozen model: weights in the compute dtype, memory layout, compilation.
        """
        super().__init__()
        if not rewards:
            raise ValueError("model.rewards: at least one reward term is required")
        check_objective(rewards, lam, mask_mode)
        # Plain types only, so checkpoints load with torch.load(weights_only=True); the CLI saves the full config.
        self.save_hyperparameters(dict(pretrained=pretrained, lam=lam, mask_mode=mask_mode, sampler=asdict(sampler),
                                       masks=asdict(masks), lora=asdict(lora), nonfinite=nonfinite,
                                       compute=asdict(compute)))
        self.model = Text2ImageModel.from_pretrained(pretrained)
        self.model.add_lora(lora)
        self.sampler = make_sampler(self.model, sampler)
        self.model.latent_shape(self.sampler.resolution)  # fails now, not at the first step, if it does not fit the VAE
        self.terms = rewards
        self.heads = nn.ModuleList([t.head.requires_grad_(False).eval() for t in rewards])
        self.head_names = [t.label for t in rewards]  # in logs, metrics, masks and scans
        self.register_buffer("reward_weights", torch.tensor([t.weight for t in rewards]), persistent=False)  # w_i
        self.regularizer = regularizer if regularizer is not None else PixelFrobenius()
        self.lam, self.mask_mode, self.mask_args = lam, mask_mode, masks
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.nonfinite, self.base_cache, self.compute = nonfinite, base_cache, compute
        penalised = lam > 0 or any(t.lam for t in rewards)
        self.base_in_training = train_base == "always" or penalised or masks.empty == "skip"
        self._cache: dict[tuple[str, int], BaseReference] = {}
        self._uncond: TextEmbedding | None = None
        self.strict_loading = False  # checkpoints hold LoRA weights only

    # ---- the FNF step ---------------------------------------------------------------------------
    @override
    def training_step(self, batch: dict, batch_idx: int) -> dict | None:
        return self._common_step(batch, "train")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> dict | None:
        with float32_rewards():  # the outputs feed fnf.evaluation.Evaluation: rewards to float32's precision
            return self._common_step(batch, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> dict | None:
        with float32_rewards():
            return self._common_step(batch, "test")

    def _common_step(self, batch: dict, stage: str) -> dict | None:
        prompts, seeds = batch["prompt"], batch["seed"]
        text, uncond = self._encode(prompts)
        noise = initial_noise(seeds, self.latent_shape, self.device)  # x_T, one generator per (prompt, seed)
        grad_mode = self.sampler.args.grad_mode if stage == "train" else "none"
        needs_base = stage != "train" or self.base_in_training  # train_base: if_needed skips I0 where unused
        base = self._cached_base(prompts, seeds) if needs_base else None
        if needs_base and base is None:  # I0 (no grad, LoRA off) and I from the same x_T, fused where exact
            base_sample, tuned = self.sampler.with_base(noise, text, uncond, grad_mode)
            base = self._base_reference(base_sample, prompts, seeds)  # + M(I0) and base scores
        else:
            tuned = self.sampler(noise, text, uncond, grad_mode)  # I: gradients through the last K steps
        n = self.sampler.samples_per_prompt(grad_mode)  # DRaFT-LV stacks n samples per prompt
        prompts = prompts * n
        if base is not None:
            base = base.map(lambda t: t.repeat(n, *[1] * (t.dim() - 1)))

        with scores_only():  # heads may skip heatmaps here
            scores = torch.stack([check_reward_output(head, head(tuned.images, prompts), tuned.images, values=False,
                                                      trained_on=term.weight > 0).score
                                  for term, head in zip(self.terms, self.heads)], dim=1)  # (B, heads)
        active = base.active if base is not None else 1.0  # the empty-mask policy "skip" needs I0's masks
        reward_loss = -(self.reward_weights * active * scores).sum(1).mean()  # −Σ_i w_i r_i(I, c)
        fidelity, penalty = (None, 0.0) if base is None else self._fidelity(tuned, base)  # λ · reg(I, I0, 1 − M)
        loss = reward_loss + penalty
        base_scores = None if base is None else base.scores
        if not self.usable(stage, loss, scores, base_scores, fidelity):  # model.nonfinite: raise or skip, on all ranks
            return self.skipped(loss, stage)

        self._log_step(stage, loss, scores, base, fidelity, len(prompts))
        out = {"loss": loss, "prompts": prompts, "tuned": tuned.images.detach(), "scores": scores.detach()}
        if base is not None:
            out |= {"base": base.images.detach(), "mask": base.masks.amax(1, keepdim=True), "base_scores": base.scores}
        return out

    def _cached_base(self, prompts: list[str], seeds: list[int]) -> BaseReference | None:
        keys = list(zip(prompts, seeds))
        if self.base_cache == "memory" and all(k in self._cache for k in keys):
            return BaseReference.cat([self._cache[k] for k in keys]).map(lambda t: to_device(t, self.device))
        return None

    def _base_reference(self, base: Sample, prompts: list[str], seeds: list[int]) -> BaseReference:
        masks, active, scores = self._localise(base.images, prompts)
        reference = BaseReference(base.latents, base.images, masks, active, scores)
        if self.base_cache == "memory":
            for i, key in enumerate(zip(prompts, seeds)):
                self._cache[key] = reference.map(lambda t: t[i:i + 1].cpu())
        return reference

    def _localise(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Masks M_i(I0), active flags and base scores for every head (the paper's heatmap/saliency path)."""
        heatmaps, scores = self.problem_heatmaps(images, prompts)
        masks, empty = [], []
        no_mask = images.new_zeros(images.shape[0], 1, *images.shape[2:])
        for term, heatmap in zip(self.terms, heatmaps):
            cut = self.mask_args if term.threshold is None else replace(self.mask_args, threshold=term.threshold)
            masks.append(no_mask if heatmap is None else heatmap_to_mask(heatmap, cut))
            empty.append((masks[-1].amax(dim=(1, 2, 3)) == 0) & (heatmap is not None))  # (B,)
        masks, empty = torch.cat(masks, dim=1), torch.stack(empty, dim=1)  # (B, heads, H, W), (B, heads)
        if self.mask_args.empty == "global":  # nothing found: the whole image may change
            whole = empty
            if self.mask_mode == "union":  # only where no head found anything: else the union is the found region
                whole = empty & (masks.amax(dim=(1, 2, 3)) == 0)[:, None]
            masks = torch.where(whole[:, :, None, None], 1.0, masks)
        active = ~empty if self.mask_args.empty == "skip" else torch.ones_like(empty)
        return masks, active.float(), scores

    def problem_heatmaps(self, images: Tensor, prompts: list[str]) -> tuple[list[Tensor | None], Tensor]:
        """Per reward term, the map its mask thresholds (None for mask: none), and the scores (B, heads)."""
        return term_heatmaps(self.terms, self.heads, images, prompts, self.mask_args.saliency_sigma)

    def _fidelity(self, tuned: Sample, base: BaseReference) -> tuple[Tensor, Tensor]:
        """(fidelity term per mask and image (masks, B), λ-weighted penalty) for the union mask or per-head masks."""
        if self.mask_mode == "union":
            keep = 1 - base.masks.amax(dim=1, keepdim=True)  # (B, heads, H, W) -> (B, 1, H, W)
            fidelity = self.regularizer(tuned, base.sample, keep)[None]
            return fidelity, self.lam * fidelity.mean()
        masked = [i for i, t in enumerate(self.terms) if t.mask != "none"]
        terms = torch.stack([self.regularizer(tuned, base.sample, 1 - base.masks[:, i:i + 1]) for i in masked])
        lams = [self.terms[i].lam if self.terms[i].lam is not None else self.lam for i in masked]
        return terms, sum(lam * term.mean() for lam, term in zip(lams, terms))

    # ---- helpers --------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape(self.sampler.resolution)

    def _encode(self, prompts: list[str]) -> tuple[TextEmbedding, TextEmbedding]:
        with torch.no_grad():
            if self._uncond is None or self._uncond.device != self.device:
                self._uncond = self.model.unconditional()
            return self.model.encode_prompts(prompts), self._uncond.expand(len(prompts))

    def _log_step(self, stage, loss, scores, base: BaseReference | None, fidelity, batch_size) -> None:
        logs = {f"{stage}/reward/{name}": scores[:, i].mean() for i, name in enumerate(self.head_names)}
        if base is not None:
            logs |= {f"{stage}/fidelity": fidelity.mean(), f"{stage}/mask_area": base.masks.amax(1).mean()}
            logs |= {f"{stage}/reward_gain/{name}": (scores[:, i] - base.scores[:, i]).mean()
                     for i, name in enumerate(self.head_names)}
        self.log_dict(logs, batch_size=batch_size, prog_bar=False, sync_dist=stage != "train")
        self.log(f"{stage}/loss", loss, batch_size=batch_size, prog_bar=True, sync_dist=stage != "train")

    # ---- Lightning plumbing -------------------------------------------------------------------------
    @override
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Tuned images (the product: no mask, no reward) next to base images from the same x_T."""
        prompts, seeds = batch["prompt"], batch["seed"]
        text, uncond = self._encode(prompts)
        noise = initial_noise(seeds, self.latent_shape, self.device)
        with torch.no_grad():
            base, tuned = self.sampler.with_base(noise, text, uncond, "none")
        return {"prompt": prompts, "seed": seeds, "base": base.images.cpu(), "tuned": tuned.images.cpu()}

    @override
    def train(self, mode: bool = True) -> FocusNFix:
        """Only the denoiser (LoRA dropout) follows ``mode``; text encoders, VAE and reward heads stay in eval."""
        super().train(mode)
        for name, frozen in [*self.model.named_children(), ("heads", self.heads)]:
            if name != self.model.denoiser_name:  # unet, or an SD3 / FLUX transformer
                frozen.eval()
        return self

