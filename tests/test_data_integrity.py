"""Data that is what the model was trained on, clear errors for damaged files, and no orphan of a killed
``preprocess`` (issue 20, items 5, 8, 9), through the real commands (``python -m preprocess.ptb``,
``fairseq-preprocess``, ``fairseq-train``, ``fairseq-eval-lm``, ``fairseq-interactive``) on ``full_tiny``
and 28 kB of PTB (``plugins/data_integrity.py``, ``plugins/checkpointing.py``, ``preprocess/common.py``):

- a damaged split (truncated ``.bin``, one flipped bit in a size field, a corrupt element-type byte), a
  broken ``metadata.json``, a foreign ``dict.txt`` next to PTB's ``.bin``: one ``error:`` line naming the
  file, before any work (fairseq: tracebacks, or scores of the wrong tokens);
- a checkpoint evaluated on data with another dictionary of the same size: refused in one line by
  eval-lm, interactive and a resume (fairseq: a silent, meaningless loss); the same dictionary with other
  training data at a resume: one warning line; a checkpoint without the fingerprint loads as before;
- a full disk during a checkpoint save (a small tmpfs): one line, the previous checkpoint intact, and the
  same command resumes once there is space;
- ``--fp16`` / ``--bf16`` without a GPU: one line pointing at ``--autocast-bf16``;
- ``python -m preprocess.ptb`` SIGKILLed while ``fairseq-preprocess`` runs: the child dies too, and the
  next run removes the leftover and writes the same files as an uninterrupted run.
"""

import json
import lzma
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PTB = ROOT.parent / "shared" / "data" / "ptb"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
TRAIN = ["--user-dir", str(ROOT / "plugins"), "--task", "segment_lm", "--arch", "full_tiny", "--tokens-per-sample",
         "16", "--batch-size", "4", "--optimizer", "adam", "--lr", "0.003", "--seed", "3", "--cpu", "--num-workers",
         "0", "--log-format", "simple", "--log-interval", "1"]  # fmt: skip
pytestmark = [pytest.mark.cli, pytest.mark.skipif(not PTB.is_dir(), reason="needs ../shared/data/ptb")]


def ptb_lines(split: str, start: int, n_bytes: int) -> str:
    """Whole lines of PTB's ``split`` from line ``start``, about ``n_bytes`` of them."""
    lines, size = [], 0
    with lzma.open(PTB / f"ptb.{split}.txt.xz", "rt") as f:
        for i, line in enumerate(f):
            if i >= start:
                lines.append(line)
                size += len(line)
                if size >= n_bytes:
                    break
    return "".join(lines)


def dict_size(train_text: str) -> int:
    """fairseq's dictionary size for this train text: 4 specials + its words, padded to a multiple of 8."""
    n = 4 + len(set(train_text.split()))
    return n + (-n % 8)


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
                          **kwargs)  # fmt: skip


def out(proc) -> str:
    return proc.stdout + proc.stderr


