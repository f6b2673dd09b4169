"""Exact resume (kill -9, then --ckpt_path last), --ckpt_path last / auto and given checkpoints, and checkpoints
that are complete or absent. Run folders and their locks: tests/test_run_folders.py."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fnf.checkpoint_io import AtomicCheckpointIO
from fnf.cli import main
from fnf.export import WEIGHT_NAME
from fnf.resume import EpochShuffle, ResumableLoader, find_last

TESTS = Path(__file__).parent


def test_epoch_order_depends_on_seed_and_epoch_only():
    sampler = EpochShuffle(10, seed=3)
    sampler.set_epoch(2)
    fresh = EpochShuffle(10, seed=3)
    fresh.set_epoch(2)
    assert list(sampler) == list(fresh) and sorted(sampler) == list(range(10))
    fresh.set_epoch(1)
    assert list(fresh) != list(sampler)


def test_loader_skips_lazily_after_the_epoch_is_set():
    sampler = EpochShuffle(8, seed=0)
    loader = ResumableLoader(list(range(8)), batch_size=2, sampler=sampler, skip_batches=3)
    iterator = iter(loader)  # Lightning creates the iterator before it sets the epoch
    sampler.set_epoch(5)
    sampler_copy = EpochShuffle(8, seed=0)
    sampler_copy.set_epoch(5)
    assert torch.cat(list(iterator)).tolist() == list(sampler_copy)[6:]  # batch 4 of epoch 5 only
    assert len(torch.cat(list(loader))) == 8  # the skip applies once


def _config(tmp_path: Path, model: str, run: str, kill_at: int | None, kill_signal: str = "SIGKILL",
            every: int = 1) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle top left\na blue square bottom right\na green circle\na red square\na blue circle\n")
    kill = {"class_path": "kill_switch.KillAtStep", "init_args": {"step": kill_at, "signal": kill_signal}}
    callbacks = [] if kill_at is None else [kill]
    config = {
        "seed_everything": 7,
        "model": {"pretrained": model, "lam": 0.1, "lora": {"rank": 4, "dropout": 0.1},
                  "sampler": {"num_steps": 3, "grad_mode": "lv", "lv_samples": 2},  # random re-noising: RNG matters
                  "rewards": [{"head": {"class_path": "ColorRegion"}, "mask": "heatmap"}]},
        "data": {"train_file": str(prompts), "batch_size": 2},  # 3 batches per epoch
        "trainer": {"max_steps": 7, "default_root_dir": str(tmp_path / run), "enable_progress_bar": False,
                    "callbacks": callbacks},  # the default TensorBoard logger: one version folder per run
        "checkpoint": {"every_n_train_steps": every},
    }
    path = tmp_path / f"{run}-{kill_at}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fnf(*args: str) -> subprocess.CompletedProcess:
    """``fnf`` in a subprocess with Ctrl-C's default action, even when this suite runs as a background job (whose
    processes start with SIGINT ignored, which fnf leaves ignored)."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "fnf.cli", *args], env=env, capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 7
    return checkpoint["state_dict"]


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, uninterrupted_run,
                                                                  caplog):
    """The README's recipe: the same command plus ``--ckpt_path last``, which continues the run's own folder; and a
    finished run extended to more steps. (Only the killed run needs a process of its own.)"""
    killed = _fnf("fit", "--config", str(_config(tmp_path, tiny_model_dir, "resumed", 4)))  # step 4: epoch 1, batch 1
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "resumed" / "lightning_logs" / "version_0"
    assert not list((run / "checkpoints").glob("*.tmp"))
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(_config(tmp_path, tiny_model_dir, "resumed", None)), "--ckpt_path", "last"])
    assert f"fnf: resuming from {run / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # logs, checkpoints and LoRA stay together
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()

    expected, got = _lora(uninterrupted_run), _lora(tmp_path / "resumed")
    assert expected.keys() == got.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)

    # A finished run extended: 4 steps (mid-epoch 1, no periodic checkpoint there), then --ckpt_path last to 7. Its
    # final checkpoint is the one of its last batch, so the extension continues epoch 1 where the run stopped (one
    # saved after the loop had ended its epoch started a new epoch's order and skipped its first batch).
    extended = _config(tmp_path, tiny_model_dir, "extended", None, every=50)
    main(["fit", "--config", str(extended), "--trainer.max_steps", "4"])
    main(["fit", "--config", str(extended), "--ckpt_path", "last"])
    got = _lora(tmp_path / "extended")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_resuming_a_complete_run_says_so_and_restores_a_missing_lora_export(config, tmp_path, caplog):
    main(["fit", "--config", str(config)])
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    exported = load_file(run / "lora" / WEIGHT_NAME)
    shutil.rmtree(run / "lora")  # as if killed between the last checkpoint and the export
    with pytest.raises(SystemExit) as exit_info, caplog.at_level("INFO"):
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert not exit_info.value.code  # a complete run is not an error
    assert (f"fnf: {run / 'checkpoints' / 'last.ckpt'} is already at max_steps=2; nothing to train. "
            f"LoRA: {run / 'lora'}") in caplog.text
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]
    again = load_file(run / "lora" / WEIGHT_NAME)
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    elsewhere = tmp_path / "exports" / "artifacts"  # a run with lora_export.dirpath: restored there, not in <run>/lora
    shutil.rmtree(run / "lora")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", "last", "--lora_export.dirpath", str(elsewhere)])
    assert not exit_info.value.code and not (run / "lora").exists()
    again = load_file(elsewhere / WEIGHT_NAME)
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


