"""A real two-node Slurm cluster on this machine (``slurm/local_cluster.sh start DIR 2``): a 2-node x 1-task
CPU job (fairseq DDP over gloo, rank and rendezvous from ``SLURM_*``), signalled as at its time limit,
requeued by submitit and resumed, ends bitwise equal to the uninterrupted 2-node run: the final weights
and every rank's stream memory.

The cluster: one slurmctld on 127.0.0.1 and two slurmd, nodes ``127.0.0.2`` and ``127.0.0.3`` (own ports),
each in its own UTS namespace whose hostname is its address, so each listens on its address only and its
tasks see that hostname. Root only (slurmd, ``unshare --uts``); skipped otherwise, with the reason.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import byte_corpus_bin, one_slurm_cluster_at_a_time
from test_slurm import _wait_for  # poll a condition until a timeout

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SCRIPT = str(ROOT / "slurm" / "local_cluster.sh")
MEMORY = "decoder._extra_state"  # every rank's stream state (plugins/rank_states.py)

EXPERIMENT = {
    "description": "xl_tiny on 2 CPU nodes x 1 task, gloo",
    "arch": "xl_tiny",
    "train": {
        "tokens-per-sample": 32, "batch-size": 4, "optimizer": "adam", "lr": 0.003, "max-update": 150,
        "save-interval-updates": 50, "validate-interval-updates": 50, "dropout": 0.1, "seed": 3, "cpu": True,
        "num-workers": 0, "no-epoch-checkpoints": True,
        "distributed-backend": "gloo", "ddp-backend": "legacy_ddp",  # CPU: gloo; fairseq's c10d DDP needs a device
    },
    # two runs that train identically (they differ only in how often they log): one is preempted
    "sweep": {"grid": {"log-interval": [1, 5]}},
    "resources": {"nodes": 2, "gpus_per_node": 0, "cpus_per_task": 1, "time_min": 10, "partition": "debug"},
}  # fmt: skip


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports on 127.0.0.1 (slurmd i listens on SLURMD_PORT + i - 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no consecutive free ports")


def _daemons(state: Path) -> dict:
    """{pid file: pid} of the daemons the script started (slurmctld, one slurmd per node, maybe munged)."""
    return {p.name: int(p.read_text()) for p in (state / "run").glob("*.pid") if p.read_text().strip()}


def _namespace_members(namespaces: set) -> list:
    """Pids of the processes in any of these UTS namespaces (a namespace exists while a process is in it)."""
    members = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "ns" / "uts") in namespaces:
                members.append(int(proc.name))
        except OSError:  # ended meanwhile
            continue
    return members


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The two-node cluster for this module; stopped afterwards (also when a test failed), and checked gone."""
    if os.geteuid() != 0:
        pytest.skip("two-node Slurm test skipped: it needs root (slurmd runs jobs as their users; unshare --uts)")
    if not (shutil.which("slurmd") and shutil.which("slurmctld") and shutil.which("munged")):
        pytest.skip("two-node Slurm test skipped: slurmd/slurmctld/munged are not installed (apt-get install "
                    "slurmctld slurmd slurm-client munge, or run tests/test_slurm.py once: it installs them)")  # fmt: skip
    probe = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname 127.0.0.2 && hostname"], capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0 or probe.stdout.strip() != "127.0.0.2":
        pytest.skip(f"two-node Slurm test skipped: no UTS namespaces here (unshare --uts: {probe.stderr.strip()})")
    state = tmp_path_factory.mktemp("slurm-2-nodes")
    env = {**ENV, "SLURM_CONF": str(state / "slurm.conf"), "SLURM_CTLD_PORT": str(_free_ports(1)),
           "SLURMD_PORT": str(_free_ports(2))}  # fmt: skip
    with one_slurm_cluster_at_a_time():
        start = subprocess.run(["bash", SCRIPT, "start", str(state), "2"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        if start.returncode == 3:  # cannot be set up here (hostname not on loopback, ...): not a failure of ours
            pytest.skip(f"two-node Slurm test skipped: {start.stderr.strip()}")
        started = _daemons(state)
        namespaces = {os.readlink(f"/proc/{pid}/ns/uts") for name, pid in started.items() if name.startswith("slurmd-")}
        try:
            assert start.returncode == 0, start.stdout + start.stderr
            nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env).stdout
            assert nodes.split() == ["127.0.0.2", "idle", "127.0.0.3", "idle"], nodes
            assert len(namespaces) == 2 and os.readlink("/proc/self/ns/uts") not in namespaces  # one per node
            yield env
        finally:
            subprocess.run(["bash", SCRIPT, "stop", str(state)], capture_output=True, env=env, timeout=120)
            left = {name: pid for name, pid in started.items() if _alive(pid)}
            assert not left, f"daemons still running after stop: {left}"
            # a job step's slurmstepd may still be exiting: give it seconds, not forever
            _wait_for(lambda: not _namespace_members(namespaces), 30, "no process left in the nodes' UTS namespaces")


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def _same(a, b) -> bool:
    """Bitwise equality of checkpoint contents (tensors, and the dicts/lists holding them)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _signal_when_training(log: Path, job: str, env: dict, *scancel) -> None:
    """Send USR2 as at a time limit once ``log`` shows update 5 or later (the run is past its first save)."""
    _wait_for(lambda: re.search(r'"num_updates": "([5-9]|[1-9]\d)"', _read(log)), 500, f"training ({log})")
    subprocess.run(["scancel", *scancel, "--signal=USR2", job], check=True, env=env)


@pytest.fixture(scope="module")
def two_node_runs(two_nodes, tmp_path_factory):
    """Three 2-node runs that train identically (they differ only in how often they log), submitted at once
    (each takes both nodes, so they run one after the other): through ``python -m slurm.launch --cluster
    slurm --wait`` the reference ``log-interval=5`` and ``log-interval=1``, sent USR2 (``scancel
    --signal=USR2``, as Slurm's ``--signal=USR2@90`` does) and requeued by submitit; and the plain sbatch
    script that ``--emit-sbatch`` writes for ``log-interval=2``, its batch shell sent USR2 (``scancel --batch``,
    as ``--signal=B:USR2@90`` does), requeued by the script's ``scontrol requeue``."""
    tmp = tmp_path_factory.mktemp("two-node-runs")
    data = byte_corpus_bin(tmp / "data")
    exp = tmp / "two_nodes.yaml"
    exp.write_text(yaml.safe_dump({**EXPERIMENT, "data": str(data)}, sort_keys=False))
    sbatch_exp = tmp / "two_nodes_sbatch.yaml"
    sbatch_exp.write_text(yaml.safe_dump({**EXPERIMENT, "data": str(data), "sweep": {"grid": {"log-interval": [2]}}}))
    runs, sbatch_runs = tmp / "runs", tmp / "sbatch-runs"
    emitted = subprocess.run([sys.executable, "-m", "slurm.launch", str(sbatch_exp), "--sweep", "--emit-sbatch",
                              str(tmp / "sbatch"), "--runs-dir", str(sbatch_runs)], capture_output=True, text=True,
                             cwd=ROOT, env=two_nodes)  # fmt: skip
    assert emitted.returncode == 0, emitted.stdout + emitted.stderr
    # the script runs `python` and `fairseq-eval-lm` from PATH, in $REPO, writing under $RUNS
    sbatch_env = {**two_nodes, "REPO": str(ROOT), "RUNS": str(sbatch_runs),
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    launcher = subprocess.Popen(
        [sys.executable, "-m", "slurm.launch", str(exp), "--sweep", "--cluster", "slurm", "--wait", "--runs-dir", str(runs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=two_nodes,
    )  # fmt: skip
    try:
        jobs = _wait_for(lambda: (runs / "jobs.json").exists() and json.loads((runs / "jobs.json").read_text()), 300, "submission")  # fmt: skip
        submitted = subprocess.run(["sbatch", "--parsable", str(tmp / "sbatch" / "log-interval=2.sbatch")],
                                   capture_output=True, text=True, cwd=tmp, env=sbatch_env)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        sbatch_job = submitted.stdout.strip().split(";")[0]
        _signal_when_training(runs / "log-interval=1" / "train.log", jobs["log-interval=1"], two_nodes)
        _signal_when_training(sbatch_runs / "log-interval=2" / "train.log", sbatch_job, two_nodes, "--batch")
        output, _ = launcher.communicate(timeout=600)
        _wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", sbatch_job], capture_output=True, text=True,
                                             env=two_nodes).stdout.strip(), 600, "the sbatch job")  # fmt: skip
    finally:
        if launcher.poll() is None:
            launcher.kill()
    yield {"launcher": (launcher.returncode, output), "runs": runs, "sbatch_run": sbatch_runs / "log-interval=2",
           "sbatch_out": "".join(_read(p) for p in tmp.glob("slurm-*.out"))}  # fmt: skip


def _assert_same_run(resumed: dict, whole: dict) -> None:
    """Both checkpoints at update 150 with the same weights and each rank's stream memory, bit for bit."""
    assert resumed["optimizer_history"][-1]["num_updates"] == whole["optimizer_history"][-1]["num_updates"] == 150
    for name, value in whole["model"].items():
        if name != MEMORY:
            assert _same(value, resumed["model"][name]), name  # every weight, bitwise
    ranks, resumed_ranks = whole["model"][MEMORY]["ranks"], resumed["model"][MEMORY]["ranks"]
    assert len(ranks) == 2 and ranks[0]["position"] == ranks[1]["position"] == 150 * 32
    assert _same(ranks, resumed_ranks)  # each rank's memory, bitwise
    assert not torch.equal(ranks[0]["layers"][0]["hidden"], ranks[1]["layers"][0]["hidden"])  # its own streams


def _resumed_at(log: str) -> int:
    found = re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 1 @ (\d+) updates\)", log)
    assert found and 5 <= int(found.group(1)) < 150, log[-3000:]
    return int(found.group(1))


@pytest.mark.cli
def test_two_node_job_requeued_by_submitit_resumes_bitwise_equal(two_node_runs):
    """Through the launcher: the signalled job stops on both ranks at the same update, rank 0 saves, submitit
    requeues it, both ranks resume from checkpoint_last.pt; it ends as the uninterrupted run, bit for bit."""
    code, output = two_node_runs["launcher"]
    runs = two_node_runs["runs"]
    assert code == 0, output[-3000:] + _read(runs / "log-interval=1" / "train.log")[-3000:]
    for name in ("log-interval=1", "log-interval=5"):
        assert f"[{name}] done: test bpb" in output, output[-3000:]
        log = _read(runs / name / "train.log")
        assert "distributed init (rank 0)" in log and "training on 2 devices" in log, log[-3000:]
        assert "distributed init (rank 1)" in _read(runs / name / "train.rank1.log")  # its own log, other node
    _resumed_at(_read(runs / "log-interval=1" / "train.log"))
    submitit_logs = "".join(_read(p) for p in (runs / ".submitit").rglob("*_log.*"))
    assert "Calling checkpoint method" in submitit_logs and "Requeued job" in submitit_logs
    hosts = set(re.findall(r"Starting with JobEnvironment\(job_id=\S+, hostname=(\S+),", submitit_logs))
    assert hosts == {"127.0.0.2", "127.0.0.3"}, hosts  # the two tasks ran on the two nodes
    _assert_same_run(_checkpoint(runs / "log-interval=1"), _checkpoint(runs / "log-interval=5"))
    results = [json.loads((runs / name / "eval.json").read_text()) for name in ("log-interval=1", "log-interval=5")]
    assert results[0]["value"] == results[1]["value"]


@pytest.mark.cli
def test_two_node_sbatch_script_requeued_resumes_bitwise_equal(two_node_runs):
    """The plain sbatch script (``--emit-sbatch``): its batch shell forwards USR2 to srun, both ranks save and
    exit 75, the script requeues the job, which resumes; it ends as the launcher's uninterrupted run."""
    run, out = two_node_runs["sbatch_run"], two_node_runs["sbatch_out"]
    log = _read(run / "train.log")
    assert "USR2: saving checkpoint_last.pt, then requeueing" in out, out[-3000:]
    assert "distributed init (rank 0)" in log and "distributed init (rank 1)" in log, log[-3000:]
    _resumed_at(log)
    assert (run / "eval.json").exists(), out[-3000:] + log[-3000:]
    _assert_same_run(_checkpoint(run), _checkpoint(two_node_runs["runs"] / "log-interval=5"))
    reference = json.loads((two_node_runs["runs"] / "log-interval=5" / "eval.json").read_text())
    assert json.loads((run / "eval.json").read_text())["value"] == reference["value"]
