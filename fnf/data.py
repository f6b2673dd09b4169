"""Prompt files (``fnf.prompt_file``) -> batches of ``{"prompt": list[str], "seed": list[int]}``.

Every item carries a fixed seed so a prompt is always generated from the same
initial noise: rewards stay comparable across epochs, runs and checkpoints.
"""

import hashlib
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from fnf.prompt_file import MAX_SEED, PromptFileError, read_prompts
from fnf.resume import EpochShuffle, ResumableLoader, batches_done_in_epoch
from fnf.scan_file import FILTERED_OUT, ScanFilter

SEED_STRIDE = 1_000_003  # prime gap between the seeds of one prompt's copies

Item = dict[str, Any]


def in_val_split(prompt: str, fraction: float) -> bool:
    """Stable (run- and machine-independent) assignment of a prompt to the validation split."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def run_seed() -> int:
    """The run's global seed: what Lightning's ``seed_everything`` (LightningCLI's ``seed_everything:``) set. Lightning
    keeps it in ``PL_GLOBAL_SEED``, which spawned DDP processes inherit, so every rank reads the same value; 0 when
    the run was not seeded."""
    value = os.environ.get("PL_GLOBAL_SEED", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"PL_GLOBAL_SEED (the run's seed_everything) must be an integer, got {value!r}") from None


def collate(items: list[Item]) -> dict[str, Any]:
    batch = {
        "prompt": [item["prompt"] for item in items],
        "seed": [item["seed"] for item in items],  # a list, so it stays on the CPU, where x_T is drawn
    }
    if any("category" in item for item in items):
        batch["category"] = [item.get("category", "") for item in items]
    return batch


class PromptDataModule(L.LightningDataModule):
    """Serves ``{"prompt": list[str], "seed": list[int]}`` batches read from prompt files.

    Files: ``.txt`` (one prompt per line; blank and ``#`` lines skipped), ``.csv``
    (header row, prompt column ``csv_column``, optional ``seed`` column) or
    ``.jsonl`` (objects with ``"prompt"`` and optional integer ``"seed"``).

    Seeds: a prompt's base seed is the file's seed if given, else ``seed + index``
    (just ``index`` when ``seed`` is unset) with ``index`` its 0-based position among
    the file's prompts. It expands into ``seeds_per_prompt`` items with seeds
    ``base + 1_000_003 * k``, k = 0, 1, ...; these are distinct for files of fewer
    than 1_000_003 prompts without explicit seeds.

    The run's seed (``seed_everything``) does not move these per-prompt seeds: they fix x_T,
    and base vs tuned images of validation and test prompts must come from the same x_T in
    every run, whatever its seed, so that runs and methods compare image for image (the
    shapes world's files carry explicit seeds anyway; to vary a seedless training file's x_T,
    set ``seed`` per run). What the run's seed does move, unless ``seed`` is given, is the
    training shuffle order; LoRA init and DRaFT-LV noise follow it through the global RNG.
    A restored run keeps its checkpoint's shuffle seed.

    Stages without a file: validation is skipped, while train/test/predict raise.

    Args:
        train_file: Prompt file for training; required by ``fit``.
        val_file: Prompt file for validation. If unset, ``val_fraction`` of the
            training prompts (chosen by a stable hash of the text) is held out.
        test_file: Prompt file for ``test``.
        predict_file: Prompt file for ``predict``; falls back to ``test_file``, then ``val_file``.
        csv_column: Name of the CSV column holding the prompts.
        seed: Seed of the training shuffle order (one permutation per (seed, epoch); a run restored
            mid-epoch continues where it stopped) and base of the default per-prompt seeds. None: the
            order follows the run's seed (``seed_everything``) and the per-prompt base is 0.
        seeds_per_prompt: Number of (prompt, seed) items generated per prompt.
        val_fraction: Fraction in [0, 1) of training prompts held out when ``val_file`` is unset.
        val_items: Validate on the first N items of ``val_file`` (or of the ``val_fraction`` hold-out; None: all),
            the same items on any number of processes (``trainer.limit_val_batches`` counts batches per process);
            ``filter``'s ``filtered_out: validate`` items come on top.
        batch_size: Items per batch and process (under DDP the global batch is this times the world size).
        num_workers: DataLoader worker processes (0 = load in the main process).
        filter: Train only on the items a ``fnf scan`` of ``train_file`` found the base model failing on
            (``{scan: scan.jsonl, head: ShapesArtifact, score_below: 0.0}``); the others are dropped or
            validated (``filtered_out``). Applied after the ``val_fraction`` split. None: train on every item.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        csv_column: str = "prompt",
        seed: int | None = None,
        seeds_per_prompt: int = 1,
        val_fraction: float = 0.0,
        val_items: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        filter: ScanFilter | None = None,
    ) -> None:
        super().__init__()
        for key, ok, rule, value in (
            ("seeds_per_prompt", seeds_per_prompt >= 1, ">= 1", seeds_per_prompt),
            ("val_fraction", 0.0 <= val_fraction < 1.0, "in [0, 1)", val_fraction),
            ("val_items", val_items is None or val_items >= 1, ">= 1 or null", val_items),
            ("batch_size", batch_size >= 1, ">= 1", batch_size),
            ("num_workers", num_workers >= 0, ">= 0", num_workers),
            ("seed", seed is None or 0 <= seed <= MAX_SEED, "in [0, 2**63) or null", seed),
            ("csv_column", bool(csv_column), "non-empty", csv_column),
        ):
            if not ok:
                raise ValueError(f"data.{key} must be {rule}, got {value!r}")
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.predict_file = predict_file or test_file or val_file
        self._predict_key = "predict_file" if predict_file else "test_file" if test_file else "val_file"
        self.csv_column, self.seed, self.seeds_per_prompt = csv_column, seed, seeds_per_prompt
        self.val_fraction, self.val_items = val_fraction, val_items
        self.batch_size, self.num_workers = batch_size, num_workers
        self.filter = filter
        self.items: dict[str, list[Item]] = {}
        self._skip_batches = 0
        self.shuffle_seed: int | None = None
        """The training order's seed: ``seed`` or the run's seed, resolved when ``fit`` sets up; kept in checkpoints."""

    def load(self, path: str) -> list[Item]:
        """Read a prompt file and expand it into seeded items (see class docstring)."""
        items = []
        for index, (prompt, file_seed, category) in enumerate(read_prompts(path, self.csv_column)):
            base = (self.seed or 0) + index if file_seed is None else file_seed  # not the run's seed (see above)
            label = {"category": category} if category is not None else {}
            items += [{"prompt": prompt, "seed": base + SEED_STRIDE * k, **label} for k in range(self.seeds_per_prompt)]
        return items

    def load_file(self, key: str) -> list[Item]:
        """``load`` of the file under ``data.<key>``, its errors naming that key (which of the files is wrong)."""
        try:
            return self.load(getattr(self, key))
        except PromptFileError as error:
            raise type(error)(f"data.{key}: {error}") from None

    @override
    def setup(self, stage: str) -> None:
        """Read (and thereby validate) the files the stage needs."""
        if stage in ("fit", "validate"):
            train = self.load_file("train_file") if self.train_file else []
            val = None  # built anew: a second setup (Trainer.fit, then Trainer.validate) gives the same sets
            if self.val_file:
                val = self.load_file("val_file")[:self.val_items]
            elif self.val_fraction > 0:
                val = [i for i in train if in_val_split(i["prompt"], self.val_fraction)][:self.val_items]
                train = [i for i in train if not in_val_split(i["prompt"], self.val_fraction)]
            if self.train_file:
                if self.filter is not None:  # only the items whose base image the scan found wrong
                    train, rest = self.filter.split(train)
                    rank_zero_info(f"fnf: data.filter keeps {len(train)} of the {len(train) + len(rest)} training "
                                   f"items ({self.filter.scan})")
                    if self.filter.filtered_out == "validate":  # forgetting on what the base model got right
                        val = (val or []) + [i | {"category": FILTERED_OUT} for i in rest]
                self.items["train"] = train
                self.shuffle_seed = self.seed if self.seed is not None else run_seed()  # a restore then overrides it
            if val is not None:
                self.items["val"] = val
        if stage == "test" and self.test_file:
            self.items["test"] = self.load_file("test_file")
        if stage == "predict" and self.predict_file:
            self.items["predict"] = self.load_file("predict_file")
            source = "" if self._predict_key == "predict_file" else f" (data.{self._predict_key}: no data.predict_file)"
            rank_zero_info(f"fnf: predict: {len(self.items['predict'])} items of {self.predict_file}{source}")

    def _loader(self, split: str, key: str, shuffle: bool = False) -> DataLoader:
        if split not in self.items:
            if getattr(self, key) is None:
                raise ValueError(f"no prompts for {split}: set --data.{key}")
            raise RuntimeError(f"PromptDataModule.setup() must run before {split}_dataloader()")
        items = self.items[split]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if not shuffle:  # every item once: Lightning's DistributedSampler would pad with repeats, counted twice
            if world > 1 and len(items) < world:
                raise ValueError(f"{split}: {len(items)} item(s) for {world} processes; each needs one at least")
            sampler = UnrepeatedDistributedSampler(items, world, rank, shuffle=False) if world > 1 else None
            return DataLoader(items, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                              collate_fn=collate)
        sampler = EpochShuffle(len(items), self.shuffle_seed, num_replicas=world, rank=rank)  # this rank's shard
        skip, self._skip_batches = self._skip_batches, 0  # a restored run skips what its epoch already did
        if skip >= -(-len(sampler) // self.batch_size):  # saved at the end of an epoch: the next one starts fresh
            skip = 0
        return ResumableLoader(items, batch_size=self.batch_size, sampler=sampler, skip_batches=skip,
                               num_workers=self.num_workers, collate_fn=collate,
                               generator=torch.Generator().manual_seed(self.shuffle_seed))  # global RNG untouched

    @override
    def state_dict(self) -> dict:
        """Saved in every checkpoint: the shuffle seed and how far the current training epoch got."""
        return {"batches_done_in_epoch": batches_done_in_epoch(self.trainer), "shuffle_seed": self.shuffle_seed}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """A restored run continues its own order, even under another ``seed_everything`` or ``data.seed``."""
        self._skip_batches = int(state_dict.get("batches_done_in_epoch", 0))
        saved = state_dict.get("shuffle_seed")
        if saved is None:  # a checkpoint from before the seed was saved: its order came from data.seed, default 0
            saved = self.seed or 0
        if self.seed is not None and saved != self.seed:
            rank_zero_warn(f"data.seed={self.seed} but the checkpoint's run shuffled with seed {saved}; "
                           "the restored run keeps its order")
        self.shuffle_seed = int(saved)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", "train_file", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        """An empty list (Lightning skips validation in fit) when there is no validation data; ``fnf validate``
        without it is an error, not a run that validates nothing."""
        if "val" in self.items:
            return self._loader("val", "val_file")
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.VALIDATING:
            raise ValueError("no prompts for val: set --data.val_file (or --data.val_fraction with --data.train_file)")
        return []

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", "test_file")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", "predict_file")