def one_error(proc, *needles) -> str:
    """The single ``error:`` line of a failed command (no traceback), holding every needle."""
    errors = [line for line in out(proc).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in out(proc), out(proc)[-3000:]
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


def preprocess(raw: Path, out_dir: Path, workers: int = 1) -> None:
    proc = run(sys.executable, "-m", "preprocess.ptb", "--raw", raw, "--out", out_dir, "--workers", workers)
    assert proc.returncode == 0, out(proc)[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``ptb``: 20 kB of PTB train (+ 4 kB valid/test) binarized by ``preprocess.ptb``; ``other``: other PTB
    lines whose dictionary has the same size (other words); ``same_dict``: ``ptb`` whose train split is
    other text binarized by ``fairseq-preprocess --srcdict`` with ptb's dictionary (no metadata.json)."""
    tmp = tmp_path_factory.mktemp("data")
    texts = {"train": ptb_lines("train", 0, 20000), "valid": ptb_lines("valid", 0, 4000), "test": ptb_lines("test", 0, 4000)}  # fmt: skip
    target, other = dict_size(texts["train"]), None
    for n_bytes in range(12000, 40000, 100):  # later lines, as many as give a dictionary of the same size
        candidate = ptb_lines("train", 5000, n_bytes)
        if dict_size(candidate) == target:
            other = {**texts, "train": candidate}
            break
    assert other is not None
    paths = {}
    for name, split_texts in (("ptb", texts), ("other", other)):
        raw = tmp / f"raw-{name}"
        raw.mkdir()
        for split, text in split_texts.items():
            (raw / f"ptb.{split}.txt").write_text(text)
        paths[name] = tmp / name
        preprocess(raw, paths[name])
    assert json.loads((paths["other"] / "metadata.json").read_text())["fairseq_dict_size"] == target
    assert (paths["other"] / "dict.txt").read_text() != (paths["ptb"] / "dict.txt").read_text()
    same = paths["same_dict"] = tmp / "same_dict"
    shutil.copytree(paths["ptb"], same)
    (same / "metadata.json").unlink()  # plain fairseq-preprocess output
    (tmp / "raw-other" / "train.txt").write_text("\n".join(other["train"].splitlines()[::-1]) + "\n")
    proc = run(BIN / "fairseq-preprocess", "--only-source", "--srcdict", same / "dict.txt", "--trainpref",
               tmp / "raw-other" / "train.txt", "--destdir", tmp / "fp")  # fmt: skip
    assert proc.returncode == 0, out(proc)[-2000:]
    for suffix in (".bin", ".idx"):
        shutil.copy(tmp / "fp" / f"train{suffix}", same / f"train{suffix}")
    return paths


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """4 updates of full_tiny on ``ptb``, checkpoints at 2 and 4."""
    save_dir = tmp_path_factory.mktemp("trained") / "ckpt"
    proc = run(BIN / "fairseq-train", data["ptb"], *TRAIN, "--max-update", "4", "--save-interval-updates", "2",
               "--save-dir", save_dir)  # fmt: skip
    assert proc.returncode == 0, out(proc)[-3000:]
    return save_dir


def eval_lm(data_dir, checkpoint) -> subprocess.CompletedProcess:
    return run(BIN / "fairseq-eval-lm", data_dir, "--user-dir", ROOT / "plugins", "--task", "segment_lm", "--path",
               checkpoint, "--gen-subset", "test", "--tokens-per-sample", "16", "--cpu")  # fmt: skip


def damage(src: Path, dst: Path, name: str, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / name
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))
    return path


def flip_bit(data: bytearray, offset: int, bit: int) -> bytearray:
    data[offset] ^= 1 << bit
    return data


# ---- 5 and 8: damaged splits, broken metadata, a foreign dictionary ------------------------------
@pytest.mark.parametrize(
    "name, edit, needles",
    [
        ("test.bin", lambda d: d[:-100], ["test.bin is truncated", "binarize the data again"]),
        ("test.idx", lambda d: flip_bit(d, 26 + 4 * 5, 4), ["test.idx", "size field", "binarize the data again"]),
        ("test.idx", lambda d: flip_bit(d, 17, 6), ["test.idx", "element-type byte", "binarize the data again"]),
        ("test.idx", lambda d: flip_bit(d, 17, 0), ["test.idx", "element-type byte", "binarize the data again"]),
        ("metadata.json", lambda d: d[:100], ["metadata.json is not valid JSON", "restore it"]),
    ],
    ids=["truncated-bin", "size-bit", "dtype-unknown", "dtype-other", "broken-metadata"],
)
def test_damaged_data_is_one_error_line_naming_the_file(data, trained, tmp_path, name, edit, needles):
    damaged = damage(data["ptb"], tmp_path / "data", name, edit)
    proc = eval_lm(tmp_path / "data", trained / "checkpoint_last.pt")
    assert str(damaged) in one_error(proc, *needles)
    assert "Evaluated" not in out(proc)


def test_a_foreign_dictionary_next_to_the_data_is_refused(data, tmp_path):
    """A larger dict.txt (another corpus's) next to PTB's .bin: fairseq trains on (ids mean other words)."""
    shutil.copytree(data["ptb"], tmp_path / "data")
    foreign = (data["ptb"] / "dict.txt").read_text() + "".join(f"extra{i} 1\n" for i in range(40))
    (tmp_path / "data" / "dict.txt").write_text(foreign)
    proc = run(BIN / "fairseq-train", tmp_path / "data", *TRAIN, "--max-update", "1", "--no-save")
    one_error(proc, str(tmp_path / "data" / "dict.txt"), "not the dictionary this data was binarized with")
    assert "num_updates" not in out(proc)


# ---- 5: the checkpoint's data fingerprint ----------------------------------------------------------
HUB = """
import argparse
from fairseq import utils
utils.import_user_module(argparse.Namespace(user_dir={plugins!r}))
from plugins.models.efficient_lm import EfficientLM
EfficientLM.from_pretrained({ckpt!r}, "checkpoint_last.pt", {data!r}, user_dir={plugins!r})
"""


def test_a_checkpoint_on_data_with_another_dictionary_is_refused(data, trained, tmp_path):
    """Same dictionary size, other words: fairseq-eval-lm scored it silently (Loss 4.6436 vs 2.8631 in
    the issue); eval-lm, interactive, the hub and a resume now refuse in one line. The own data still works, and
    so does a checkpoint written before the fingerprint existed."""
    checkpoint = trained / "checkpoint_last.pt"
    own = eval_lm(data["ptb"], checkpoint)
    assert own.returncode == 0 and "Loss (base 2)" in out(own), out(own)[-3000:]
    one_error(eval_lm(data["other"], checkpoint), str(data["other"] / "dict.txt"), "another dictionary")
    interactive = run(BIN / "fairseq-interactive", data["other"], "--user-dir", ROOT / "plugins", "--task",
                      "segment_lm", "--path", checkpoint, "--cpu", input="the\n")  # fmt: skip
    one_error(interactive, "another dictionary")
    hub = run(
        sys.executable, "-c", HUB.format(plugins=str(ROOT / "plugins"), ckpt=str(trained), data=str(data["other"]))
    )
    assert hub.returncode != 0 and "error: the checkpoint was trained with a dictionary of" in out(hub), out(hub)[-3000:]  # fmt: skip
    save_dir = tmp_path / "ckpt"
    shutil.copytree(trained, save_dir)
    resumed = run(BIN / "fairseq-train", data["other"], *TRAIN, "--max-update", "6", "--save-dir", save_dir)
    one_error(resumed, "another dictionary")
    assert "num_updates" not in out(resumed)
    # written before the fingerprint: loads as before
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del state["task_state"]["data_fingerprint"]
    torch.save(state, tmp_path / "old.pt")
    old = eval_lm(data["ptb"], tmp_path / "old.pt")
    assert old.returncode == 0 and "has no data fingerprint" in out(old), out(old)[-3000:]


def test_resume_on_other_training_data_with_the_same_dictionary_warns_once(data, trained, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(trained, save_dir)
    proc = run(BIN / "fairseq-train", data["same_dict"], *TRAIN, "--max-update", "6", "--save-dir", save_dir)
    assert proc.returncode == 0, out(proc)[-3000:]
    warnings = [line for line in out(proc).splitlines() if "on other training data" in line]
    assert len(warnings) == 1 and str(data["same_dict"]) in warnings[0], warnings
    assert "num_updates 6" in out(proc)
    # the same data: nothing said
    again = run(BIN / "fairseq-train", data["ptb"], *TRAIN, "--max-update", "6", "--save-dir", tmp_path / "fresh")
    assert again.returncode == 0 and "other training data" not in out(again)


# ---- 8: a full disk during a checkpoint save --------------------------------------------------------
def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_stays(data, trained, tmp_path):
    """A tmpfs with room for three checkpoints: the first save writes three (interval, best, last), the
    save at update 4 fails. fairseq: five
    tracebacks ending in ``OSError: [Errno 28]``. Without root (no mount), a file size limit below one
    checkpoint (``EFBIG``) makes the first save fail instead."""
    size = (trained / "checkpoint_last.pt").stat().st_size
    save_dir = tmp_path / "disk"
    save_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 3.5)}", "tmpfs", str(save_dir)],
                             capture_output=True).returncode == 0  # fmt: skip
    limit = None if mounted else size // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [BIN / "fairseq-train", data["ptb"], *TRAIN, "--max-update", "6", "--save-interval-updates", "2",
               "--save-dir", save_dir]  # fmt: skip
    try:
        proc = run(*command, preexec_fn=None if mounted else limited)
        error = one_error(proc, "cannot write", "Free space there", "run the same command again")
        assert not [p for p in save_dir.iterdir() if p.name.endswith(".tmp")]
        if mounted:
            assert "No space left on device" in error and "checkpoint_last.pt (update 2) is intact" in error
            state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
            assert state["optimizer_history"][-1]["num_updates"] == 2
            subprocess.run(["mount", "-o", f"remount,size={size * 10}", str(save_dir)], check=True)
        else:
            assert "File too large" in error
        again = run(*command)
        assert again.returncode == 0, out(again)[-3000:]
        assert ("Loaded checkpoint" in out(again)) == mounted and "num_updates 6" in out(again)
    finally:
        if mounted:
            subprocess.run(["umount", str(save_dir)], check=True)


