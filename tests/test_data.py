"""Tests for fnf.data: prompt file parsing, seeding, splits, loaders and errors."""

import json
import logging
import re

import pytest
import torch

from fnf.data import SEED_STRIDE, PromptDataModule
from fnf.prompt_file import PromptFileError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def items(tmp_path, name, text, **kwargs):
    dm = PromptDataModule(train_file=write(tmp_path / name, text), **kwargs)
    dm.setup("fit")
    return dm.items["train"]


def test_txt_skips_blank_and_comment_lines(tmp_path):
    got = items(tmp_path, "p.txt", "# header\na cat\n\n   \n  # note\n  a dog  \n", seed=10)
    assert got == [{"prompt": "a cat", "seed": 10}, {"prompt": "a dog", "seed": 11}]


def test_csv_custom_column_and_optional_seed(tmp_path):
    text = 'id,text,seed\n1,a cat,7\n2,"a dog, running",\n3,a bird,42\n'
    got = items(tmp_path, "p.csv", text, csv_column="text", seed=100)
    assert got == [
        {"prompt": "a cat", "seed": 7},
        {"prompt": "a dog, running", "seed": 101},  # empty cell -> seed + index
        {"prompt": "a bird", "seed": 42},
    ]


def test_crlf_line_endings(tmp_path):
    assert [i["prompt"] for i in items(tmp_path, "p.txt", "a\r\nb\r\n")] == ["a", "b"]
    assert [i["prompt"] for i in items(tmp_path, "p.csv", "prompt\r\na\r\n\"b\r\nc\"\r\n")] == ["a", "b\r\nc"]
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: not valid JSON"):
        items(tmp_path, "p.jsonl", '{"prompt": "a"}\r\n{\r\n')


def test_jsonl_with_and_without_seed(tmp_path):
    lines = [json.dumps({"prompt": "a cat", "seed": 5}), "", json.dumps({"prompt": "a dog", "extra": 1})]
    got = items(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    assert got == [{"prompt": "a cat", "seed": 5}, {"prompt": "a dog", "seed": 1}]


def test_a_seed_of_zero_is_a_seed(tmp_path):
    """0 is a valid x_T seed on any line, not a missing one (which would take data.seed + the line's index)."""
    lines = [json.dumps({"prompt": "a cat", "seed": 4}), json.dumps({"prompt": "a dog", "seed": 0})]
    assert [i["seed"] for i in items(tmp_path, "p.jsonl", "\n".join(lines) + "\n", seed=100)] == [4, 0]
    assert [i["seed"] for i in items(tmp_path, "p.csv", "prompt,seed\na,5\nb,0\n", seed=100)] == [5, 0]


def test_a_checkpoint_of_an_epoch_s_last_batch_resumes_with_a_whole_next_epoch(tmp_path):
    """A run saved after the last batch of an epoch starts the next epoch from its first batch: nothing skipped."""
    dm = PromptDataModule(train_file=write(tmp_path / "p.txt", "".join(f"p{i}\n" for i in range(5))), batch_size=2)
    dm.setup("fit")
    whole = [batch["prompt"] for batch in dm.train_dataloader()]
    for done, expected in ((3, whole), (2, whole[2:]), (1, whole[1:])):  # 5 items of batch 2: 3 batches per epoch
        dm.load_state_dict({"batches_done_in_epoch": done, "shuffle_seed": dm.shuffle_seed})
        assert [batch["prompt"] for batch in dm.train_dataloader()] == expected, done
        # the restored epoch alone skips: a loader built again (reload_dataloaders_every_n_epochs) is whole
        assert [batch["prompt"] for batch in dm.train_dataloader()] == whole, done


def test_seeds_per_prompt_expansion_is_distinct(tmp_path):
    got = items(tmp_path, "p.txt", "a\nb\nc\n", seed=3, seeds_per_prompt=3)
    assert [i["prompt"] for i in got] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert [i["seed"] for i in got[:3]] == [3, 3 + SEED_STRIDE, 3 + 2 * SEED_STRIDE]
    assert len({i["seed"] for i in got}) == len(got)


def test_val_fraction_split_is_deterministic_and_disjoint(tmp_path):
    path = write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(200)))

    def split(**kwargs):
        dm = PromptDataModule(train_file=path, val_fraction=0.25, seeds_per_prompt=2, **kwargs)
        dm.setup("fit")
        return dm.items["train"], dm.items["val"]

    train, val = split()
    assert split() == (train, val)
    train_prompts, val_prompts = {i["prompt"] for i in train}, {i["prompt"] for i in val}
    assert not train_prompts & val_prompts
    assert len(train_prompts | val_prompts) == 200
    assert 20 <= len(val_prompts) <= 80
    # The split depends on the text only, not on the seed.
    assert {i["prompt"] for i in split(seed=999)[1]} == val_prompts


