"""A fit's recipe: what a resumed run must keep. Written into every checkpoint (``RunRecipe``) and compared, key by
key, with the config of the next ``--ckpt_path`` (``check_settings``), since Lightning would silently keep the
checkpoint's optimizer state (its lr) and restart the epoch at a position counted in the old batches."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
from lightning import Callback
from typing_extensions import override

MAY_DIFFER_ON_RESUME = ("model.pretrained", "model.compute.", "model.base_cache")  # where the base model lives, and
# speed levers: the I0 cache holds the same I0 a step would sample again
RECIPE_DATA = ("train_file", "csv_column", "seeds_per_prompt", "val_fraction", "batch_size", "filter")


def json_types(value):
    """``value`` (parsed config settings) as JSON types: tuples as lists, as a checkpoint or a JSON file gives them
    back, anything else as its string."""
    return json.loads(json.dumps(value, default=str))


def run_recipe(config, trainer: L.Trainer | None = None) -> dict:
    """The model's settings (rewards, regularizer, optimizer, schedule included), the training data and, given the
    trainer, the global batch (processes as resolved, so ``devices: auto`` counts) and the gradient clipping, as JSON
    types. ``config``: the
    parsed fit config."""
    data = config.data.as_dict()  # nested settings (data.filter) as dicts, not Namespace strings
    recipe = {"model": config.model.as_dict(), "data": {key: data.get(key) for key in RECIPE_DATA}}
    if trainer is not None:
        recipe["trainer"] = {"processes": trainer.num_nodes * trainer.num_devices,
                             "accumulate_grad_batches": trainer.accumulate_grad_batches,
                             "gradient_clip_val": trainer.gradient_clip_val,  # the update itself, as the lr
                             "gradient_clip_algorithm": trainer.gradient_clip_algorithm}
    recipe = json_types(recipe)
    data = recipe["data"]
    if data["train_file"]:
        data["train_file"] = os.path.abspath(data["train_file"])  # one file, however it is spelled
        if os.path.isfile(data["train_file"]):  # the same path with other prompts is another run
            data["train_file_sha256"] = file_digest(data["train_file"])
    if isinstance(data["filter"], dict) and data["filter"].get("scan"):
        data["filter"]["scan"] = os.path.abspath(data["filter"]["scan"])
    return recipe


def file_digest(path: str) -> str:
    """The first 16 hex digits of the file's SHA-256: enough to tell an edited prompt file from the one a run used."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:16]


class RunRecipe(Callback):
    """Writes the run's recipe (``run_recipe``) into every checkpoint, for the next ``--ckpt_path`` to compare, and
    its log dir, where a resume continues the logs of checkpoints kept in a ``checkpoint.dirpath`` of their own."""

    def __init__(self, recipe: dict) -> None:
        self.recipe, self.log_dir = recipe, None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.log_dir = str(Path(trainer.log_dir).resolve()) if trainer.log_dir else None  # every rank: a broadcast

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["fnf_recipe"], checkpoint["fnf_log_dir"] = self.recipe, self.log_dir


def check_settings(ours: dict, saved: dict, ckpt_path: str, resuming: bool) -> list[str]:
    """Compare a run's recipe (or only its ``model`` part, as older checkpoints held) with the one a checkpoint was
    trained with, key by key (list items by index). A setting one side lacks is new or old code, not a difference,
    unless the other side holds a value there (null against a class).

    LoRA settings must match (they fix the shapes of the weights); a resumed fit must match in everything but
    MAY_DIFFER_ON_RESUME, so a run is one recipe. Returns the other differences (evaluation may change them)."""
    ours, theirs = _flatten(ours), _flatten(saved)
    differences = [key for key in theirs if key in ours and not _same(ours[key], theirs[key])]
    for one, other in ((ours, theirs), (theirs, ours)):
        differences += sorted({parent for key in one.keys() - other.keys() for parent in _parents(key)
                               if parent in other})
    for key in differences:
        if key == "data.train_file_sha256" and resuming:
            raise ValueError(f"data.train_file: {ours['data.train_file']} holds other prompts than the run of "
                             f"{ckpt_path} was trained on (sha256 {ours[key]}, trained with {theirs[key]}); restore "
                             "the file or start a new run (leave out --ckpt_path)")
        lora = key.startswith("model.lora.")
        if lora or (resuming and not key.startswith(MAY_DIFFER_ON_RESUME)):
            action = "set it to the checkpoint's value" + ("" if lora else
                                                           " or start a new run (leave out --ckpt_path)")
            model = "model.pretrained"  # a LoRA of another model: say so first, its settings follow from that
            if lora and model in ours and model in theirs and not _same(ours[model], theirs[model]):
                action = (f"the checkpoint's LoRA was trained on {model}={theirs[model]!r}, the config's is "
                          f"{ours[model]!r}")
            raise ValueError(f"{SETTING.get(key, key)}: {_versus(ours, theirs, key, ckpt_path)}; {action}")
    return [f"{SETTING.get(key, key)}={_shown(ours, key)} (trained with {_shown(theirs, key)})" for key in differences]


SETTING = {"trainer.processes": "trainer.devices × trainer.num_nodes"}
"""Recipe keys that are no config key, by the settings they come from."""


def _same(ours, theirs) -> bool:
    """Equal values, or two spellings of one existing file (a head's weights, relative here and absolute there)."""
    if ours == theirs:
        return True
    try:
        return isinstance(ours, str) and isinstance(theirs, str) and os.path.samefile(ours, theirs)
    except OSError:  # not files
        return False


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _versus(ours: dict, theirs: dict, key: str, ckpt_path: str) -> str:
    """How the config's value differs from the checkpoint's; two long lists (target modules) by their difference."""
    mine, saved = ours.get(key), theirs.get(key)
    if isinstance(mine, list) and isinstance(saved, list) and len(repr(mine)) + len(repr(saved)) > 120:
        added, lacking = [v for v in mine if v not in saved], [v for v in saved if v not in mine]
        return f"the config adds {added} and lacks {lacking} against {ckpt_path}"
    return f"{_shown(ours, key)} in the config but {_shown(theirs, key)} in {ckpt_path}"


def _shown(flat: dict, key: str) -> str:
    """``key``'s value, or the settings under it, short enough for one line."""
    value = flat[key] if key in flat else {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _flatten(settings: dict | list, prefix: str = "") -> dict:
    """Dotted keys to values; lists of settings (reward terms) item by item, with their length under ``key[len]``;
    lists of plain values (target modules, a box) whole."""
    flat = {}
    items = enumerate(settings) if isinstance(settings, list) else settings.items()
    if isinstance(settings, list):
        flat[f"{prefix.rstrip('.')}[len]"] = len(settings)
    for key, value in items:
        value = list(value) if isinstance(value, tuple) else value
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
