"""fnf.recipe: what a resumed fit must keep, compared key by key with the checkpoint's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from jsonargparse import Namespace

from fnf.recipe import check_settings, run_recipe


def _config(train_file: str) -> Namespace:
    return Namespace(model=Namespace(lam=1.0, rewards=[Namespace(head=Namespace(class_path="A"), weight=1.0)]),
                     data=Namespace(train_file=train_file, batch_size=2))


def test_one_prompt_file_however_it_is_spelled_and_processes_as_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SimpleNamespace(num_nodes=2, num_devices=4, accumulate_grad_batches=1)  # devices: auto, resolved
    relative, absolute = run_recipe(_config("p.txt"), trainer), run_recipe(_config(str(tmp_path / "p.txt")))
    assert relative["data"]["train_file"] == absolute["data"]["train_file"] == os.path.join(tmp_path, "p.txt")
    assert relative["trainer"] == {"processes": 8, "accumulate_grad_batches": 1} and "trainer" not in absolute


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
    assert check_settings(reweighted, saved, "x.ckpt", resuming=False) == [
        "model.rewards.0.weight=2.0 (trained with 1.0)"]  # evaluation: reported, not refused


def test_a_head_s_weights_spelled_another_way_are_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"0")
    (tmp_path / "other.safetensors").write_bytes(b"0")

    def recipe(weights: str) -> dict:
        return {"model": {"rewards": [{"head": {"class_path": "H", "init_args": {"weights": weights}}}]}}

    assert check_settings(recipe(str(tmp_path / "w.safetensors")), recipe("w.safetensors"), "x.ckpt", True) == []
    with pytest.raises(ValueError, match="model.rewards.0.head.init_args.weights: 'other.safetensors' in the config"):
        check_settings(recipe("other.safetensors"), recipe("w.safetensors"), "x.ckpt", True)
