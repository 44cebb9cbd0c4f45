"""Resuming a run of several processes (2 CPU processes, gloo, ``recipes/cpu_distributed.sh``).

fairseq loads the checkpoint on rank 0 and sends it to the other ranks with ``broadcast_object``; the
receivers must unpickle it safely (``weights_only``) and the run must go on.
"""

import io
import os
import pathlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import byte_corpus_bin
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import OmegaConf

from plugins.checkpointing import plain_data
from plugins.distributed import safe_loads
from plugins.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "FAIRSEQ_TRAIN": str(BIN / "fairseq-train")}
TRAIN = [
    "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm", "--criterion", "aux_cross_entropy",
    "--tokens-per-sample", "32", "--batch-size", "4", "--optimizer", "adam", "--lr", "0.003",
    "--num-workers", "0", "--log-format", "simple", "--log-interval", "1", "--seed", "3", "--no-epoch-checkpoints",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """A small byte-level slice of the embedded corpus, binarized by the project's own script."""
    return byte_corpus_bin(tmp_path_factory.mktemp("ranks"))


def train_2_ranks(data_bin, save_dir, *args) -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "recipes" / "cpu_distributed.sh"), "2", str(data_bin), *TRAIN, *map(str, args),
         "--save-dir", str(save_dir)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "training on 2 devices" in output
    return output


def train_losses(output: str) -> dict:
    """{update: loss} of the ``train_inner`` lines (logged every update)."""
    return {int(n): loss for loss, n in re.findall(r"\| train_inner \|.* loss=([\d.]+),.* num_updates=(\d+),", output)}


def final_state(save_dir: Path) -> dict:
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def test_a_stopped_two_process_run_resumes_bitwise_equal(data_bin, tmp_path):
    """2 processes x 4 streams, Transformer-XL memory, dropout: updates 1-8 in one run, or 1-4, stop, resume
    to 8. The resumed run must load on both ranks (rank 1 unpickles what rank 0 sent), restore each rank's
    own memory, and end with the same parameters, memories and per-update losses, to the last bit."""
    args = ["--arch", "xl_tiny", "--dropout", "0.1", "--save-interval-updates", "4"]
    whole = train_losses(train_2_ranks(data_bin, tmp_path / "whole", *args, "--max-update", "8"))
    first = train_losses(train_2_ranks(data_bin, tmp_path / "resumed", *args, "--max-update", "4"))
    resumed_output = train_2_ranks(data_bin, tmp_path / "resumed", *args, "--max-update", "8")
    assert "Loaded checkpoint" in resumed_output and "(epoch 1 @ 4 updates)" in resumed_output, resumed_output[-3000:]
    assert "start with no memory" not in resumed_output
    resumed = {**first, **train_losses(resumed_output)}
    assert sorted(whole) == list(range(1, 9)) and resumed == whole  # the logged losses, as printed

    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "resumed")
    memory = "decoder._extra_state"
    for name, value in a["model"].items():
        if name != memory:
            assert torch.equal(value, b["model"][name]), name
    ranks_a, ranks_b = a["model"][memory]["ranks"], b["model"][memory]["ranks"]
    assert len(ranks_a) == 2 and ranks_a[0]["position"] == ranks_a[1]["position"] == 8 * 32
    for rank_a, rank_b in zip(ranks_a, ranks_b):  # every rank's memory, bitwise
        for layer_a, layer_b in zip(rank_a["layers"], rank_b["layers"]):
            assert layer_a.keys() == layer_b.keys()
            for key in layer_a:
                same = torch.equal if torch.is_tensor(layer_a[key]) else (lambda x, y: x == y)
                assert same(layer_a[key], layer_b[key]), key
    assert not torch.equal(ranks_a[0]["layers"][0]["hidden"], ranks_a[1]["layers"][0]["hidden"])  # own streams

    # the same save dir resumed by one process: its streams are other streams; one line says so, and it trains on
    single = subprocess.run(
        [str(BIN / "fairseq-train"), str(data_bin), *TRAIN, *args, "--cpu", "--max-update", "9",
         "--save-dir", str(tmp_path / "resumed")],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600,
    )  # fmt: skip
    output = single.stdout + single.stderr
    assert single.returncode == 0 and "(epoch 1 @ 8 updates)" in output, output[-3000:]
    said = [line for line in output.splitlines() if "stream memory was saved by 2 process(es)" in line]
    assert len(said) == 1 and "this run has 1" in said[0] and "no memory (reset)" in said[0], said
    # one warning line (plugins/resume.py) says what happens: the memory reset, where the data resumes
    warnings = [line for line in output.splitlines() if "WARNING" in line and ("resuming" in line or "memory" in line)]
    assert len(warnings) == 1 and "streams" in warnings[0] and "memory is reset" in warnings[0], warnings
    assert sorted(train_losses(output)) == [9]


BROADCAST = """
import argparse, sys, torch
from fairseq import utils
from fairseq.distributed import utils as distributed_utils
from omegaconf import OmegaConf
utils.import_user_module(argparse.Namespace(user_dir=sys.argv[3]))
rank = int(sys.argv[1])
torch.distributed.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
longer = torch.arange(4 * 6 * 3, dtype=torch.float32).view(4, 6, 3)
state = {"cfg": OmegaConf.create({"model": {"mem_len": 4}}), "memory": longer[:, -4:], "step": 7} if rank == 0 else None
got = distributed_utils.broadcast_object(state, src_rank=0, group=torch.distributed.group.WORLD)
assert torch.equal(got["memory"], longer[:, -4:]), got["memory"][0]
assert got["step"] == 7 and got["cfg"]["model"]["mem_len"] == 4
print("rank", rank, "ok")
"""


def test_a_checkpoint_like_object_reaches_the_other_rank_intact(tmp_path):
    """fairseq's ``broadcast_object`` between 2 gloo processes: a config (refused by torch's safe unpickle)
    and a sliced tensor (sent as the wrong elements) arrive as rank 0 has them."""
    script = tmp_path / "broadcast.py"
    script.write_text(BROADCAST)
    port = 20000 + os.getpid() % 20000
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), f"tcp://127.0.0.1:{port}", str(ROOT / "plugins")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
            cwd=ROOT,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"rank {rank} ok" in output, output[-3000:]


def test_the_broadcast_carries_plain_data_and_refuses_objects(tmp_path):
    """What rank 0 sends: configs as plain dicts (as in the checkpoint file), fairseq's tensor placeholders;
    a payload that would create anything else is refused without running it."""
    state = {"cfg": OmegaConf.create({"model": {"_name": "efficient_lm", "dim": 8}}), "model": [_TensorPlaceholder(0)]}
    state["sizes"] = [{"size": torch.Size([2, 3]), "dtype": torch.float16}]
    buffer = io.BytesIO()
    torch.save(plain_data(state), buffer)
    buffer.seek(0)
    received = safe_loads(buffer)
    assert received["cfg"] == {"model": {"_name": "efficient_lm", "dim": 8}} and type(received["cfg"]) is dict
    assert received["model"] == [_TensorPlaceholder(0)] and type(received["sizes"][0]["size"]) is torch.Size

    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    buffer = io.BytesIO()
    torch.save({"extra_state": RunsCode()}, buffer)
    buffer.seek(0)
    with pytest.raises(UserError, match=r"refusing what rank 0 sent .*: it would create (getattr|pathlib)"):
        safe_loads(buffer)
    assert not marker.exists()
