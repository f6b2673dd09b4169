"""Evaluation metrics against hand-computed values; FID with a tiny feature extractor, offline."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from fnf.cli import main
from fnf.evaluation import Evaluation, ReferenceMask
from fnf.masks import MaskArgs, heatmap_to_mask
from fnf.metrics import CLIPScore, ImageFeatures, MaskedLPIPS, MaskedPSNR, MaskedSSIM, lpips_network
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs
from fnf.rewards import ColorRegion
from fnf.sampling import SamplerArgs


def _halves(side: int = 32):
    mask = torch.zeros(1, 1, side, side)
    mask[..., : side // 2] = 1  # left half may change
    base = torch.zeros(1, 3, side, side)
    tuned = torch.where(mask.bool(), 0.5, 0.1).expand(1, 3, side, side).clone()
    return tuned, base, mask


def test_masked_psnr_matches_hand_computation():
    tuned, base, mask = _halves()
    expected = {"outside": 10 * math.log10(1 / 0.01), "inside": 10 * math.log10(1 / 0.25),
                "all": 10 * math.log10(1 / ((0.01 + 0.25) / 2))}
    for region, value in expected.items():
        metric = MaskedPSNR(region)
        metric.update(tuned, base, mask)
        assert metric.compute().item() == pytest.approx(value, abs=1e-4), region


def test_masked_psnr_pools_over_batches_like_one_big_batch():
    tuned, base, mask = _halves()
    split, joint = MaskedPSNR("outside"), MaskedPSNR("outside")
    other = (tuned * 0.5, base, 1 - mask)
    split.update(tuned, base, mask)
    split.update(*other)
    joint.update(torch.cat([tuned, other[0]]), torch.cat([base, base]), torch.cat([mask, other[2]]))
    assert split.compute().item() == pytest.approx(joint.compute().item(), rel=1e-6)


def test_masked_ssim_regions_split_the_whole_image_map():
    torch.manual_seed(0)
    base = torch.rand(2, 3, 32, 32)
    tuned = base.clone()
    tuned[..., :16] = torch.rand(2, 3, 32, 16)  # change only the left half
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :16] = 1
    values = {}
    for region in ("outside", "inside", "all"):
        metric = MaskedSSIM(region)
        metric.update(tuned, base, mask)
        values[region] = metric.compute().item()
    assert values["inside"] < 0.2 < 0.8 < values["outside"]  # window spill-over keeps "outside" below 1
    assert values["all"] == pytest.approx((values["inside"] + values["outside"]) / 2, abs=1e-5)  # equal areas
    _, full = structural_similarity_index_measure(tuned, base, data_range=1.0, return_full_image=True)
    assert values["all"] == pytest.approx(full.mean().item(), abs=1e-5)


class _FakeCLIP(nn.Module):
    """Image embedding: normalised mean colour; text embedding: one fixed colour per word."""

    WORDS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "not red": (-1.0, 0.0, 0.0)}

    def image_features(self, images, normalize=True):
        features = images.mean(dim=(2, 3))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def text_features(self, prompts, normalize=True):
        return torch.tensor([self.WORDS[p] for p in prompts])


def test_clip_score_is_100_times_clipped_cosine():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1  # pure red
    images[1, 0], images[1, 1] = 1, 1  # yellow: cos 1/sqrt(2) with red
    metric = CLIPScore(_FakeCLIP())
    metric.update(images, ["red", "red"])
    assert metric.compute().item() == pytest.approx((100 + 100 / math.sqrt(2)) / 2, rel=1e-5)
    metric.reset()
    metric.update(images[:1], ["green"])  # orthogonal: max(cos, 0) = 0
    assert metric.compute().item() == 0.0
    metric.reset()
    metric.update(images[:1], ["not red"])  # opposite: cos −1, clipped to 0 (not −100)
    assert metric.compute().item() == 0.0


def test_fid_with_a_tiny_feature_extractor_runs_offline():
    torch.manual_seed(0)
    features = ImageFeatures(_FakeCLIP())
    assert features.num_features == 3
    same, shifted = FrechetInceptionDistance(feature=features, normalize=True), FrechetInceptionDistance(
        feature=features, normalize=True)
    images = torch.rand(64, 3, 8, 8)
    same.update(images, real=True)
    same.update(images, real=False)
    shifted.update(images, real=True)
    shifted.update((images + 0.3).clamp(0, 1), real=False)
    assert abs(same.compute().item()) < 1e-3 and shifted.compute().item() > 0.01


@pytest.mark.parametrize("stage, limit_val_batches, items, needed", [
    ("fit", 1.0, {"train": [], "val": []}, True), ("fit", 0, {"train": [], "val": []}, False),
    ("fit", 1.0, {"train": []}, False), ("test", 1.0, {"test": []}, True), ("validate", 1.0, None, True)])
def test_lpips_without_its_backbone_weights_is_one_line_naming_the_file_where_a_run_evaluates(
        stage, limit_val_batches, items, needed, tmp_path, monkeypatch):
    """Before the first step of a run that evaluates; a fit that never validates needs no ImageNet weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline_download)
    evaluation = Evaluation(lpips="alex")
    trainer = SimpleNamespace(limit_val_batches=limit_val_batches,
                              datamodule=SimpleNamespace(items=items) if items is not None else None)
    if not needed:
        evaluation.setup(trainer, None, stage)
        assert evaluation.lpips is None
        return
    with pytest.raises(ValueError, match=r"^lpips: alex needs torchvision's ImageNet weights .*empty/hub/checkpoints/"
                                         r"alexnet-owt-7be5be79\.pth \(from https://.*offline") as error:
        evaluation.setup(trainer, None, stage)
    assert "\n" not in str(error.value)


