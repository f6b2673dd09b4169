"""fnf.recipe: what a resumed fit must keep, compared key by key with the checkpoint's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace

from fnf.recipe import check_settings, run_recipe


def _config(train_file: str, scan: str = "scan.jsonl") -> Namespace:
    head = Namespace(class_path="A", init_args=Namespace(box=(0.0, 0.0, 0.5, 0.5)))
    return Namespace(model=Namespace(lam=1.0, rewards=[Namespace(head=head, weight=1.0)]),
                     data=Namespace(train_file=train_file, batch_size=2, filter=Namespace(scan=scan, head="A")))


def test_one_prompt_file_however_it_is_spelled_and_processes_as_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SimpleNamespace(num_nodes=2, num_devices=4, accumulate_grad_batches=1,  # devices: auto, resolved
                              gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    relative = run_recipe(_config("p.txt"), trainer)
    absolute = run_recipe(_config(str(tmp_path / "p.txt"), str(tmp_path / "scan.jsonl")))
    assert relative["data"]["train_file"] == absolute["data"]["train_file"] == os.path.join(tmp_path, "p.txt")
    assert relative["data"]["filter"] == absolute["data"]["filter"] == {"scan": os.path.join(tmp_path, "scan.jsonl"),
                                                                         "head": "A"}
    assert relative["trainer"] == {"processes": 8, "accumulate_grad_batches": 1, "gradient_clip_val": 1.0,
                                   "gradient_clip_algorithm": "norm"} and "trainer" not in absolute
    assert relative["model"]["rewards"][0]["head"]["init_args"]["box"] == [0.0, 0.0, 0.5, 0.5]  # as JSON gives it back
    torch.save(relative, tmp_path / "recipe.pt")  # JSON types only: a checkpoint loads with weights_only=True
    assert torch.load(tmp_path / "recipe.pt", weights_only=True) == relative


def test_settings_are_compared_item_by_item_and_a_setting_one_side_lacks_is_newer_code():
    saved = {"model": {"lam": 1.0, "regularizer": None, "rewards": [{"head": {"class_path": "A"}, "weight": 1.0}]}}
    newer = {"model": {"lam": 1.0, "regularizer": None,  # a field added since (name) is not a difference
                       "rewards": [{"head": {"class_path": "A"}, "weight": 1.0, "name": None}]}}
    assert check_settings(newer, saved, "x.ckpt", resuming=True) == []
    reweighted = {"model": {**newer["model"], "rewards": [{"head": {"class_path": "A"}, "weight": 2.0}]}}
    with pytest.raises(ValueError, match=r"^model.rewards.0.weight: 2.0 in the config but 1.0 in x.ckpt; "):
        check_settings(reweighted, saved, "x.ckpt", resuming=True)
    two = {"model": {**newer["model"], "rewards": [*saved["model"]["rewards"], {"head": {"class_path": "B"}}]}}
    with pytest.raises(ValueError, match=r"^model.rewards\[len\]: 2 in the config but 1 in x.ckpt"):
        check_settings(two, saved, "x.ckpt", resuming=True)
    a_class = {"model": {**newer["model"], "regularizer": {"class_path": "L"}}}  # null against a class
    with pytest.raises(ValueError, match=r"^model.regularizer: \{'class_path': 'L'\} in the config but None in"):
        check_settings(a_class, saved, "x.ckpt", resuming=True)
    with pytest.raises(ValueError, match=r"^model.regularizer: None in the config but \{'class_path': 'L'\} in"):
        check_settings(saved, a_class, "x.ckpt", resuming=True)  # and a class against null
    assert check_settings(reweighted, saved, "x.ckpt", resuming=False) == [
        "model.rewards.0.weight=2.0 (trained with 1.0)"]  # evaluation: reported, not refused


def test_the_process_count_is_named_by_the_settings_it_comes_from():
    """The recipe's trainer.processes is no config key: its line names trainer.devices × trainer.num_nodes."""
    with pytest.raises(ValueError) as error:
        check_settings({"trainer": {"processes": 1}}, {"trainer": {"processes": 2}}, "x.ckpt", resuming=True)
    assert str(error.value) == ("trainer.devices × trainer.num_nodes: 1 in the config but 2 in x.ckpt; set it to the "
                                "checkpoint's value or start a new run (leave out --ckpt_path)")


def test_a_head_s_weights_spelled_another_way_are_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"0")
    (tmp_path / "other.safetensors").write_bytes(b"0")

    def recipe(weights: str) -> dict:
        return {"model": {"rewards": [{"head": {"class_path": "H", "init_args": {"weights": weights}}}]}}

    assert check_settings(recipe(str(tmp_path / "w.safetensors")), recipe("w.safetensors"), "x.ckpt", True) == []
    with pytest.raises(ValueError, match="model.rewards.0.head.init_args.weights: 'other.safetensors' in the config"):
        check_settings(recipe("other.safetensors"), recipe("w.safetensors"), "x.ckpt", True)


def test_speed_levers_and_the_base_model_s_place_may_change_on_resume():
    saved = {"model": {"pretrained": "/a", "base_cache": "off", "compute": {"frozen_dtype": "auto"}, "lam": 1.0}}
    moved = {"model": {"pretrained": "/b", "base_cache": "memory", "compute": {"frozen_dtype": "float32"}, "lam": 1.0}}
    assert check_settings(moved, saved, "x.ckpt", resuming=True) == [
        "model.pretrained='/b' (trained with '/a')", "model.base_cache='memory' (trained with 'off')",
        "model.compute.frozen_dtype='float32' (trained with 'auto')"]


def test_a_lora_of_another_model_says_so():
    """A flow model's config with a UNet run's checkpoint: 'set it to the checkpoint's value' would lead on to the
    next error (its target modules do not exist in the other model)."""
    saved = {"model": {"pretrained": "embedded:shapes-t2i", "lora": {"target_modules": ["to_q", "conv1"]}}}
    ours = {"model": {"pretrained": "embedded:shapes-flow", "lora": {"target_modules": ["to_q", "add_q_proj"]}}}
    with pytest.raises(ValueError) as error:
        check_settings(ours, saved, "x.ckpt", resuming=False)
    assert str(error.value) == ("model.lora.target_modules: ['to_q', 'add_q_proj'] in the config but ['to_q', 'conv1'] "
                                "in x.ckpt; the checkpoint's LoRA was trained on "
                                "model.pretrained='embedded:shapes-t2i', the config's is 'embedded:shapes-flow'")
