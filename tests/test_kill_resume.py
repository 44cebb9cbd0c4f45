"""Kill ``fairseq-train`` anywhere, restart the same command, lose nothing (``plugins/checkpointing.py``).

A real ``fairseq-train`` run of a memory model (``xl_tiny``, dropout on, checkpoints every 10 updates
and at the end of every epoch, 60 updates over two epochs) is SIGKILLed twice, at moments drawn by a
seeded RNG from: while the ``.tmp`` of a checkpoint is being written, just after it was renamed (while
it is copied to ``checkpoint_best.pt``/``checkpoint_last.pt``), while the state dict is built, or at a
random moment shortly after the 1st or 2nd logged interval (the others: the 2nd or 3rd save of a run). Then ``checkpoint_last.pt``
is truncated by hand (a file damaged from outside) and the same command is restarted until it finishes
(4 processes in all, plus the uninterrupted reference alongside). Checked after every kill and restart:

- ``checkpoint_last.pt`` is never damaged by a kill, and the restart resumes exactly from it (the
  number of updates it holds), or, when it was damaged by hand, says so in one warning line and resumes
  from the newest intact checkpoint;
- the run ends at the target update, with parameters, stream memory and validation loss **bitwise**
  equal to an uninterrupted run of the same command (tolerance 0: CPU, fairseq seeds every update with
  ``seed + num_updates``, and the Transformer-XL memory is saved in the checkpoint).

``RELIABILITY_SEED=<n>`` replays another schedule of kills.
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import byte_corpus_bin

from plugins.checkpointing import (
    AtomicCopyPathManager,
    checkpoint_problem,
    load_checkpoint_safely,
    newest_intact_checkpoint,
    previous_path,
    torch_persistent_save,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TARGET, INTERVAL = 60, 10  # epoch = 39 updates: the run crosses an epoch boundary (checkpoint1.pt)
COMMAND = [
    str(Path(sys.executable).parent / "fairseq-train"), "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm",
    "--arch", "xl_tiny", "--criterion", "aux_cross_entropy", "--tokens-per-sample", "32", "--mem-len", "32",
    "--batch-size", "4", "--optimizer", "adam", "--lr", "0.003", "--dropout", "0.1", "--seed", "11", "--cpu",
    "--num-workers", "0", "--log-format", "simple", "--log-interval", "10", "--max-update", str(TARGET),
    "--save-interval-updates", str(INTERVAL), "--keep-interval-updates", "1",
]  # fmt: skip
SEED = int(os.environ.get("RELIABILITY_SEED", "0"))


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory):
    """5 kB of the embedded corpus as bytes: 39 batches of 4 x 32 per epoch."""
    return byte_corpus_bin(tmp_path_factory.mktemp("kill"), scale=0.0025)


class Run:
    """One ``fairseq-train`` process whose output is read line by line as it comes."""

    def __init__(self, data: Path, save_dir: Path):
        self.save_dir = save_dir
        self.proc = subprocess.Popen([*COMMAND, str(data), "--save-dir", str(save_dir)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)  # fmt: skip
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def kill_when(self, mode: str, occurrence: int, rng: random.Random) -> bool:
        """SIGKILL at the ``occurrence``-th checkpoint save in ``mode``; False if the run ended first."""
        started = None
        logged, delay = rng.choice([1, 2]), rng.uniform(0.0, 0.2)  # "random": after the 1st/2nd log interval
        while self.proc.poll() is None:
            if mode == "writing .tmp":  # the .tmp of the checkpoint exists: torch.save is writing it
                hit = self.count("Preparing to save checkpoint") >= occurrence and any(
                    name.endswith(".tmp") for name in os.listdir(self.save_dir)
                )
            elif mode == "copying to last":  # the first file is renamed; copies to best/last follow
                hit = self.count("Finished saving checkpoint to") >= occurrence
            elif mode == "building state":  # state_dict() and the start of the write
                hit = self.count("Saving checkpoint to") >= occurrence
            else:  # "random": a random moment of training, validation or saving, early enough (counted in
                # logged intervals, not seconds, so a fast machine does not finish first) that saves remain
                if started is None and self.count("| train_inner |") >= logged:
                    started = time.monotonic()
                hit = started is not None and time.monotonic() - started > delay
            if hit:
                self.proc.send_signal(signal.SIGKILL)
                self.wait()
                return True
            time.sleep(0.001)
        self.wait()
        return False

    def wait(self) -> str:
        self.proc.wait(timeout=600)
        self.reader.join(timeout=60)
        return "".join(self.lines)


def updates_in(path: Path) -> int:
    return load_checkpoint_safely(str(path))["optimizer_history"][-1]["num_updates"]


def final_valid_loss(output: str) -> str:
    return re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", output)[-1]


@pytest.mark.cli
def test_killed_and_restarted_run_ends_bitwise_equal_to_an_uninterrupted_one(byte_corpus, tmp_path):
    rng = random.Random(SEED)
    reference = Run(byte_corpus, tmp_path / "reference")  # runs alongside the killed one
    save_dir = tmp_path / "killed"
    last = save_dir / "checkpoint_last.pt"
    modes = rng.sample(["writing .tmp", "copying to last", "building state", "random"], 2)  # >= 1 during a save
    schedule = [(mode, rng.choice([2, 3])) for mode in modes] + [("damage last", 0), ("finish", 0)]
    kills, expected, damaged, missing, report = 0, 0, False, False, []
    for mode, occurrence in schedule:
        if mode == "damage last":  # a file damaged from outside (disk, a bad copy): truncated to half
            intact = [p for p in save_dir.glob("checkpoint*.pt") if p != last and checkpoint_problem(str(p)) is None]
            expected = updates_in(max(intact, key=lambda p: p.stat().st_mtime))  # the newest written
            last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
            damaged = True
            continue
        run = Run(byte_corpus, save_dir)
        killed = mode != "finish" and run.kill_when(mode, occurrence, rng)
        output = run.wait()
        if expected == 0:
            assert "No existing checkpoint found" in output, output[-3000:]
        else:
            loaded = re.search(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", output)
            assert loaded and int(loaded.group(2)) == expected, (mode, expected, output[-3000:])
            assert damaged or missing or loaded.group(1) == str(last)
            if missing:  # killed during the first save, before checkpoint_last.pt: one line, then the newest intact
                assert sum("checkpoint_last.pt is missing; resuming from" in line for line in output.splitlines()) == 1
                missing = False
        if damaged:  # one warning line names the damaged file and the checkpoint used instead
            warnings = [line for line in output.splitlines() if "is truncated" in line]
            assert len(warnings) == 1 and "resuming from" in warnings[0] and str(last) in warnings[0], warnings
            assert loaded.group(1) != str(last)
            damaged = False
        report.append(f"{mode}#{occurrence}: resumed @ {expected}, killed={killed}")
        if not killed:
            assert run.proc.returncode == 0, output[-3000:]
            break
        kills += 1
        if not last.exists():  # killed during the first save: its interval checkpoint may be complete
            intact = [p for p in save_dir.glob("checkpoint*.pt") if checkpoint_problem(str(p)) is None]
            if intact:
                expected, missing = updates_in(max(intact, key=lambda p: p.stat().st_mtime)), True
        if last.exists():  # a kill never leaves a damaged checkpoint_last.pt
            assert checkpoint_problem(str(last)) is None, (mode, checkpoint_problem(str(last)))
            expected = updates_in(last)
    print("\n" + "\n".join(report))

    reference_output = reference.wait()
    assert reference.proc.returncode == 0, reference_output[-3000:]
    assert kills >= 2, report  # the schedule's save-time kills come before the last save
    assert updates_in(last) == updates_in(tmp_path / "reference" / "checkpoint_last.pt") == TARGET
    assert final_valid_loss(output) == final_valid_loss(reference_output)
    ours, theirs = (load_checkpoint_safely(str(d / "checkpoint_last.pt"))["model"] for d in (save_dir, tmp_path / "reference"))  # fmt: skip
    for name, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ours[name]), name
    memory = [m["hidden"] for m in theirs["decoder._extra_state"]["train_memory"]["layers"]]
    assert all(torch.equal(a, m["hidden"]) for a, m in zip(memory, ours["decoder._extra_state"]["train_memory"]["layers"]))  # fmt: skip
    assert not list(save_dir.glob("*.tmp"))  # partial files of interrupted saves were cleaned up


# ---- the pieces, in process ----------------------------------------------------------------------
def _state(step: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(step))}, "optimizer_history": [{"num_updates": step}]}


def test_damage_of_every_kind_is_detected(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_state(1), good)
    data = good.read_bytes()
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0xFF  # inside the tensor bytes: torch.load itself would not notice
    cases = {"empty": b"", "truncated": data[: len(data) // 2], "one byte short": data[:-1],
             "flipped byte": bytes(middle), "garbage": os.urandom(4096)}  # fmt: skip
    assert checkpoint_problem(str(good)) is None
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert checkpoint_problem(str(tmp_path / name)) is not None, name
    torch.save({"not": "a checkpoint"}, tmp_path / "other.pt")
    assert "no 'model' entry" in checkpoint_problem(str(tmp_path / "other.pt"))


def test_replacing_last_keeps_the_previous_good_one_and_never_a_bad_one(tmp_path):
    last = tmp_path / "checkpoint_last.pt"
    torch_persistent_save(_state(10), str(last))
    torch_persistent_save(_state(20), str(tmp_path / "checkpoint_1_20.pt"))
    assert AtomicCopyPathManager.copy(str(tmp_path / "checkpoint_1_20.pt"), str(last), overwrite=True)
    assert updates_in(last) == 20 and updates_in(Path(previous_path(str(last)))) == 10
    assert not list(tmp_path.glob("*.tmp"))
    last.write_bytes(last.read_bytes()[:100])  # damaged from outside: must not become the previous one
    torch_persistent_save(_state(30), str(last))
    assert updates_in(last) == 30 and updates_in(Path(previous_path(str(last)))) == 10


def test_newest_intact_checkpoint_skips_damaged_files(tmp_path):
    for step, name in [(10, "checkpoint_last.prev.pt"), (20, "checkpoint_1_20.pt"), (30, "checkpoint_last.pt")]:
        torch.save(_state(step), tmp_path / name)
        time.sleep(0.01)  # distinct modification times
    (tmp_path / "checkpoint_1_20.pt").write_bytes(b"PK\x03\x04 cut")
    (tmp_path / "notes.pt").write_bytes(b"")  # not a checkpoint name: ignored
    last = str(tmp_path / "checkpoint_last.pt")
    assert newest_intact_checkpoint(str(tmp_path)) == last
    assert newest_intact_checkpoint(str(tmp_path), exclude=(last,)) == str(tmp_path / "checkpoint_last.prev.pt")