def test_last_ckpt_is_the_final_step_and_stays_one_file_across_resumes(config, tmp_path, monkeypatch):
    """max_steps 3 with a checkpoint every 2 steps: last.ckpt is step 3, the step the LoRA export holds (Lightning
    keeps step 2); a preempted and resumed run keeps writing that one file (no last-v1.ckpt beside it)."""
    monkeypatch.syspath_prepend(str(TESTS))
    main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "2"])
    checkpoints = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "5"])
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 5


def test_a_given_last_ckpt_continues_its_run_and_any_other_checkpoint_starts_a_new_one(config, tmp_path,
                                                                                       monkeypatch, caplog):
    """--ckpt_path <run>/checkpoints/last.ckpt is --ckpt_path last spelled out: same folder, same lock. A checkpoint
    of an earlier step, a run outside trainer.default_root_dir or a last.ckpt outside a run's checkpoints folder is a
    starting point: a new version folder, said in one line."""
    main(["fit", "--config", str(config), "--trainer.max_steps", "1"])
    logs = tmp_path / "run" / "lightning_logs"
    last = logs / "version_0" / "checkpoints" / "last.ckpt"
    earlier = shutil.copy(last, last.with_name("step=1.ckpt"))
    outside = tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"
    outside.parent.mkdir(parents=True)
    shutil.copy(last, outside)
    backup = tmp_path / "run" / "backup" / "last.ckpt"
    backup.parent.mkdir()
    shutil.copy(last, backup)
    monkeypatch.chdir(tmp_path)  # a relative path names the same run
    main(["fit", "--config", str(config), "--ckpt_path", str(last.relative_to(tmp_path)), "--trainer.max_steps", "2"])
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    assert torch.load(last, weights_only=True)["global_step"] == 2
    for start, version in ((earlier, 1), (outside, 2), (backup, 3)):
        caplog.clear()
        with caplog.at_level("INFO"):
            main(["fit", "--config", str(config), "--ckpt_path", str(start), "--trainer.max_steps", "2"])
        assert f"fnf: a new run from {start}" in caplog.text
        assert torch.load(logs / f"version_{version}" / "checkpoints" / "last.ckpt",
                          weights_only=True)["global_step"] == 2
        assert torch.load(start, weights_only=True)["global_step"] == 1  # the run it came from stays as it was
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_a_relative_root_is_continued_in_its_own_folder(config, tmp_path, monkeypatch):
    """default_root_dir relative (as the configs' runs/<task>): --ckpt_path last continues version_0, not a new one."""
    monkeypatch.chdir(tmp_path)
    for steps, resume in (("1", []), ("2", ["--ckpt_path", "last"])):
        main(["fit", "--config", str(config), "--trainer.default_root_dir", "relative", "--trainer.max_steps", steps,
              *resume])
    logs = tmp_path / "relative" / "lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    assert torch.load(logs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_resume_continues_the_one_unfinished_run_of_its_root_and_refuses_two(config, tmp_path):
    """Runs one after another in one root: last / auto continue the run short of max_steps, not the newest one.
    Jobs of an array sharing a root leave several unfinished runs: a resume would pick any, so it is refused."""
    main(["fit", "--config", str(config), "--trainer.max_steps", "1"])  # version_0: step 1, a preempted run
    main(["fit", "--config", str(config), "--trainer.max_steps", "2"])  # version_1: finished at step 2 (newest)
    main(["fit", "--config", str(config), "--ckpt_path", "auto", "--trainer.max_steps", "2"])
    steps = [torch.load(tmp_path / "run" / "lightning_logs" / f"version_{v}" / "checkpoints" / "last.ckpt",
                        weights_only=True)["global_step"] for v in (0, 1)]
    assert steps == [2, 2]  # version_0 continued
    for value in ("last", "auto"):  # now both are short of 3
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--ckpt_path", value, "--trainer.max_steps", "3"])
        message = str(exit_info.value.code)
        assert message.startswith(f"fnf: error: --ckpt_path last / auto: {tmp_path / 'run'} (trainer.default_root_dir) "
                                  "holds 2 unfinished runs (") and "default_root_dir of its own" in message, message