def test_evaluation_splits_give_every_process_its_own_items_once_and_val_items_fixes_their_number(tmp_path):
    """val_items: the first N of val_file whatever the number of processes (limit_val_batches counts per process).
    Two processes: rank r gets items r, r + 2, ... (no repeat to even them out: it would be scored twice), rank 0
    one batch more; fewer items than processes is one line."""
    from types import SimpleNamespace

    val = write(tmp_path / "val.txt", "".join(f"p{n}\n" for n in range(9)))
    module = PromptDataModule(val_file=val, test_file=val, val_items=5, batch_size=2)
    module.setup("validate")
    module.setup("test")
    assert [i["prompt"] for i in module.items["val"]] == ["p0", "p1", "p2", "p3", "p4"]
    assert len(module.items["test"]) == 9  # test prompts are never cut
    shards = []
    for rank in (0, 1):
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shards.append([p for batch in module.val_dataloader() for p in batch["prompt"]])
    assert shards == [["p0", "p2", "p4"], ["p1", "p3"]]
    module.trainer = SimpleNamespace(world_size=6, global_rank=0)
    with pytest.raises(ValueError, match=r"^val: 5 item\(s\) for 6 processes; each needs one at least$"):
        module.val_dataloader()


def test_val_file_takes_precedence_and_predict_falls_back(tmp_path, caplog):
    train = write(tmp_path / "train.txt", "a\nb\n")
    val = write(tmp_path / "val.txt", "v\n")
    dm = PromptDataModule(train_file=train, val_file=val, val_fraction=0.5)
    dm.setup("fit")
    assert [i["prompt"] for i in dm.items["val"]] == ["v"]
    assert len(dm.items["train"]) == 2
    with caplog.at_level(logging.INFO):
        dm.setup("predict")
    assert next(iter(dm.predict_dataloader()))["prompt"] == ["v"]
    assert f"fnf: predict: 1 items of {val} (data.val_file: no data.predict_file)" in caplog.text  # not silently
    test = write(tmp_path / "test.txt", "t\n")
    assert PromptDataModule(val_file=val, test_file=test).predict_file == test


def test_shuffle_order_reproducible_given_seed(tmp_path):
    path = write(tmp_path / "p.txt", "".join(f"p{i}\n" for i in range(32)))

    def order(seed):
        dm = PromptDataModule(train_file=path, seed=seed, batch_size=32)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["prompt"]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(f"p{i}" for i in range(32))


def _fnf_run(config, seed_everything: int, *args: str) -> tuple[list[str], torch.Tensor]:
    """A run built by the CLI as ``fnf fit`` builds it: its first training batch and its LoRA init."""
    from fnf.cli import FnfCLI
    from fnf.module import FocusNFix

    cli = FnfCLI(FocusNFix, PromptDataModule, run=False,
                 args=["--config", str(config), f"--seed_everything={seed_everything}", *args])
    cli.datamodule.setup("fit")
    order = next(iter(cli.datamodule.train_dataloader()))["prompt"]
    lora = torch.cat([p.detach().flatten() for p in cli.model.parameters() if p.requires_grad])
    return order, lora


