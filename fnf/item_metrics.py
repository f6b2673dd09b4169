"""What each test item (prompt, seed) contributes to ``fnf test``'s metrics, one row per item: the parts the pooled
metrics are sums of, so that two runs on the same items can be compared item by item (``fnf.paired``).

A row: ``prompt``, ``seed``, ``category`` (when the prompt file has one); ``reward_base/<head>`` and
``reward_tuned/<head>``; each judge's per-image values (``<key>_base`` / ``<key>_tuned``, from judges that define
``items(images, prompts)``: their ``compute()`` is the mean of these); and for preservation outside the run's own
mask and the reference mask, the squared error summed over the region and its pixel count
(``outside_sq_error`` / ``outside_pixels``, ``reference_outside_*``): PSNR pooled over items, as the metric's.
"""

from __future__ import annotations

from torch import Tensor

from fnf.metrics import region_weights


def squared_error_outside(tuned: Tensor, base: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per image: sum of (tuned − base)² outside the mask and the number of values summed (MaskedPSNR's parts)."""
    weights = region_weights(mask.float(), "outside")  # (B, 1, H, W)
    error = (weights * (tuned.float() - base.float()) ** 2).sum(dim=(1, 2, 3))
    return error, weights.sum(dim=(1, 2, 3)) * tuned.shape[1]


def item_rows(outputs: dict, batch: dict, head_names: list[str], judges: list) -> list[dict]:
    """One row per item of a test batch (``outputs``: FocusNFix.test_step's, with ``reference_mask`` when the
    Evaluation has a reference)."""
    base, tuned, prompts = outputs["base"].float(), outputs["tuned"].float(), outputs["prompts"]  # as the metrics
    copies = len(prompts) // len(batch["seed"])  # DRaFT-LV's samples per prompt (1 in test)
    columns: dict[str, list] = {"prompt": list(prompts), "seed": [int(s) for s in batch["seed"]] * copies}
    if batch.get("category"):
        columns["category"] = list(batch["category"]) * copies
    for h, head in enumerate(head_names):
        columns[f"reward_base/{head}"] = outputs["base_scores"][:, h].tolist()
        columns[f"reward_tuned/{head}"] = outputs["scores"][:, h].tolist()
    for judge in judges:
        if hasattr(judge, "items"):
            for side, images in (("base", base), ("tuned", tuned)):
                columns |= {f"{key}_{side}": values.tolist() for key, values in judge.items(images, prompts).items()}
    masks = {"": outputs["mask"], "reference_": outputs.get("reference_mask")}
    for prefix, mask in masks.items():
        if mask is not None:
            error, pixels = squared_error_outside(tuned, base, mask)
            columns[f"{prefix}outside_sq_error"], columns[f"{prefix}outside_pixels"] = error.tolist(), pixels.tolist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]