def test_a_foreign_checkpoint_at_max_steps_is_refused_not_exported(config, tmp_path):
    """A Lightning checkpoint of another model, past max_steps: not 'complete', and no untrained LoRA written."""
    foreign = tmp_path / "other" / "checkpoints" / "foreign.ckpt"
    foreign.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0", "global_step": 99},
               foreign)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", str(foreign)])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: ckpt_path: the checkpoint holds no LoRA weights") and "\n" not in message
    assert not (tmp_path / "other" / "lora").exists()


def test_resume_last_without_a_checkpoint_is_one_line(config, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: --ckpt_path last: no last.ckpt under") and "\n" not in message
    assert not (tmp_path / "run" / "lightning_logs").exists()  # nothing started, nothing left behind


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {}, "step": torch.tensor(1)}, path)

    def disk_full(obj, target):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {}, "step": torch.tensor(2)}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no staging file left behind


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ValueError, match="ckpt_path: cannot read .*broken.ckpt as a checkpoint: truncated or not a torch checkpoint"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="ckpt_path: checkpoint .*missing.ckpt not found"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def _checkpoints(root: Path, steps: dict[str, object]) -> dict[str, Path]:
    """Fake ``<root>/lightning_logs/<version>/checkpoints/last.ckpt`` files holding a step (or bytes: a torn file),
    written in the order given (the later, the newer)."""
    paths = {}
    for n, (version, step) in enumerate(steps.items()):
        path = root / "lightning_logs" / version / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        if isinstance(step, bytes):
            path.write_bytes(step)
        else:
            torch.save({"global_step": step}, path)
        os.utime(path, (1_000_000 + n, 1_000_000 + n))
        paths[version] = path
    return paths


def test_last_finds_the_newest_run_by_time_and_counts_torn_or_unbounded_runs_unfinished(tmp_path):
    done = _checkpoints(tmp_path / "a", {"version_9": 5, "version_10": 5})  # version_10 newer, though "smaller"
    assert find_last(tmp_path / "a", required=True, max_steps=5) == str(done["version_10"])
    assert find_last(tmp_path / "a", required=True) == str(done["version_10"])  # evaluation: the newest
    torn = _checkpoints(tmp_path / "b", {"version_0": b"\x00torn", "version_1": 5})
    assert find_last(tmp_path / "b", required=True, max_steps=5) == str(torn["version_0"])  # said when loaded
    _checkpoints(tmp_path / "c", {"version_0": 5, "version_1": 7})
    with pytest.raises(ValueError, match="holds 2 unfinished runs"):  # max_steps -1: no run is ever finished
        find_last(tmp_path / "c", required=True, max_steps=-1)


def test_an_unbounded_run_resumes_instead_of_counting_as_complete(config, tmp_path):
    """max_steps -1 (epochs bound the run): a checkpoint at any step is not 'already at max_steps'."""
    main(["fit", "--config", str(config)])  # 2 steps: one epoch of 4 prompts in batches of 2
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "-1",
          "--trainer.max_epochs", "2"])
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_evaluation_takes_the_newest_checkpoint_and_needs_one(config, tmp_path, monkeypatch):
    """fnf test --ckpt_path last / auto: the newest last.ckpt, whatever runs are unfinished (nothing is trained);
    auto with none is an error (there is no new run to start)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(config), "--ckpt_path", "auto"])
    assert str(exit_info.value.code).startswith("fnf: error: --ckpt_path last: no last.ckpt under")
    assert "train first (fnf fit), or give a checkpoint's path" in str(exit_info.value.code)
    for _ in range(2):  # two runs short of the config's max_steps: a fit would refuse to pick one
        main(["fit", "--config", str(config), "--trainer.max_steps", "1"])
    import fnf.cli

    found = []
    monkeypatch.setattr(fnf.cli, "find_last", lambda *a, **k: found.append(find_last(*a, **k)) or found[-1])
    main(["test", "--config", str(config), "--data.test_file", str(tmp_path / "prompts.txt"), "--ckpt_path", "last"])
    assert found == [str(tmp_path / "run" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")]


def test_a_dry_run_writes_no_checkpoint(config, tmp_path):
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=true"])  # nothing to resume from
    assert not list((tmp_path / "run").rglob("*.ckpt"))