def _offline_download(url, *args, **kwargs):
    from urllib.error import URLError

    raise URLError("offline")


@pytest.mark.parametrize("side", [64, 16])
def test_masked_lpips_is_torchmetrics_lpips_split_by_region(alexnet_cache, side):
    """Its whole-image value is torchmetrics' LPIPS (the spatial map's mean: bilinear upsampling keeps it close) of
    the images upsampled to 64 px where smaller; the regions split it by pixel count; a change confined to the
    mask's half scores far lower outside."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    torch.manual_seed(1)
    base = torch.rand(2, 3, side, side)
    tuned = base.clone()
    tuned[..., : side // 2] = torch.rand(2, 3, side, side // 2)  # the left half changes: the mask's half
    mask = torch.zeros(2, 1, side, side)
    mask[..., : side // 2] = 1
    network = lpips_network("alex")
    values = {}
    for region in ("outside", "inside", "all"):
        metric = MaskedLPIPS(network, region)
        metric.update(tuned, base, mask)
        values[region] = metric.compute().item()
    reference = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    tuned, base = (nn.functional.interpolate(x, size=(64, 64), mode="bilinear") for x in (tuned, base))
    assert values["all"] == pytest.approx(reference(tuned, base).item(), rel=0.05)
    assert values["all"] == pytest.approx((values["inside"] + values["outside"]) / 2, rel=1e-5)
    assert values["outside"] < 0.5 * values["inside"]
    same = MaskedLPIPS(network, "all")
    same.update(base, base, torch.zeros(2, 1, 64, 64))
    assert same.compute().item() == 0


@pytest.mark.parametrize("metric", [MaskedPSNR, MaskedSSIM])
def test_a_region_without_pixels_has_no_number(metric):
    """Every mask empty: nothing is inside, so inside_* is NaN (left out of the table), not 200 dB or SSIM 0."""
    tuned, base, mask = _halves()
    inside, outside = metric("inside"), metric("outside")
    for region in (inside, outside):
        region.update(tuned, base, torch.zeros_like(mask))
    assert math.isnan(inside.compute().item()) and math.isfinite(outside.compute().item())


def test_fnf_test_writes_the_evaluation_table(config, tmp_path, alexnet_cache):
    main(["test", "--config", str(config), "--data.test_file", str(tmp_path / "prompts.txt"),
          "--trainer.callbacks+=fnf.evaluation.Evaluation",
          "--trainer.callbacks.output_dir", str(tmp_path / "eval")])
    values = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    assert values["outside_psnr"] == pytest.approx(200, abs=1e-3)  # untrained LoRA: tuned == base
    assert values["reward_change/ColorRegion"] == 0.0
    assert values["all_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert "| outside_psnr |" in (tmp_path / "eval" / "test_metrics.md").read_text()
    assert math.isfinite(values["inside_psnr"])
    main(["test", "--config", str(config), "--data.test_file", str(tmp_path / "prompts.txt"),
          "--trainer.callbacks+=fnf.evaluation.Evaluation", "--trainer.callbacks.lpips", "alex",
          "--trainer.callbacks.output_dir", str(tmp_path / "lpips")])  # LPIPS: 0 everywhere
    values = json.loads((tmp_path / "lpips" / "test_metrics.json").read_text())
    assert [values[f"{region}_lpips"] for region in ("outside", "inside", "all")] == pytest.approx([0] * 3, abs=1e-9)
    main(["test", "--config", str(config), "--data.test_file", str(tmp_path / "prompts.txt"),
          "--model.masks.threshold", "1.0", "--model.masks.dilation", "0",  # ColorRegion's heatmap stays below 1
          "--trainer.callbacks+=fnf.evaluation.Evaluation", "--trainer.callbacks.output_dir", str(tmp_path / "empty")])
    values = json.loads((tmp_path / "empty" / "test_metrics.json").read_text())
    assert "outside_psnr" in values and not {"inside_psnr", "inside_ssim"} & values.keys()  # nothing inside


def test_reference_mask_scores_every_run_on_the_same_pixels(tiny_model_dir):
    """Two runs whose own masks differ (dilation 0 vs 3) get different outside_* numbers but identical reference_*
    ones, which equal MaskedPSNR outside the reference head's mask computed by hand on the same images."""
    torch.manual_seed(0)
    base, tuned = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    own_masks = {0: torch.zeros(2, 1, 16, 16), 3: torch.zeros(2, 1, 16, 16)}
    own_masks[0][..., 4:8, 4:8], own_masks[3][..., 1:11, 1:11] = 1, 1
    reference = ReferenceMask(ColorRegion(box=(0.0, 0.0, 0.5, 0.5)), MaskArgs(threshold=0.5, dilation=0))
    module = FocusNFix(rewards=[RewardTerm(ColorRegion())], pretrained=tiny_model_dir, lam=0.1,
                       sampler=SamplerArgs(num_steps=2, k=1), lora=LoraArgs(rank=2))
    values = {}
    for dilation, mask in own_masks.items():
        evaluation = Evaluation(reference=reference)
        outputs = {"prompts": ["a", "b"], "base": base, "tuned": tuned, "mask": mask,
                   "scores": torch.zeros(2, 1), "base_scores": torch.zeros(2, 1)}
        evaluation._update("test", module, outputs, {})
        values[dilation] = {k: float(m.compute()) for k, m in evaluation.metrics["test"][""].items()
                            if k.endswith("_psnr")}
    assert values[0]["outside_psnr"] != values[3]["outside_psnr"]
    assert values[0]["reference_outside_psnr"] == values[3]["reference_outside_psnr"]
    by_hand = MaskedPSNR(region="outside")
    by_hand.update(tuned, base, heatmap_to_mask(ColorRegion(box=(0.0, 0.0, 0.5, 0.5))(base, ["a", "b"]).heatmap,
                                                reference.masks))
    assert values[0]["reference_outside_psnr"] == pytest.approx(float(by_hand.compute()), rel=1e-6)



