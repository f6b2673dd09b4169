"""Run folders: every run gets a version folder of its own, even when runs start together in one root; a run
folder in use is locked against a second fit; a run that fails before training leaves no folders behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fnf.cli import main
from fnf.export import WEIGHT_NAME
from test_resume import TESTS, _config  # tests/test_resume.py


def test_version_folders_are_claimed_even_when_two_runs_list_the_same_free_number(tmp_path):
    """The race itself, made certain: both loggers' listings say version_0 is free (Lightning would give both
    runs version_0); the exclusive mkdir gives the second run version_1."""

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from fnf.run_claims import claim_version_folder

    loggers = [TensorBoardLogger(tmp_path), TensorBoardLogger(tmp_path), CSVLogger(tmp_path / "csv")]
    for logger in loggers:
        logger._get_next_version = lambda: 0
    for logger in loggers:
        claim_version_folder(SimpleNamespace(global_rank=0, loggers=[logger]))
    assert [logger.version for logger in loggers] == [0, 1, 0]
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_loggers_of_one_run_sharing_a_save_dir_share_its_version_folder(tmp_path):

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from fnf.run_claims import claim_version_folder

    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)  # an earlier run
    loggers = [TensorBoardLogger(tmp_path), CSVLogger(tmp_path)]
    claimed = claim_version_folder(SimpleNamespace(global_rank=0, loggers=loggers))
    assert [logger.version for logger in loggers] == [1, 1] and claimed == tmp_path / "lightning_logs" / "version_1"
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_two_fits_started_together_get_their_own_folders(tiny_model_dir, tmp_path):
    """Same root, same moment (a sweep): two version folders, each run's LoRA equal to the same run alone."""
    def start(run: str, lam: float) -> subprocess.Popen:
        config = _config(tmp_path, tiny_model_dir, run, None, every=100)
        data = yaml.safe_load(config.read_text())
        data["trainer"] |= {"default_root_dir": str(tmp_path / "shared"), "max_steps": 2}
        data["model"]["lam"] = lam
        config.write_text(yaml.safe_dump(data))
        env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        return subprocess.Popen([sys.executable, "-m", "fnf.cli", "fit", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    runs = [start("a", 0.0), start("b", 0.5)]
    assert all(run.wait(timeout=600) == 0 for run in runs), [run.stderr.read()[-2000:] for run in runs]
    folders = sorted((tmp_path / "shared" / "lightning_logs").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    loras = {yaml.safe_load((f / "config.yaml").read_text())["model"]["lam"]: load_file(f / "lora" / WEIGHT_NAME)
             for f in folders}
    assert sorted(loras) == [0.0, 0.5]  # each folder holds one run's config and that run's LoRA
    for lam in (0.0, 0.5):  # each alone, one after the other (in this process: no start-up to pay again)
        config = _config(tmp_path, tiny_model_dir, f"alone-{lam}", None, every=100)
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "shared"),
              "--trainer.max_steps", "2", "--model.lam", str(lam)])
    # the solo runs went to the same root, versions 2 and 3, in that order
    for version, lam in ((2, 0.0), (3, 0.5)):
        solo = load_file(tmp_path / "shared" / "lightning_logs" / f"version_{version}" / "lora" / WEIGHT_NAME)
        for name in solo:
            torch.testing.assert_close(loras[lam][name], solo[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("logger", [True, False], ids=["version-folder", "no-logger"])
def test_a_run_folder_in_use_is_not_resumed_by_a_second_process(config, tmp_path, monkeypatch, logger):
    """A requeued job whose predecessor still runs: its --ckpt_path last is refused while the folder is locked,
    and resumes once the other run has ended (the lock goes with its process, however it ends). Without a logger
    the checkpoints' folder is the root's, and a new run locks the same folder a resume would."""
    from fnf.run_claims import lock_run_folder

    monkeypatch.syspath_prepend(str(TESTS))
    main(["fit", "--config", str(config), "--trainer.logger", str(logger).lower(),
          "--trainer.callbacks+=kill_switch.ExpectRunFolderLocked"])  # a new run holds the lock while it trains
    run = tmp_path / "run" / ("lightning_logs/version_0" if logger else "")
    other_run = lock_run_folder(run)  # what a still running fit holds
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3", "--trainer.logger",
              str(logger).lower()])
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # refused before writing (logs, config)
    assert str(exit_info.value.code) == (f"fnf: error: {run}: another fnf fit is training here (it holds "
                                         f"{run / '.fnf.lock'}); wait for it to end, or stop it first")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    other_run.close()
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3", "--trainer.logger",
          str(logger).lower()])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_checkpoints_in_a_dirpath_of_their_own_resume_in_one_command_and_lock_only_their_folder(config, tmp_path,
                                                                                                 monkeypatch):
    """A sweep putting each run's checkpoints side by side (``checkpoint.dirpath: ckpts/<run>``): ``--ckpt_path last``
    and ``auto`` find the run's last.ckpt there (they looked under default_root_dir only: last failed, auto started
    over and overwrote it), and a run locks its own dirpath, not the parent every run of the sweep shares; a resume
    removes the staging files of writes its predecessor was killed in (checkpoint, logs, LoRA export)."""
    from fnf.run_claims import lock_run_folder

    monkeypatch.chdir(tmp_path)  # a relative dirpath, as a sweep's config would give it

    def fit(run: str, *extra: str) -> None:
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / run),
              "--checkpoint.dirpath", f"ckpts/{run}", "--data.val_file", "null", *extra])

    fit("a")
    other_run = lock_run_folder(tmp_path / "ckpts" / "a")  # run a still trains: run b of the sweep is not held up
    fit("b")
    other_run.close()
    (tmp_path / "ckpts" / "a" / ".last.ckpt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # killed mid-save
    logs = tmp_path / "a" / "lightning_logs" / "version_0"
    (logs / ".metrics.csv.k1ll3d.tmp").write_text("half a file")  # killed mid-write of its logs and its export
    (logs / ".lora.k1ll3d.tmp").mkdir()
    (logs / ".lora.k1ll3d.tmp" / WEIGHT_NAME).write_bytes(b"half a LoRA")
    (logs / "notes.tmp").write_text("the user's")  # not a staging file
    for step, how in ((3, "last"), (4, "auto")):
        fit("a", "--ckpt_path", how, "--trainer.max_steps", str(step))
        assert torch.load(tmp_path / "ckpts" / "a" / "last.ckpt", weights_only=True)["global_step"] == step
    assert sorted(p.name for p in (tmp_path / "ckpts" / "a").iterdir()) == [".fnf.lock", "last.ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["a", "b"]  # no lock on the sweep's folder
    assert [p.name for p in (tmp_path / "a" / "lightning_logs").iterdir()] == ["version_0"]  # its logs continued
    assert not list(logs.glob(".*.tmp")) and (logs / "notes.tmp").is_file()
    held = lock_run_folder(tmp_path / "ckpts" / "a")
    with pytest.raises(SystemExit, match="another fnf fit is training here"):  # a second resume of run a is refused
        fit("a", "--ckpt_path", "last", "--trainer.max_steps", "5")
    held.close()
    export = tmp_path / "a" / "lightning_logs" / "version_0" / "lora"
    shutil.rmtree(export)  # killed between its last checkpoint and its export; the requeued job finds it complete
    with pytest.raises(SystemExit) as exit_info:  # nothing to train: the export, then exit 0
        fit("a", "--ckpt_path", "auto", "--trainer.max_steps", "4")
    assert exit_info.value.code == 0
    assert (export / WEIGHT_NAME).is_file() and not (tmp_path / "ckpts" / "lora").exists()  # the run's, not beside


@pytest.mark.parametrize("where, key", [
    (("--checkpoint.dirpath", "ckpts"), "checkpoint.dirpath"),  # a sweep's folder reused by accident
    (("--trainer.logger", "CSVLogger", "--trainer.logger.init_args.save_dir", "run",  # under the root: last finds it
      "--trainer.logger.init_args.version", "myrun"), "trainer.logger's version"),  # a job's fixed folder
    (("--trainer.logger", "false"), "trainer.default_root_dir")], ids=["dirpath", "named-version", "no-logger"])
def test_a_new_run_does_not_overwrite_an_earlier_runs_checkpoints(config, tmp_path, monkeypatch, where, key):
    """The lock keeps out a run training now; a new fit started later into the same checkpoint folder would replace
    the earlier run's last.ckpt (its progress no longer reachable by --ckpt_path last) and, in a named version folder,
    append its rows to that run's metrics.csv: refused with one line, nothing written."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(config), *where])
    checkpoints = next(tmp_path.rglob("last.ckpt")).parent
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.lam", "0", *where])
    assert str(exit_info.value.code) == (f"fnf: error: {key}: {checkpoints} holds another run's checkpoints "
                                         "(last.ckpt); continue that run with --ckpt_path last, or start this one in "
                                         "a folder of its own")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3", *where])  # as it says
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_named_version_folder_with_an_earlier_runs_logs_is_refused(config, tmp_path):
    """A run that stopped before its first checkpoint left only logs: a new run would append to its metrics.csv."""
    logger = ("--trainer.logger", "CSVLogger", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
              "--trainer.logger.init_args.version", "myrun")
    folder = tmp_path / "logs" / "lightning_logs" / "myrun"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *logger])
    assert str(exit_info.value.code) == (f"fnf: error: trainer.logger's version: {folder} holds another run's logs; "
                                         "continue that run with --ckpt_path last, or choose another version")
    assert (folder / "metrics.csv").read_text() == "epoch,step,train/loss\n0,0,1.0\n"


def test_a_second_auto_start_before_the_first_checkpoint_is_refused(config, tmp_path, monkeypatch):
    """Two ``--ckpt_path auto`` finding no checkpoint (a requeued job racing its predecessor within its first
    checkpoint interval) would train two runs, and every later ``auto`` would refuse the root's two unfinished runs:
    the one starting over holds the root's auto lock, and the other is refused before it writes anything."""
    from fnf.run_claims import AUTO_LOCK, lock_run_folder

    monkeypatch.syspath_prepend(str(TESTS))
    with pytest.raises(SystemExit):  # a start that fails before training leaves no root with only the auto lock
        main(["fit", "--config", str(config), "--ckpt_path", "auto", "--trainer.default_root_dir",
              str(tmp_path / "new" / "root"), "--trainer.callbacks+=kill_switch.RaiseAtStep",
              "--trainer.callbacks.step=0"])
    assert not (tmp_path / "new").exists()
    root = tmp_path / "run"
    first = lock_run_folder(root, name=AUTO_LOCK)  # the predecessor, still before its first checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", "auto"])
    assert "another fnf fit is training here" in str(exit_info.value.code) and AUTO_LOCK in str(exit_info.value.code)
    assert [p.name for p in root.iterdir()] == [AUTO_LOCK]  # no version folder claimed
    first.close()
    main(["fit", "--config", str(config), "--ckpt_path", "auto"])  # it ended: this one starts the run
    lock_run_folder(root, name=AUTO_LOCK).close()  # and released the root's lock with its run's when it ended
    main(["fit", "--config", str(config), "--ckpt_path", "auto", "--trainer.max_steps", "3"])  # and continues it
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
    assert torch.load(root / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_a_fit_that_fails_after_training_keeps_its_logs_and_one_that_fails_before_leaves_nothing(config, tmp_path,
                                                                                               monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    for step in (0, 1):  # the first run fails before training: nothing left, not even the root it created
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config), "--trainer.callbacks+=kill_switch.RaiseAtStep",
                  f"--trainer.callbacks.step={step}"])
        assert (tmp_path / "run").exists() == (step == 1)
    assert any((tmp_path / "run" / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--trainer.callbacks+=kill_switch.RaiseAtStep",
              "--trainer.callbacks.step=0"])
    assert [p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()] == ["version_0"]
    (tmp_path / "empty").mkdir()  # the user's own empty folder stays; the parents a run created go with it
    for root in ("a/b/run", "empty"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config), "--trainer.callbacks+=kill_switch.RaiseAtStep",
                  "--trainer.callbacks.step=0", "--trainer.default_root_dir", str(tmp_path / root)])
    assert not (tmp_path / "a").exists() and not any((tmp_path / "empty").iterdir())



def test_a_sigterm_while_the_run_starts_exits_143_and_leaves_no_run_folder(config, tmp_path, monkeypatch):
    """A job cancelled after its run folder is claimed but before training starts (device placement, the sanity
    check: minutes for a large model) would leave an empty version folder holding .fnf.lock if SIGTERM ended the
    process on the spot; it unwinds instead, like a failed start."""
    import signal

    from fnf.module import FocusNFix

    def cancelled_while_starting(self):
        assert any((tmp_path / "run").rglob(".fnf.lock"))  # the run folder is claimed by now
        os.kill(os.getpid(), signal.SIGTERM)

    def process_killed(signum, frame):  # what SIGTERM's default action would do: end the process, unwinding nothing
        raise AssertionError("SIGTERM reached the process's own handler")

    monkeypatch.setattr(FocusNFix, "on_fit_start", cancelled_while_starting, raising=False)
    previous = signal.signal(signal.SIGTERM, process_killed)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config)])
        assert signal.getsignal(signal.SIGTERM) is process_killed  # handed back after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 143
    assert not (tmp_path / "run").exists()