def test_the_run_seed_drives_data_order_and_lora_init_unless_data_seed_is_given(config, tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored afterwards: the runs below set it process-wide
    prompts = write(tmp_path / "many.txt", "".join(f"prompt {i}\n" for i in range(16)))
    data = [f"--data.train_file={prompts}", "--data.batch_size=16"]
    order_1, lora_1 = _fnf_run(config, 1, *data)
    order_1_again, lora_1_again = _fnf_run(config, 1, *data)
    order_2, lora_2 = _fnf_run(config, 2, *data)
    assert order_1 == order_1_again and torch.equal(lora_1, lora_1_again)  # same seed, same run
    assert order_1 != order_2 and not torch.equal(lora_1, lora_2)  # another seed: another order and init
    assert sorted(order_1) == sorted(order_2)

    fixed_2, fixed_lora_2 = _fnf_run(config, 2, *data, "--data.seed=5")
    fixed_3, fixed_lora_3 = _fnf_run(config, 3, *data, "--data.seed=5")
    assert fixed_2 == fixed_3 != order_2  # an explicit data.seed wins over the run's seed
    assert torch.equal(fixed_lora_2, lora_2) and not torch.equal(fixed_lora_2, fixed_lora_3)  # init: the run seed


def test_default_prompt_seeds_do_not_follow_the_run_seed(tmp_path, monkeypatch):
    """x_T per prompt stays put across runs of different seeds: base and tuned images compare image for image."""
    path = write(tmp_path / "p.txt", "a\nb\n")
    seeds = []
    for run_seed in ("3", "4"):
        monkeypatch.setenv("PL_GLOBAL_SEED", run_seed)
        dm = PromptDataModule(train_file=path, val_file=path)
        dm.setup("fit")
        seeds.append([i["seed"] for i in dm.items["train"] + dm.items["val"]])
        assert dm.shuffle_seed == int(run_seed)
    assert seeds == [[0, 1, 0, 1]] * 2


def test_a_restored_data_module_keeps_the_checkpointed_shuffle_order(tmp_path, monkeypatch):
    path = write(tmp_path / "p.txt", "".join(f"p{i}\n" for i in range(32)))

    def data_module(run_seed: str, **kwargs) -> PromptDataModule:
        monkeypatch.setenv("PL_GLOBAL_SEED", run_seed)
        dm = PromptDataModule(train_file=path, batch_size=32, **kwargs)
        dm.setup("fit")
        return dm

    saved = data_module("7")
    state = saved.state_dict()
    for kwargs in ({}, {"seed": 9}):  # resumed under another seed_everything, or with a data.seed
        restored = data_module("8", **kwargs)
        restored.load_state_dict(state)
        assert next(iter(restored.train_dataloader()))["prompt"] == next(iter(saved.train_dataloader()))["prompt"]
    assert next(iter(data_module("8").train_dataloader()))["prompt"] != next(iter(saved.train_dataloader()))["prompt"]


def test_resuming_under_another_seed_everything_trains_as_the_checkpointed_run(config, tmp_path, monkeypatch):
    """Stop at step 2 (mid-epoch), resume to step 4 with another seed_everything: the same LoRA as 4 straight steps."""
    from fnf.cli import main

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    prompts = write(tmp_path / "five.txt", "".join(f"a red circle top left {i}\n" for i in range(5)))  # 3 batches
    common = ["--config", str(config), f"--data.train_file={prompts}", "--data.val_file=null",
              "--checkpoint.every_n_train_steps=1"]

    def last(run: str) -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                          weights_only=True)["state_dict"]

    main(["fit", *common, "--seed_everything=7", "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path}/a"])
    main(["fit", *common, "--seed_everything=7", "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}/b"])
    main(["fit", *common, "--seed_everything=8", "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path}/b",
          "--ckpt_path", "last"])
    straight, resumed = last("a"), last("b")
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_batches_collate(tmp_path):
    dm = PromptDataModule(test_file=write(tmp_path / "p.txt", "a\nb\nc\n"), batch_size=2, seed=5)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert batches[0]["prompt"] == ["a", "b"] and batches[1]["prompt"] == ["c"]
    assert batches[0]["seed"] == [5, 6]  # plain ints: they stay on the CPU, where x_T is drawn