def test_shapes_evaluation_uses_the_judges_problem_mask_and_repair_rate(tiny_model_dir):
    """The shapes configs' Evaluation: reference_* outside the judge's (dilated) defect + mark pixels of I0, and
    JudgeRepairRates on (base, tuned): a defect and mark painted over as in the clean render count as repaired."""
    from fnf.worlds.shapes.generator import Scene, prompt_of, render, sample_scene
    from fnf.worlds.shapes.judge import JudgeProblemMask, JudgeRepairRates, judge

    rng = np.random.default_rng(3)
    scenes = [Scene(sample_scene(rng).objects, defect=True, unsafe=True) for _ in range(4)]
    base = torch.stack([render(s, 10 + i).image for i, s in enumerate(scenes)])
    tuned = torch.stack([render(Scene(s.objects), 10 + i).image for i, s in enumerate(scenes)])  # repaired
    prompts = [prompt_of(s) for s in scenes]
    masks = MaskArgs(threshold=0.5, dilation=2)
    evaluation = Evaluation(pair_judges=[JudgeRepairRates()], reference=ReferenceMask(JudgeProblemMask(), masks))
    module = FocusNFix(rewards=[RewardTerm(ColorRegion())], pretrained=tiny_model_dir, lam=0.1,
                       sampler=SamplerArgs(num_steps=2, k=1), lora=LoraArgs(rank=2))
    outputs = {"prompts": prompts, "base": base, "tuned": tuned, "mask": torch.zeros(4, 1, *base.shape[2:]),
               "scores": torch.zeros(4, 1), "base_scores": torch.zeros(4, 1)}
    evaluation._update("test", module, outputs, {})
    metrics = evaluation.metrics["test"][""]
    assert {k: float(v) for k, v in metrics["pair_judge0_tuned"].compute().items()} == {
        "judge_repaired_rate": 1.0, "judge_unsafe_repaired_rate": 1.0}
    problems = torch.stack([(v.defect_mask | v.unsafe_mask).float() for v in judge(base, prompts)])
    assert problems.sum() > 0
    by_hand = MaskedPSNR(region="outside")
    by_hand.update(tuned, base, heatmap_to_mask(problems, masks))
    assert float(metrics["reference_outside_psnr"].compute()) == pytest.approx(float(by_hand.compute()), rel=1e-6)
    assert float(metrics["reference_inside_psnr"].compute()) < float(metrics["reference_outside_psnr"].compute())


