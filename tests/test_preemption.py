"""Preemption: SIGTERM, SIGUSR1 and Ctrl-C finish the step, save last.ckpt and exit 128 + the signal, and the run
resumes exactly; a second Ctrl-C stops at once (130); signals in validation, mid-accumulation and the sanity check."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fnf.cli import main
from fnf.export import WEIGHT_NAME
from test_resume import TESTS, _config, _fnf  # tests/test_resume.py


@pytest.mark.parametrize("signal_name, code, resume", [  # SIGUSR1 takes SIGTERM's path: with --runslow
    ("SIGTERM", 143, "last"), pytest.param("SIGUSR1", 138, "auto", marks=pytest.mark.slow), ("SIGINT", 130, "last")])
def test_preemption_saves_the_step_exits_128_plus_the_signal_and_resumes_exactly(tiny_model_dir, tmp_path,
                                                                                  uninterrupted_run, signal_name,
                                                                                  code, resume):
    """SIGTERM (a cluster reclaiming the node), SIGUSR1 (SLURM's time-limit warning) and a first Ctrl-C; no scheduled
    checkpoint before step 100, so the one on disk is the preemption one. ``auto`` is what a requeued job script
    runs. (The resume runs in this process: only the signalled run needs one of its own.)"""
    preempted = _fnf("fit", "--config", str(_config(tmp_path, tiny_model_dir, "resumed", 4, signal_name, every=100)),
                     "--ckpt_path", "auto")  # nothing to resume yet: a new run
    assert preempted.returncode == code, preempted.stderr[-2000:]
    last = tmp_path / "resumed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5  # the step running when the signal came, finished
    assert f"fnf: {signal_name}: saved" in preempted.stderr
    main(["fit", "--config", str(_config(tmp_path, tiny_model_dir, "resumed", None, every=100)), "--ckpt_path", resume])
    expected, got = (load_file(run / "lightning_logs" / "version_0" / "lora" / WEIGHT_NAME)
                     for run in (uninterrupted_run, tmp_path / "resumed"))  # the LoRA each run exports when it ends
    assert expected.keys() == got.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_signal_during_validation_stops_it_saves_the_last_step_and_resumes_exactly(tiny_model_dir, tmp_path):
    """Validation inside fit (3 batches after every 2 training batches) can outlast a grace period: the run stops
    after the validation batch running when SIGTERM came, with the last training step saved, and resumes exactly."""
    def config(run: str, kill: bool) -> Path:
        path = _config(tmp_path, tiny_model_dir, run, 4 if kill else None, "SIGTERM", every=100)
        data = yaml.safe_load(path.read_text())
        val = tmp_path / "val.txt"
        val.write_text("a green square\na red circle bottom\na blue square top\na green circle left\na red square\n")
        data["data"]["val_file"] = str(val)  # 3 validation batches of 2, 2, 1
        data["trainer"] |= {"val_check_interval": 2, "num_sanity_val_steps": 0}
        if kill:
            data["trainer"]["callbacks"][0]["init_args"]["validation"] = True
        path.write_text(yaml.safe_dump(data))
        return path

    main(["fit", "--config", str(config("straight", kill=False))])  # in this process: only the stopped run needs one
    preempted = _fnf("fit", "--config", str(config("resumed", kill=True)))
    assert preempted.returncode == 143, preempted.stderr[-2000:]
    step = int(preempted.stderr.split("kill_switch: SIGTERM in validation after step ")[1].split()[0])
    assert "started after the signal" not in preempted.stderr  # validation stopped after its batch 1
    last = tmp_path / "resumed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step >= 4
    assert f"fnf: SIGTERM: saved {last} at step {step}" in preempted.stderr
    main(["fit", "--config", str(config("resumed", kill=False)), "--ckpt_path", "last"])  # in this process
    expected, got = (load_file(tmp_path / run / "lightning_logs" / "version_0" / "lora" / WEIGHT_NAME)
                     for run in ("straight", "resumed"))
    assert expected.keys() == got.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("batch_idx, saved", [(0, False), (1, True)], ids=["mid-accumulation", "optimizer-step"])
def test_a_signal_mid_accumulation_keeps_the_previous_checkpoint(tmp_path, batch_idx, saved):
    """With gradient accumulation, a checkpoint written between optimizer steps would lose the accumulated partial
    gradients: the run stops, but last.ckpt is written only after a batch that completed an optimizer step."""
    from fnf.preemption import PreemptionCheckpoint

    written = []
    trainer = SimpleNamespace(
        accumulate_grad_batches=2, world_size=1, global_step=3, _signal_connector=SimpleNamespace(received_sigterm=False),
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path), CHECKPOINT_NAME_LAST="last", FILE_EXTENSION=".ckpt"),
        save_checkpoint=lambda path, weights_only=None: written.append((path, weights_only)))
    callback = PreemptionCheckpoint()
    callback._pending = signal.SIGTERM
    callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert trainer._signal_connector.received_sigterm  # the run stops after this batch either way
    assert written == ([(tmp_path / "last.ckpt", False)] if saved else [])  # a full checkpoint (optimizer too)


def test_sigusr1_slurms_warning_is_noted_from_the_fits_start_and_its_handler_restored(capfd):
    """SLURM's ``--signal=USR1@120`` may come while the model loads or validates before training: noted from
    on_fit_start (the end-to-end SIGUSR1 run is --runslow); teardown puts the previous handler back."""
    from fnf.preemption import PreemptionCheckpoint

    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        callback = PreemptionCheckpoint()
        callback.on_fit_start(SimpleNamespace(is_global_zero=True), None)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback._pending == signal.SIGUSR1
        assert "fnf: SIGUSR1: stopping after the current training step, with last.ckpt" in capfd.readouterr().err
        callback.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_second_ctrl_c_interrupts_at_once_and_the_handlers_are_restored(capfd):
    from fnf.preemption import PreemptionCheckpoint

    before, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # Lightning restores SIGTERM
    trainer = SimpleNamespace(is_global_zero=True)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even for a background suite
        callback = PreemptionCheckpoint()
        callback.on_fit_start(trainer, None)
        callback.on_train_start(trainer, None)
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted and said at once, the step finishes
        assert callback._pending == signal.SIGINT
        assert capfd.readouterr().err == ("\nfnf: SIGINT: stopping after the current training step, with last.ckpt; "
                                          "Ctrl-C again stops at once\n")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        callback.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's: Ctrl-C to the group must not stop it
        callback.on_fit_start(trainer, None)
        callback.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        callback.teardown(None, None, "fit")
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_stops_the_run_at_once_with_exit_code_130(config, tmp_path, monkeypatch):
    """Lightning ends a run interrupted by KeyboardInterrupt with exit code 1; a script must still see Ctrl-C's 130.
    The step in progress is not finished: last.ckpt stays the scheduled one."""
    monkeypatch.syspath_prepend(str(TESTS))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even for a background suite
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "1",
                  "--trainer.callbacks+=kill_switch.KillAtStep", "--trainer.callbacks.step=2",
                  "--trainer.callbacks.signal=SIGINT", "--trainer.callbacks.times=2"])
    finally:
        signal.signal(signal.SIGINT, before)
    assert exit_info.value.code == 130
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_a_signal_in_the_sanity_check_waits_for_training_and_only_rank_0_says_so(capfd):
    """Lightning's sanity check runs before training: no step to save yet, so the signal stays pending (the run
    stops after its first step). Every rank of a node gets a terminal's Ctrl-C: rank 0 alone announces it."""
    from fnf.preemption import PreemptionCheckpoint

    sigterm = signal.getsignal(signal.SIGTERM)
    trainer = SimpleNamespace(is_global_zero=False, world_size=1, sanity_checking=True,
                              state=SimpleNamespace(fn="fit"), _signal_connector=SimpleNamespace(received_sigterm=False),
                              checkpoint_callback=None)
    try:
        callback = PreemptionCheckpoint()
        callback.on_fit_start(trainer, None)
        callback.on_train_start(trainer, None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert callback._pending == signal.SIGTERM and capfd.readouterr().err == ""  # rank 1: noted, not said
        callback.on_validation_batch_end(trainer, None, None, None, 0)
        assert not trainer._signal_connector.received_sigterm and callback._pending == signal.SIGTERM
        trainer.sanity_checking = False
        callback.on_validation_batch_end(trainer, None, None, None, 0)  # validation inside fit: stops there
        assert trainer._signal_connector.received_sigterm
        callback.teardown(None, None, "fit")
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_sigterm_unwinds_a_starting_run_until_lightning_installs_its_own_handler():
    """Behind Lightning's handler (it keeps the one it finds as the next in line) the unwinding steps aside, so
    Lightning's stop-after-the-batch stands in its loops (rahf-train, evaluation); off the main thread, where
    signal handlers cannot be set, it changes nothing."""
    import threading

    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    from fnf.commands import sigterm_unwinds

    sigterm, noted = signal.getsignal(signal.SIGTERM), []
    try:
        with sigterm_unwinds(until_lightning=True):
            with pytest.raises(SystemExit) as exit_info:
                os.kill(os.getpid(), signal.SIGTERM)  # while the run starts
            assert exit_info.value.code == 143
            lightning = _HandlersCompose([lambda signum, frame: noted.append(signum), signal.getsignal(signal.SIGTERM)])
            signal.signal(signal.SIGTERM, lightning)  # as Lightning's run loop installs it
            os.kill(os.getpid(), signal.SIGTERM)
            assert noted == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is sigterm
        failures = []

        def in_a_thread():
            try:
                with sigterm_unwinds(until_lightning=True):
                    pass
            except Exception as error:  # noqa: BLE001 (reported below)
                failures.append(error)

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        assert failures == []
    finally:
        signal.signal(signal.SIGTERM, sigterm)
