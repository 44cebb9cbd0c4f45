"""Restarts that must be exact or refused, through the real commands (``fairseq-train``, ``slurm.train``,
``slurm.launch``) on ``xl_tiny`` / ``linear_tiny`` and a 5 kB byte corpus (``plugins/resume.py``,
``plugins/checkpointing.py``, ``slurm/``):

- a finished run started again stays finished: one line, exit 0, every file byte-identical (also
  through ``slurm.train`` with SIGUSR2 after the last update, and through the launcher's ``--resume``
  of a sweep stopped during its evaluation);
- a kill during the first save (``checkpoint_last.pt`` not written yet): the restart resumes from the
  intact interval checkpoint and ends bitwise equal to an uninterrupted run;
- a non-finite checkpoint (exploding learning rate) is never published as ``checkpoint_last.pt``, and a
  restart resumes from the newest finite one;
- two trainings on one ``--save-dir``: the second stops with one ``error:`` line naming the first; the
  launcher's training dies with the launcher;
- changed settings on resume: training-only ones go on silently, the stream layout or the memory give
  one warning line and keep the data position in tokens, another model is refused with one line.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import byte_corpus_bin

from plugins.checkpointing import load_checkpoint_safely

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BASE = {
    "--task": "segment_lm", "--arch": "xl_tiny", "--criterion": "aux_cross_entropy", "--tokens-per-sample": "32",
    "--mem-len": "32", "--batch-size": "4", "--optimizer": "adam", "--lr": "0.003", "--seed": "11",
    "--num-workers": "0", "--log-format": "simple", "--log-interval": "1", "--max-update": "20",
    "--save-interval-updates": "10",
}  # fmt: skip
pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory):
    """5 kB of the embedded corpus as bytes: 41 batches of 4 x 32 per epoch."""
    return byte_corpus_bin(tmp_path_factory.mktemp("resume"), scale=0.0025)


def command(data: Path, save_dir: Path, tool: str = "fairseq-train", **changes) -> list:
    options = {**BASE, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    head = [str(Path(sys.executable).parent / "fairseq-train")] if tool == "fairseq-train" else [sys.executable, "-m", tool]  # fmt: skip
    args = [a for k, v in options.items() if v is not None for a in ((k,) if v is True else (k, str(v)))]
    return [*head, str(data), "--user-dir", str(ROOT / "plugins"), "--cpu", *args, "--save-dir", str(save_dir)]


def train(data, save_dir, tool="fairseq-train", **changes) -> subprocess.CompletedProcess:
    return subprocess.run(command(data, save_dir, tool, **changes), capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)  # fmt: skip


def out(proc) -> str:
    return proc.stdout + proc.stderr


def files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def updates_in(path: Path) -> int:
    return load_checkpoint_safely(str(path))["optimizer_history"][-1]["num_updates"]


def loaded(output: str):
    found = re.search(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", output)
    return (found.group(1), int(found.group(2))) if found else (None, None)


def nonfinite(path) -> bool:
    """NaN/inf in the validation loss or a parameter of a checkpoint (written plainly, independent of the plugin)."""
    state = load_checkpoint_safely(str(path))
    val_loss = state["extra_state"].get("val_loss")
    params = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    return (val_loss is not None and val_loss != val_loss) or not all(torch.isfinite(v).all() for v in params)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint_safely(str(a))["model"], load_checkpoint_safely(str(b))["model"]
    return x.keys() == y.keys() and all(not torch.is_tensor(v) or torch.equal(v, y[k]) for k, v in x.items())


@pytest.fixture(scope="module")
def finished_run(byte_corpus, tmp_path_factory):
    """An uninterrupted run of 20 updates (the reference), checkpoints at 10 and 20."""
    save_dir = tmp_path_factory.mktemp("finished") / "ckpt"
    proc = train(byte_corpus, save_dir)
    assert proc.returncode == 0, out(proc)[-3000:]
    return save_dir


# ---- 1. a finished run stays finished ------------------------------------------------------------
def test_finished_run_started_again_changes_nothing(byte_corpus, finished_run, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(finished_run, save_dir)
    before = files(save_dir)
    for tool in ("fairseq-train", "slurm.train"):
        proc = train(byte_corpus, save_dir, tool)
        assert proc.returncode == 0, out(proc)[-3000:]
        lines = [line for line in out(proc).splitlines() if "finished already" in line]
        assert len(lines) == 1 and "update 20" in lines[0] and "--max-update is 20" in lines[0], lines
        assert "num_updates: 21" not in out(proc) and "Saved checkpoint" not in out(proc)
        assert files(save_dir) == before  # byte-identical, names included
    # raising --max-update trains on
    proc = train(byte_corpus, save_dir, max_update=21)
    assert proc.returncode == 0 and updates_in(save_dir / "checkpoint_last.pt") == 21, out(proc)[-3000:]


def test_sigusr2_after_the_last_update_is_not_a_preemption(byte_corpus, tmp_path):
    """Slurm's stop signal arriving while the last update is validated and saved: the run has finished,
    so slurm.train exits 0 (not 75, which requeues the job), and the requeued command changes nothing."""
    save_dir, log = tmp_path / "ckpt", tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(command(byte_corpus, save_dir, "slurm.train", max_update=10), stdout=f,
                                stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)  # fmt: skip
    while proc.poll() is None and "Stopping training due to num_updates: 10" not in log.read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR2)
    code = proc.wait(timeout=120)
    text = log.read_text()
    assert "SIGUSR2: finishing this update" in text, "the signal came too late to test anything"
    assert code == 0, text[-3000:]
    assert updates_in(save_dir / "checkpoint_last.pt") == 10
    before = files(save_dir)
    again = train(byte_corpus, save_dir, "slurm.train", max_update=10)
    assert again.returncode == 0 and "finished already" in out(again), out(again)[-3000:]
    assert files(save_dir) == before


TINY_EXPERIMENT = {
    "description": "one tiny run",
    "arch": "full_tiny",
    "train": {"tokens-per-sample": 32, "batch-size": 4, "optimizer": "adam", "lr": 0.003, "max-update": 8,
              "save-interval-updates": 4, "validate-interval-updates": 4, "log-interval": 2, "seed": 3,
              "cpu": True, "num-workers": 0, "no-epoch-checkpoints": True},
    "resources": {"cpus_per_task": 1, "time_min": 10},
}  # fmt: skip


def launch(*args, wait=True):
    command = [sys.executable, "-m", "slurm.launch", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def test_launcher_resume_after_a_stop_during_evaluation_evaluates_the_same_checkpoint(byte_corpus, tmp_path):
    """A sweep stopped during its evaluation step (no eval.json yet), rerun with --resume: the trained
    run is not trained again, and the evaluation of its intact best checkpoint gives the same number."""
    exp = tmp_path / "tiny.yaml"
    exp.write_text(yaml.safe_dump({**TINY_EXPERIMENT, "data": str(byte_corpus)}, sort_keys=False))
    first = launch(exp, "--runs-dir", tmp_path / "runs")
    assert first.returncode == 0, out(first)[-3000:]
    run = tmp_path / "runs" / "base"
    result = json.loads((run / "eval.json").read_text())
    checkpoints = files(run / "checkpoints")
    (run / "eval.json").unlink()  # what a kill during fairseq-eval-lm leaves: no eval.json
    (run / "eval.log").unlink()
    second = launch(exp, "--runs-dir", tmp_path / "runs", "--resume")
    assert second.returncode == 0, out(second)[-3000:]
    assert f"done: test bpb {result['value']:.4f}" in second.stdout, second.stdout
    assert json.loads((run / "eval.json").read_text())["value"] == result["value"]
    assert files(run / "checkpoints") == checkpoints
    assert "finished already" in (run / "train.log").read_text()


# ---- 2. a kill during the first save ------------------------------------------------------------
def test_restart_after_a_kill_during_the_first_save_resumes_from_the_interval_checkpoint(
    byte_corpus, finished_run, tmp_path
):
    """The first save writes checkpoint_1_10.pt, then copies it to checkpoint_best.pt and
    checkpoint_last.pt: a kill between the two leaves the interval checkpoint (and maybe a .tmp) only."""
    save_dir = tmp_path / "ckpt"
    proc = train(byte_corpus, save_dir, max_update=10)
    assert proc.returncode == 0, out(proc)[-3000:]
    for name in ("checkpoint_last.pt", "checkpoint_last.prev.pt", "checkpoint_best.pt"):
        (save_dir / name).unlink(missing_ok=True)
    (save_dir / "checkpoint_last.pt.tmp").write_bytes(b"PK\x03\x04 interrupted copy")
    assert sorted(p.name for p in save_dir.glob("*.pt")) == ["checkpoint_1_10.pt"]
    proc = train(byte_corpus, save_dir)
    assert proc.returncode == 0, out(proc)[-3000:]
    assert "No existing checkpoint found" not in out(proc)
    assert loaded(out(proc)) == (str(save_dir / "checkpoint_1_10.pt"), 10), out(proc)[-3000:]
    warnings = [line for line in out(proc).splitlines() if "checkpoint_last.pt is missing" in line]
    assert len(warnings) == 1 and "resuming from" in warnings[0], warnings
    assert updates_in(save_dir / "checkpoint_last.pt") == 20
    assert same_weights(save_dir / "checkpoint_last.pt", finished_run / "checkpoint_last.pt")  # bitwise


# ---- 7. a non-finite checkpoint is never the one to resume from -----------------------------------
def test_a_nonfinite_checkpoint_is_not_published_as_last_nor_resumed_from(byte_corpus, tmp_path):
    """--lr 0.003 for epoch 1 (11 updates of 16 x 32), then 1e37: update 12 sends the weights to ~1e37, its
    validation loss is NaN, and update 13 stops with "gradients are Nan/Inf". Every update is saved."""
    save_dir = tmp_path / "ckpt"
    exploding = dict(batch_size=16, batch_size_valid=4, lr="0.003,1e37", lr_scheduler="fixed", max_update=20, save_interval_updates=1,
                     validate_interval_updates=1, keep_interval_updates=1)  # fmt: skip
    proc = train(byte_corpus, save_dir, **exploding)
    assert proc.returncode != 0 and "gradients are Nan/Inf" in out(proc), out(proc)[-3000:]
    nan_saves = [p for p in save_dir.glob("checkpoint_*_*.pt") if nonfinite(p)]
    assert nan_saves, "the run never saved a non-finite checkpoint: nothing tested"
    last = save_dir / "checkpoint_last.pt"
    assert not nonfinite(last) and updates_in(last) == 11
    lines = [line for line in out(proc).splitlines() if "not publishing" in line]
    assert len(lines) == 1 and "non-finite" in lines[0] and "stays at update 11" in lines[0], lines

    proc = train(byte_corpus, save_dir, **exploding)  # the same command: resumes from the finite checkpoint
    assert loaded(out(proc)) == (str(last), 11), out(proc)[-3000:]
    # a checkpoint_last.pt that is non-finite (as fairseq alone publishes it): the restart skips it
    shutil.copyfile(nan_saves[0], last)
    proc = train(byte_corpus, save_dir, **exploding)
    path, updates = loaded(out(proc))
    assert path != str(last) and updates == 11 and not nonfinite(path), out(proc)[-3000:]
    warnings = [line for line in out(proc).splitlines() if "checkpoint_last.pt is non-finite" in line]
    assert len(warnings) == 1 and "resuming from" in warnings[0], warnings


# ---- 3. one training per save directory ----------------------------------------------------------
def _wait_for_lock(save_dir: Path, proc, timeout=120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lock = save_dir / ".train.lock"
        if lock.exists() and lock.read_text().strip():
            return lock.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"no training took the lock of {save_dir}")


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_second_training_on_the_same_save_dir_is_refused(byte_corpus, tmp_path):
    save_dir = tmp_path / "ckpt"
    first = subprocess.Popen(command(byte_corpus, save_dir, max_update=100000), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)  # fmt: skip
    try:
        holder = _wait_for_lock(save_dir, first)
        assert holder.startswith(f"pid {first.pid} on host ")
        second = train(byte_corpus, save_dir, lr=0.001)  # would replace the first's checkpoints
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode != 0 and len(errors) == 1, out(second)[-3000:]
        assert f"pid {first.pid} on host" in errors[0] and "another --save-dir" in errors[0], errors
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # the lock goes with its process, however it ends
    again = train(byte_corpus, save_dir, max_update=1)
    assert again.returncode == 0, out(again)[-3000:]


def test_the_launchers_training_dies_with_the_launcher(byte_corpus, tmp_path):
    exp = tmp_path / "long.yaml"
    spec = {**TINY_EXPERIMENT, "data": str(byte_corpus)}
    spec["train"] = {**spec["train"], "max-update": 100000}
    exp.write_text(yaml.safe_dump(spec, sort_keys=False))
    launcher = launch(exp, "--runs-dir", tmp_path / "runs", wait=False)
    try:
        holder = _wait_for_lock(tmp_path / "runs" / "base" / "checkpoints", launcher)
    finally:
        launcher.kill()
        launcher.wait()
    child = int(re.match(r"pid (\d+)", holder).group(1))
    deadline = time.monotonic() + 30
    while not _dead(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _dead(child):
        os.kill(child, signal.SIGKILL)
        raise AssertionError(f"the training (pid {child}) outlived its launcher")


# ---- 4. changed settings on resume ---------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_at_10(byte_corpus, tmp_path_factory):
    """xl_tiny with memory, stopped after update 10 (mid-epoch: stream offset 320 of 32-token segments)."""
    save_dir = tmp_path_factory.mktemp("stopped") / "ckpt"
    proc = train(byte_corpus, save_dir, max_update=10)
    assert proc.returncode == 0, out(proc)[-3000:]
    return save_dir


def _resume_with(byte_corpus, stopped_at_10, tmp_path, **changes):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(stopped_at_10, save_dir)
    proc = train(byte_corpus, save_dir, **{"max_update": 11, **changes})
    assert proc.returncode == 0, out(proc)[-3000:]
    warnings = [line for line in out(proc).splitlines() if "resuming" in line and "with" in line]
    return proc, warnings, load_checkpoint_safely(str(save_dir / "checkpoint_last.pt"))


def test_training_only_changes_resume_silently(byte_corpus, stopped_at_10, tmp_path):
    proc, warnings, state = _resume_with(byte_corpus, stopped_at_10, tmp_path, lr=0.001, dropout=0.1)
    assert loaded(out(proc))[1] == 10 and warnings == []
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 11


def test_other_segment_length_keeps_the_data_position_in_tokens(byte_corpus, stopped_at_10, tmp_path):
    """10 segments of 32 = offset 320; with 64-token segments the run continues at segment 5 (offset 320),
    where fairseq alone would continue at segment 10 (offset 640: 320 tokens per stream skipped)."""
    proc, warnings, state = _resume_with(byte_corpus, stopped_at_10, tmp_path, tokens_per_sample=64)
    assert len(warnings) == 1, out(proc)[-3000:]
    assert "--tokens-per-sample 64 (saved: 32)" in warnings[0] and "memory is reset" in warnings[0]
    assert "stream offset 320" in warnings[0] and "none skipped" in warnings[0], warnings
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 5 + 1


def test_other_batch_size_restarts_the_epoch(byte_corpus, stopped_at_10, tmp_path):
    proc, warnings, state = _resume_with(byte_corpus, stopped_at_10, tmp_path, batch_size=8)
    assert len(warnings) == 1 and "8 streams" in warnings[0] and "memory is reset" in warnings[0], out(proc)[-3000:]
    assert "restarts at its beginning" in warnings[0]
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 1


def test_other_memory_length_resets_the_memory(byte_corpus, stopped_at_10, tmp_path):
    proc, warnings, state = _resume_with(byte_corpus, stopped_at_10, tmp_path, mem_len=16)
    assert len(warnings) == 1 and "--mem-len 16 (saved: 32)" in warnings[0], out(proc)[-3000:]
    assert "memory is reset" in warnings[0]
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 11  # the data position is unchanged
    memory = state["model"]["decoder._extra_state"]["train_memory"]["layers"]
    assert all(layer["hidden"].size(1) <= 16 for layer in memory), [layer["hidden"].shape for layer in memory]


def test_another_model_is_refused_with_one_line(byte_corpus, tmp_path):
    save_dir = tmp_path / "ckpt"
    proc = train(byte_corpus, save_dir, arch="linear_tiny", mem_len=None, max_update=2)
    assert proc.returncode == 0, out(proc)[-3000:]
    before = files(save_dir)
    for arch, attention in (("full_tiny", "full"), ("xl_tiny", "relative")):  # same tensor shapes / other shapes
        proc = train(byte_corpus, save_dir, arch=arch, mem_len=None, max_update=4)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, out(proc)[-3000:]
        assert f"--attention: linear saved, {attention} asked" in errors[0], errors
        assert "Resume it with its settings (--attention linear" in errors[0] and "another --save-dir" in errors[0]
        assert files(save_dir) == before
    # a start from these weights in a new directory (--restore-file) is the user's choice: one warning line
    proc = train(byte_corpus, tmp_path / "converted", arch="full_tiny", mem_len=None, max_update=1,
                 restore_file=save_dir / "checkpoint_last.pt", reset_optimizer=True, reset_dataloader=True)  # fmt: skip
    assert proc.returncode == 0, out(proc)[-3000:]
    warnings = [line for line in out(proc).splitlines() if "holds another model" in line]
    assert len(warnings) == 1 and "loading its weights into the model asked for" in warnings[0], warnings


def test_the_wall_clock_continues_after_a_resume(byte_corpus, stopped_at_10, tmp_path):
    """fairseq saves its ``wall`` stopwatch without the running time and loads it stopped, so a resumed run
    logs ``wall=0`` on every line (``plugins/wall_clock.py``). The checkpoint now holds how long the clock had
    run, and the resumed run's wall goes on from there."""
    saved = load_checkpoint_safely(str(stopped_at_10 / "checkpoint_last.pt"))["extra_state"]["metrics"]
    running = [state.get("running_s", 0.0) for _, key, _, state in saved["default"] if key == "wall"]
    assert len(running) == 1 and running[0] > 0, saved["default"]
    proc, _, resumed = _resume_with(byte_corpus, stopped_at_10, tmp_path, max_update=14)
    walls = [int(w) for w in re.findall(r"\| train_inner \|.*, wall=(\d+)", out(proc))]
    assert len(walls) == 4 and min(walls) >= int(running[0]), (running, walls)  # logged whole seconds
    after = [state.get("running_s", 0.0) for _, key, _, state in resumed["extra_state"]["metrics"]["default"]
             if key == "wall"]  # fmt: skip
    assert after[0] > running[0], (running, after)  # the clock went on from the checkpoint's (fairseq: from 0)