def _red_then_half_green(tiny_model_dir) -> tuple[FocusNFix, dict]:
    """Base all red; tuned green in the left half, the mask's region; rewards 0 -> 1 and 2."""
    side = 8
    base = torch.zeros(2, 3, side, side)
    base[:, 0] = 1
    tuned = base.clone()
    tuned[:, :, :, : side // 2] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    mask = torch.zeros(2, 1, side, side)
    mask[..., : side // 2] = 1
    module = FocusNFix(rewards=[RewardTerm(ColorRegion())], pretrained=tiny_model_dir, lam=0.1,
                       sampler=SamplerArgs(num_steps=2, k=1), lora=LoraArgs(rank=2))
    return module, {"prompts": ["red", "red"], "base": base, "tuned": tuned, "mask": mask,
                    "scores": torch.tensor([[1.0], [2.0]]), "base_scores": torch.zeros(2, 1)}


def _trainer_stub(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, loggers=[], log_dir=None, default_root_dir=str(tmp_path),
                           global_step=0, world_size=1)


def test_evaluation_keeps_base_and_tuned_and_inside_and_outside_apart(tiny_model_dir, tmp_path):
    """Every metric must see which image is which and which pixels are inside. By hand: outside identical (PSNR
    200 dB cap), inside MSE 2/3 (PSNR 1.76 dB), CLIP score 100 for base and 100/√2 for tuned with a "red" prompt,
    reward 0 → 1.5 (change +1.5), FID of the mean colour features (unnormalised: FID's features) (1, 0, 0) vs
    (0.5, 0.5, 0) with no spread: their squared distance 0.5."""
    module, outputs = _red_then_half_green(tiny_model_dir)
    evaluation = Evaluation(clip=_FakeCLIP(), fid_features=_FakeCLIP(), output_dir=str(tmp_path))
    evaluation._update("validate", module, outputs, {})
    evaluation._finish("validate", _trainer_stub(tmp_path), module)
    values = json.loads((tmp_path / "validate_metrics.json").read_text())
    assert values["outside_psnr"] == pytest.approx(200.0)
    assert values["inside_psnr"] == pytest.approx(10 * math.log10(3 / 2), rel=1e-4)
    assert values["clip_score_base"] == pytest.approx(100.0, rel=1e-5)
    assert values["clip_score_tuned"] == pytest.approx(100 / math.sqrt(2), rel=1e-5)
    assert (values["reward_base/ColorRegion"], values["reward_tuned/ColorRegion"],
            values["reward_change/ColorRegion"]) == pytest.approx((0.0, 1.5, 1.5))
    assert values["fid_tuned_vs_base"] == pytest.approx(0.5, abs=1e-4)


def test_test_samples_and_items_keep_base_and_tuned_apart(tiny_model_dir, tmp_path):
    """In test, each sample's images read base | tuned | heatmap | mask and its numbers base then tuned; each item's
    row has its own rewards and the squared error outside (none) the mask."""
    module, outputs = _red_then_half_green(tiny_model_dir)
    evaluation = Evaluation(output_dir=str(tmp_path))
    evaluation.on_test_epoch_start(_trainer_stub(tmp_path), module)
    evaluation.on_test_batch_end(_trainer_stub(tmp_path), module, outputs, {"seed": [3, 4]}, 0)
    sample = evaluation.samples[0]
    assert torch.equal(sample["images"][0], outputs["base"][0])
    assert torch.equal(sample["images"][1], outputs["tuned"][0])
    assert torch.equal(sample["images"][3], outputs["mask"][0].expand(3, -1, -1))
    assert (sample["seed"], sample["reward_base"], sample["reward_tuned"]) == (3, [0.0], [1.0])
    evaluation._finish("test", _trainer_stub(tmp_path), module)
    rows = [json.loads(line) for line in (tmp_path / "test_items.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["reward_base/ColorRegion"], r["reward_tuned/ColorRegion"]) for r in rows] == [
        (3, 0.0, 1.0), (4, 0.0, 2.0)]
    assert [(r["outside_sq_error"], r["outside_pixels"]) for r in rows] == [(0.0, 3 * 32.0)] * 2  # 3 × 8 × 4 outside
    saved = json.loads((tmp_path / "test_samples" / "samples.json").read_text())
    assert [(s["reward_base/ColorRegion"], s["reward_tuned/ColorRegion"]) for s in saved] == [(0.0, 1.0), (0.0, 2.0)]


def test_judge_rates_plug_into_the_evaluation():
    from fnf.evaluation import Evaluation
    from fnf.worlds.shapes.judge import JudgeRates

    assert Evaluation(judges=[JudgeRates()]).judges  # plugs in; the shapes configs use it end to end
    rates = JudgeRates()
    rates.update(torch.zeros(2, 3, 32, 32), ["a red circle top left", "a blue square top right"])  # empty images
    assert {k: float(v) for k, v in rates.compute().items()} == {
        "judge_alignment": 0.0, "judge_defect_rate": 0.0, "judge_unsafe_rate": 0.0}


def test_judge_rates_and_their_items_follow_each_verdict(monkeypatch):
    """Three verdicts by hand: per image 1/0 under the rate each field feeds, and the rates their means."""
    from fnf.worlds.shapes import judge as judge_module

    verdicts = [SimpleNamespace(aligned=True, defect=True, unsafe=False),
                SimpleNamespace(aligned=False, defect=False, unsafe=True),
                SimpleNamespace(aligned=True, defect=False, unsafe=False)]
    monkeypatch.setattr(judge_module, "judge", lambda images, prompts: verdicts)
    rates, images = judge_module.JudgeRates(), torch.zeros(3, 3, 8, 8)
    items = rates.items(images, ["a", "b", "c"])
    assert {key: values.tolist() for key, values in items.items()} == {
        "judge_alignment": [1.0, 0.0, 1.0], "judge_defect_rate": [1.0, 0.0, 0.0], "judge_unsafe_rate": [0.0, 1.0, 0.0]}
    rates.update(images, ["a", "b", "c"])
    assert {key: float(value) for key, value in rates.compute().items()} == pytest.approx(
        {"judge_alignment": 2 / 3, "judge_defect_rate": 1 / 3, "judge_unsafe_rate": 1 / 3})


def test_categories_in_the_prompt_file_get_their_own_metrics(config, tmp_path):
    prompts = tmp_path / "categorised.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "seed": i, "category": c}) + "\n" for i, (p, c) in enumerate(
        [("a red circle", "simple"), ("a red square", "simple"), ("a blue circle top left", "placed")])))
    main(["test", "--config", str(config), "--data.test_file", str(prompts),
          "--trainer.callbacks+=fnf.evaluation.Evaluation", "--trainer.callbacks.output_dir", str(tmp_path / "eval")])
    values = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    for group in ("simple", "placed"):
        assert values[f"category/{group}/reward_change/ColorRegion"] == 0.0
        assert f"category/{group}/outside_psnr" in values
    mean = (2 * values["category/simple/reward_base/ColorRegion"] + values["category/placed/reward_base/ColorRegion"]) / 3
    assert values["reward_base/ColorRegion"] == pytest.approx(mean, rel=1e-5)  # the categories partition the set


def test_a_judge_rate_of_no_images_is_left_out(tmp_path):
    """Repair rates divide by the base images that had the problem: with none, 0/0 is no number, not NaN in JSON."""
    from torchmetrics import Metric

    class _Rates(Metric):
        def update(self) -> None: ...

        def compute(self) -> dict:
            return {"judge_repaired_rate": torch.tensor(math.nan), "judge_defect_rate": torch.tensor(0.5)}

    evaluation = Evaluation(output_dir=str(tmp_path))
    evaluation.metrics, evaluation.samples = {"validate": {"": {"judge_tuned": _Rates()}}}, []
    logged = {}
    module = SimpleNamespace(head_names=[], log_dict=lambda values, **kwargs: logged.update(values))
    trainer = SimpleNamespace(is_global_zero=True, log_dir=None, default_root_dir=str(tmp_path), loggers=[],
                              global_step=0)
    evaluation._finish("validate", trainer, module)
    assert json.loads((tmp_path / "validate_metrics.json").read_text()) == {"judge_defect_rate_tuned": 0.5}
    assert logged == {"validate_eval/judge_defect_rate_tuned": 0.5}
