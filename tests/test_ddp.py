"""DDP (gloo, CPU): ranks train on disjoint items, 2 processes train exactly like 1 with the same global batch, and
a signal to one rank stops every rank after the same step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distributed_fit import fit, free_port, launch  # tests/distributed_fit.py
from fnf.cli import main
from fnf.resume import EpochShuffle
from test_fsdp import FSDP2  # tests/test_fsdp.py


def test_ranks_get_disjoint_shards_that_together_form_the_single_process_batches():
    single = list(EpochShuffle(12, seed=5))
    shards = [list(EpochShuffle(12, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(12))
    per_rank_batch = 2
    for step in range(3):  # global batch of one process (batch 4) == union of the ranks' batches (batch 2 each)
        ranks = {i for shard in shards for i in shard[step * per_rank_batch:(step + 1) * per_rank_batch]}
        assert ranks == set(single[step * 4:(step + 1) * 4])
    uneven = [list(EpochShuffle(5, seed=0, num_replicas=2, rank=r)) for r in range(2)]  # padded: equal batch counts
    assert [len(shard) for shard in uneven] == [3, 3] and set(uneven[0] + uneven[1]) == set(range(5))


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The 1-process, batch-4 run the 2-process tests compare with or start from: its folder and LoRA."""
    tmp = tmp_path_factory.mktemp("one")
    return tmp, fit(tmp, tiny_model_dir, "devices1", batch_size=4)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path, one_process):
    """Equal up to float32 rounding: batch-2 and batch-4 kernels sum in different orders (relative error ~1e-7 per
    op), which the sampling chain and backward pass grow to ~1e-5 of B (measured 1.1e-5); the bound 1e-3·‖B‖
    leaves 100x room, while gradients summed instead of averaged (2x), a rank's half of the batch lost, or a 10%
    error in the update all fail it (an absolute 1e-5 on weights of 1e-4 let a 10% error pass)."""
    one = one_process[1]
    two = fit(tmp_path, tiny_model_dir, "devices2", batch_size=2, devices=2, strategy="ddp", callbacks=[  # counts bytes
        {"class_path": "ddp_probe.WriteReducedBytes", "init_args": {"folder": str(tmp_path / "devices2")}},
        {"class_path": "ddp_probe.DivergeRanksRng"}])
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        if "lora_B" in name:  # B starts at zero: B is the update, ~1e-4 after 3 steps
            error = (two[name] - one[name]).norm() / one[name].norm()
            assert one[name].norm() > 0 and error <= 1e-3, f"{name}: ‖B_ddp − B_single‖ = {error:.1e}·‖B_single‖"
        else:  # A moves by weight decay (identical in both) and a gradient step ∝ B of ~1e-7·‖A‖: float32 resolution
            torch.testing.assert_close(two[name], one[name], rtol=1e-6, atol=0, msg=name)
    # every rank's RNG states in the checkpoint rank 0 wrote, each its own (a resumed rank continues its own stream)
    states = torch.load(next((tmp_path / "devices2" / "checkpoints").glob("*.ckpt")),
                        weights_only=True)["rng_states_per_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    lora_bytes = sum(t.numel() * t.element_size() for t in one.values())
    for rank in (0, 1):  # only LoRA gradients are synchronised, once per step: frozen weights never travel
        assert int((tmp_path / "devices2" / f"reduced-rank{rank}.txt").read_text()) == 3 * lora_bytes


def test_two_process_evaluation_equals_one_process(tmp_path, one_process):
    """torchmetrics states sum across ranks: ``fnf test`` gives the same table and the same test_samples/ (the
    first save_samples items: 2 from rank 0, 1 from rank 1) with 1 or 2 processes, also for a prompt count the ranks do not divide (Lightning's sampler would pad rank 1 with a
    repeat of prompt 0, counted twice). Other batch shapes round differently: the LoRA changes pixels by ~2e-5, so
    near-identical images' PSNR moves by ~1e-4 relative; the padded repeat moved all_psnr by 1.2e-3."""
    trained = one_process[0]  # a LoRA that changes the images: non-trivial metrics
    checkpoint = next((trained / "devices1" / "checkpoints").glob("*.ckpt"))
    prompts = tmp_path / "seven.txt"  # 4 + 3 per rank
    prompts.write_text("".join((trained / "prompts.txt").read_text().splitlines(keepends=True)[:7]))
    tables, samples = [], []
    for devices in (1, 2):
        config = yaml.safe_load((trained / "devices1.yaml").read_text())
        config["data"]["test_file"] = str(prompts)
        config["trainer"] |= {"devices": devices, "strategy": "ddp" if devices > 1 else "auto", "callbacks": [
            {"class_path": "fnf.evaluation.Evaluation",
             "init_args": {"output_dir": str(tmp_path / f"eval{devices}"), "save_samples": 3}}]}  # 2 + 1 per rank
        path = tmp_path / f"test{devices}.yaml"
        path.write_text(yaml.safe_dump(config))
        command = ["test", "--config", str(path), "--ckpt_path", str(checkpoint)]
        if devices == 1:  # in this process (an fnf process takes ~10 s to start)
            main(command)
        else:
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-m", "fnf.cli", *command], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            assert "sync_dist=True" not in done.stderr  # Lightning's advice, for values torchmetrics reduced already
        tables.append(json.loads((tmp_path / f"eval{devices}" / "test_metrics.json").read_text()))
        samples.append(json.loads((tmp_path / f"eval{devices}" / "test_samples" / "samples.json").read_text()))
    assert [(s["prompt"], s["seed"]) for s in samples[1]] == [(s["prompt"], s["seed"]) for s in samples[0]]
    assert len(samples[0]) == 3 and [s["mean_abs_change"] for s in samples[1]] == pytest.approx(
        [s["mean_abs_change"] for s in samples[0]], rel=1e-2)  # ~2e-5: batch 2 vs 4 rounding is 0.2%
    assert tables[0].keys() == tables[1].keys()
    assert tables[0]["outside_psnr"] < 150  # the LoRA changed the images
    items = [[json.loads(line) for line in (tmp_path / f"eval{d}" / "test_items.jsonl").read_text().splitlines()]
             for d in (1, 2)]
    assert [(r["prompt"], r["seed"]) for r in items[1]] == [(r["prompt"], r["seed"]) for r in items[0]]  # 7, in order
    assert [(s["prompt"], s["seed"]) for s in samples[0]] == [(r["prompt"], r["seed"]) for r in items[0][:3]]
    assert [r["outside_sq_error"] for r in items[1]] == pytest.approx([r["outside_sq_error"] for r in items[0]],
                                                                      rel=1e-2)
    for name, value in tables[0].items():
        assert tables[1][name] == pytest.approx(value, rel=1e-3, abs=1e-6), name


@pytest.mark.parametrize("signal_name, code, rank", [  # two processes per case: ~30 s each
    ("SIGTERM", 143, 1),  # the case that crashed with Lightning's own handler
    pytest.param("SIGUSR1", 138, 1, marks=pytest.mark.slow), pytest.param("SIGTERM", 143, 0, marks=pytest.mark.slow)])
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_model_dir, tmp_path, signal_name, code, rank):
    """A cluster may signal one node only: one rank gets it (rank 1: Lightning's per-batch check reads rank 0's
    flag only, and its handler broadcasts from rank 1 alone), yet every rank must finish the step, write one
    last.ckpt and exit 128 + the signal, not crash or hang."""
    kill = {"class_path": "kill_switch.KillAtStep", "init_args": {"step": 2, "signal": signal_name, "rank": rank}}
    done = launch(tmp_path, tiny_model_dir, "preempted", batch_size=2, timeout=300, devices=2, strategy="ddp",
                  max_steps=6, callbacks=[kill])
    assert done.returncode == code, done.stderr[-3000:]
    assert f"fnf: {signal_name}: saved" in done.stderr
    last = tmp_path / "preempted" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the step running when the signal came, finished