# ---- 8: half precision without a GPU ---------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16/bf16 run on a GPU")
@pytest.mark.parametrize("flag", ["--fp16", "--bf16"])
def test_half_precision_without_a_gpu_points_at_autocast_bf16(data, flag):
    proc = run(BIN / "fairseq-train", data["ptb"], *TRAIN, flag, "--max-update", "1", "--no-save")
    one_error(proc, flag, "needs a CUDA GPU", "--autocast-bf16")


# ---- 9: a SIGKILLed preprocess leaves no orphan and no leftover ------------------------------------
def build_processes(out_dir: Path) -> list:
    """Processes working in a temporary build directory of ``out_dir`` (``fairseq-preprocess`` and its
    workers run there)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if os.path.basename(cwd).startswith(f".{out_dir.name}.tmp-") and os.path.dirname(cwd) == str(out_dir.parent):
            found.append(int(pid))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and the parent-death signal are Linux's")
def test_preprocess_killed_leaves_no_orphan_and_the_rerun_cleans_up(data, tmp_path):
    raw = data["ptb"].parent / "raw-ptb"
    out_dir = tmp_path / "w1"
    proc = subprocess.Popen([sys.executable, "-m", "preprocess.ptb", "--raw", str(raw), "--out", str(out_dir),
                             "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            cwd=ROOT)  # fmt: skip
    deadline = time.monotonic() + 60
    while not build_processes(out_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    children = build_processes(out_dir)
    assert children and proc.poll() is None, "fairseq-preprocess never started (or it finished first)"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while build_processes(out_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = build_processes(out_dir)
    for pid in orphans:  # leave nothing running, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"fairseq-preprocess outlived its parent: {orphans}"
    leftovers = list(tmp_path.glob(".w1.tmp-*"))
    assert leftovers and not out_dir.exists()  # SIGKILL skips every cleanup: the next run's job
    preprocess(raw, out_dir, workers=2)
    assert not list(tmp_path.glob(".w1.tmp-*"))
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx"):
        assert (out_dir / name).read_bytes() == (data["ptb"] / name).read_bytes(), name