def test_missing_stage_files(tmp_path):
    dm = PromptDataModule()
    dm.setup("fit")
    with pytest.raises(ValueError, match="--data.train_file"):
        dm.train_dataloader()
    assert dm.val_dataloader() == []
    dm.setup("test")
    with pytest.raises(ValueError, match="--data.test_file"):
        dm.test_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seeds_per_prompt": 0}, "data.seeds_per_prompt must be >= 1, got 0"),
        ({"val_items": 0}, "data.val_items must be >= 1 or null, got 0"),
        ({"val_fraction": 1.5}, re.escape("data.val_fraction must be in [0, 1), got 1.5")),
        ({"val_fraction": -0.1}, "data.val_fraction"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"seed": -1}, "data.seed"),
        ({"csv_column": ""}, "data.csv_column"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule(**kwargs)


BAD_FILES = [
    ("p.txt", "", r"p\.txt: no prompts found"),
    ("p.txt", "# only a comment\n\n", r"p\.txt: no prompts found"),
    ("p.csv", "prompt\n", r"p\.csv: no prompts found"),
    ("p.jsonl", "\n", r"p\.jsonl: no prompts found"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",\n', r"p\.jsonl:2: not valid JSON"),
    ("p.jsonl", '["a"]\n', r"p\.jsonl:1: expected a JSON object"),
    ("p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', r'p\.jsonl:2: no "prompt" key \(keys: text\)'),
    ("p.jsonl", '{"prompt": 3}\n', r"p\.jsonl:1: 'prompt' must be a string"),
    ("p.jsonl", '{"prompt": "a", "seed": "x"}\n', r"p\.jsonl:1: seed must be an integer"),
    ("p.jsonl", '{"prompt": "a", "seed": 1.5}\n', r"p\.jsonl:1: seed must be an integer"),
    ("p.jsonl", '{"prompt": "a", "seed": true}\n', r"p\.jsonl:1: seed must be an integer"),
    ("p.jsonl", '{"prompt": "a", "seed": -1}\n', r"p\.jsonl:1: seed must be an integer in \[0, 2\*\*63\), got -1"),
    ("p.jsonl", '{"prompt": "a", "seed": 9223372036854775808}\n', r"p\.jsonl:1: seed must be an integer in \[0, "),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n', r"p\.jsonl:2: empty prompt"),
    ("p.csv", "text,seed\na,1\n", r"p\.csv: no 'prompt' column .*found columns \['text', 'seed'\]"),
    ("p.csv", "prompt,seed\na,1\n,2\n", r"p\.csv:3: empty prompt"),
    ("p.csv", "prompt,seed\na,x\n", r"p\.csv:2: seed must be an integer"),
    ("p.csv", "prompt\na red circle, top left\n", r'p\.csv:2: 2 cells, the header has 1 columns; quote a prompt that '
                                                     r'contains a comma \("a, b"\)'),  # not "a red circle" alone
    ("p.csv", "prompt,seed\na red circle, top left,3\n", r"p\.csv:2: 3 cells, the header has 2 columns"),
    ("p.yaml", "- a\n", r"p\.yaml: unsupported prompt file type '\.yaml'"),
]


@pytest.mark.parametrize(("name", "text", "match"), BAD_FILES)
def test_bad_files_name_file_and_line(tmp_path, name, text, match):
    dm = PromptDataModule(train_file=write(tmp_path / name, text))
    with pytest.raises(PromptFileError, match=match):
        dm.setup("fit")


def test_missing_file(tmp_path):
    dm = PromptDataModule(val_file=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match=r"^data\.val_file: .*nope\.txt: prompt file not found"):
        dm.setup("validate")  # which of the files: the key


def test_a_folder_is_not_a_prompt_file(tmp_path):
    (tmp_path / "prompts.jsonl").mkdir()
    dm = PromptDataModule(train_file=str(tmp_path / "prompts.jsonl"))
    with pytest.raises(PromptFileError, match=r"prompts\.jsonl: a folder; expected a prompt file"):
        dm.setup("fit")


def test_non_utf8_reports_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a cat\nb dög\n".encode("utf-8") + b"bad \xff byte\n")
    dm = PromptDataModule(train_file=str(path))
    with pytest.raises(PromptFileError, match=r"p\.txt:3: not valid UTF-8"):
        dm.setup("fit")


def test_scan_filter_selects_items_after_the_val_split_and_validates_the_rest(tmp_path):
    """data.filter on a hand-written scan file: per (prompt, seed) item, after the val_fraction hold-out."""
    from fnf.scan_file import FILTERED_OUT, ScanFilter

    train = write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(12)))
    all_items = PromptDataModule(seeds_per_prompt=2).load(train)
    scores = {(i["prompt"], i["seed"]): n / len(all_items) - 0.5 for n, i in enumerate(all_items)}  # -0.5 .. 0.46
    rows = [{"prompt": p, "seed": s, "scores": {"A": v, "B": 0.0}, "mask_area": {"A": max(0.0, -v), "B": None},
             "union_mask_area": max(0.0, -v), "settings": {}} for (p, s), v in scores.items()]
    scan = write(tmp_path / "scan.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    dm = PromptDataModule(train_file=train, seeds_per_prompt=2, val_fraction=0.25,
                          filter=ScanFilter(scan, head="A", score_below=-0.1, filtered_out="validate"))
    dm.setup("fit")
    held_out = [i for i in dm.items["val"] if "category" not in i]  # the val_fraction split, filter or not
    kept = [i for i in all_items if i not in held_out and scores[(i["prompt"], i["seed"])] < -0.1]
    assert dm.items["train"] == kept and 0 < len(kept) < len(all_items) - len(held_out)
    assert [{k: v for k, v in i.items() if k != "category"} for i in dm.items["val"] if i.get("category")] == [
        i for i in all_items if i not in held_out and i not in kept]
    assert {i.get("category") for i in dm.items["val"]} == {None, FILTERED_OUT}
    for stage in ("validate", "fit"):  # Trainer.fit then Trainer.validate on one datamodule: the same sets again
        before = {split: list(items) for split, items in dm.items.items()}
        dm.setup(stage)
        assert dm.items == before
    only_filter = PromptDataModule(train_file=train, seeds_per_prompt=2,  # no hold-out: val is the filtered-out only
                                   filter=ScanFilter(scan, head="A", score_below=-0.1, filtered_out="validate"))
    only_filter.setup("fit")
    once = list(only_filter.items["val"])
    only_filter.setup("validate")
    assert only_filter.items["val"] == once and len(once) > 0
    cut = PromptDataModule(train_file=train, seeds_per_prompt=2, val_fraction=0.25, val_items=2,
                           filter=ScanFilter(scan, head="A", score_below=-0.1, filtered_out="validate"))
    cut.setup("fit")  # val_items cuts the hold-out, not the filtered-out items on top of it
    assert cut.items["val"] == held_out[:2] + [i for i in dm.items["val"] if i.get("category")]
    union = PromptDataModule(train_file=train, seeds_per_prompt=2, filter=ScanFilter(scan, mask_area_above=0.3))
    union.setup("fit")
    assert union.items["train"] == [i for i in all_items if -scores[(i["prompt"], i["seed"])] > 0.3]
    with pytest.raises(ValueError, match=r"^data.filter.mask_area_above: head B has no mask in .* \(mask: none\)"):
        no_mask = ScanFilter(scan, "B", mask_area_above=0.0)
        PromptDataModule(train_file=train, seeds_per_prompt=2, filter=no_mask).setup("fit")