@pytest.mark.parametrize("strategy", ["ddp", pytest.param(FSDP2, marks=pytest.mark.slow, id="fsdp2")])
def test_a_non_finite_reward_on_one_rank_skips_the_step_on_every_rank(tiny_model_dir, tmp_path, strategy):
    """model.nonfinite: skip under DDP and FSDP2 (Lightning refuses a None training step there): rank 0's reward is
    NaN in step 1; both ranks skip that step together (rank 1's values were finite), its update is dropped (AdamW
    with weight decay: a zero gradient would still move the weights) and the run trains on."""
    from safetensors.torch import load_file

    probes = [{"class_path": "ddp_probe.WriteLoraAfterEachStep", "init_args": {"folder": str(tmp_path)}}]
    args = ("--model.nonfinite", "skip", "--model.rewards",
            '[{"head": {"class_path": "ddp_probe.NaNAtStep1", "init_args": {"rank": 0}}}]',
            "--model.optimizer", '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.1}}')
    done = launch(tmp_path, tiny_model_dir, "skip", batch_size=2, args=args, timeout=300, devices=2, strategy=strategy,
                  callbacks=probes)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping batch at step 1: non-finite reward NaNAtStep1" in done.stderr
    lora = {(rank, step): load_file(tmp_path / f"lora-rank{rank}-step{step}.safetensors")
            for rank in (0, 1) for step in (1, 2, 3)}  # global_step after each batch: after steps 0, 1 (skipped), 2
    for name in lora[0, 1]:
        for rank in (0, 1):
            assert torch.equal(lora[rank, 2][name], lora[rank, 1][name]), (rank, name)  # step 1: no update
            assert torch.equal(lora[rank, 3][name], lora[0, 3][name]), (rank, name)  # the ranks agree
    assert any(not torch.equal(lora[0, 3][name], lora[0, 2][name]) for name in lora[0, 1])  # step 2 trained
    assert "skipping batch at step 1: non-finite values on another process of the run" in done.stderr  # rank 1


def test_two_process_predict_writes_each_item_once_in_file_order(tmp_path, one_process):
    """Each rank writes its own items' images under names from the prompt file (so ranks never collide, even when
    every prompt has the same seed), and prompts.tsv lists every item once, in the file's order."""
    trained = one_process[0]
    checkpoint = next((trained / "devices1" / "checkpoints").glob("*.ckpt"))
    lines = (trained / "prompts.txt").read_text().splitlines()[:5]  # 3 + 2 per rank
    prompts = tmp_path / "one_seed.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": line, "seed": 0}) + "\n" for line in lines))
    config = yaml.safe_load((trained / "devices1.yaml").read_text())
    config["data"]["predict_file"] = str(prompts)
    config["trainer"] |= {"devices": 2, "strategy": "ddp"}
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fnf.cli", "predict", "--config", str(path), "--ckpt_path",
                           str(checkpoint), "--predict_writer.output_dir", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [f"{i:05d}_0.png" for i in range(5)]
    assert (tmp_path / "out" / "prompts.tsv").read_text().splitlines() == [
        "file\tseed\tprompt", *[f"{name}\t0\t{line}" for name, line in zip(names, lines)]]
    for kind in ("tuned", "base"):
        assert sorted(p.name for p in (tmp_path / "out" / kind).iterdir()) == names
