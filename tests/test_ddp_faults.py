"""A DDP rank dies mid-run (kill -9, CPU / gloo): the survivor stops with one clear line in bounded time instead of
hanging in a collective, and ``--ckpt_path last`` finishes the run exactly as if nothing had happened. A run refused
on rank 0 (its folder locked by another fit) stops every rank, also ranks started on their own (srun, torchrun)."""

from __future__ import annotations

import time

import pytest
import torch

from distributed_fit import launch, launch_each_rank  # tests/distributed_fit.py

# A collective timeout bounds the wait for a rank that hangs without dying (torch's default: 30 minutes); a rank
# that dies is noticed at once (its connections close), as this test shows.
TIMEOUT_S = 300  # the collective timeout: a survivor that waited for it would take at least this long
STOPS_WITHIN_S = 120  # the crashed run, start-up included, must end well before it
DDP = dict(devices=2, max_steps=5, strategy={"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                             "init_args": {"timeout": f"0:{TIMEOUT_S // 60:02d}:00"}})
EVERY_STEP = ("--checkpoint.every_n_train_steps", "1")


@pytest.mark.slow  # ~60 s: three 2-process fits
def test_a_killed_rank_stops_the_run_with_one_line_and_last_resumes_exactly(tiny_model_dir, tmp_path):
    straight = launch(tmp_path, tiny_model_dir, "straight", 2, EVERY_STEP, **DDP)
    assert straight.returncode == 0, straight.stderr[-3000:]

    kill_rank_1 = {"class_path": "kill_switch.KillAtStep", "init_args": {"step": 3, "rank": 1}}
    started = time.monotonic()
    crashed = launch(tmp_path, tiny_model_dir, "resumed", 2, EVERY_STEP, timeout=TIMEOUT_S + 60,
                     callbacks=[kill_rank_1], **DDP)
    assert time.monotonic() - started < STOPS_WITHIN_S  # noticed when the dead rank's connections closed
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    last_line = crashed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("fnf: error: a training process stopped") and "--ckpt_path last" in last_line, \
        crashed.stderr[-3000:]
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3

    resumed = launch(tmp_path, tiny_model_dir, "resumed", 2, (*EVERY_STEP, "--ckpt_path", "last"), **DDP)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
                     for run in ("straight", "resumed"))
    assert expected["global_step"] == got["global_step"] == 5
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, rtol=0, atol=1e-7, msg=name)


def _every_rank_stops_with(tmp_path, ranks: list, expected: str) -> None:
    """Each rank started on its own ends at once (not at the process group's timeout) with ``expected`` as its
    last line."""
    started = time.monotonic()
    try:
        errors = [rank.communicate(timeout=TIMEOUT_S + 60)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert time.monotonic() - started < STOPS_WITHIN_S
    for rank, error in zip(ranks, errors):
        assert rank.returncode == 1, error[-3000:]
        assert error.strip().splitlines()[-1].startswith(expected), error[-3000:]


@pytest.mark.parametrize("error, reported", [
    (torch.distributed.DistNetworkError("Broken pipe"), "Broken pipe"),  # the store, as the processes connect
    (RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]: Connection reset by peer. More"),
     "Read error [127.0.0.1]: Connection reset by peer")])  # a collective, mid-run
def test_a_lost_process_reads_as_one_line_saying_so(error, reported):
    """The launcher stopped by a SIGTERM while its processes connect: the others read DistNetworkError: Broken pipe
    (it read as an unexplained error), as a collective mid-run reads gloo's Connection reset by peer."""
    from fnf.errors import one_line

    assert one_line(error) == (f"a training process stopped ({reported}); the first error in the processes' output "
                               "is the cause; --ckpt_path last resumes from the last checkpoint, if one was written")


def test_a_locked_run_folder_stops_every_rank_started_on_its_own(tiny_model_dir, tmp_path):
    """Ranks started by srun / torchrun (no Lightning launcher): rank 0 is refused the run folder's lock, and the
    other rank stops with it at once instead of waiting for rank 0 until the process group's timeout."""
    from fnf.run_claims import lock_run_folder

    held = lock_run_folder(tmp_path / "run")  # another fit trains in this folder
    try:
        _every_rank_stops_with(tmp_path, launch_each_rank(tmp_path, tiny_model_dir, "run", 2, **DDP),
                               f"fnf: error: {tmp_path / 'run'}: another fnf fit is training here (it holds "
                               f"{tmp_path / 'run' / '.fnf.lock'}); wait for it to end, or stop it first")
    finally:
        held.close()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".fnf.lock"]  # nothing written into the other's folder


@pytest.mark.slow  # ~25 s of two ranks; the locked-folder case above runs the same guard in every make test
def test_a_run_folder_rank_0_cannot_claim_stops_every_rank_started_on_its_own(tiny_model_dir, tmp_path):
    """Rank 0 alone claims the run's version folder, before the process group exists: with its error (here an
    unwritable root) rank 0 joins the process group, writing nothing, and every rank stops there with its line
    instead of waiting for rank 0."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ranks = launch_each_rank(tmp_path, tiny_model_dir, "run", 2, default_root_dir=str(blocker / "run"), logger=True,
                             **DDP)
    _every_rank_stops_with(tmp_path, ranks, "fnf: error: trainer.default_root_dir (or the logger's save_dir): cannot "
                                            f"write to {blocker / 'run' / 'lightning_logs'}")
