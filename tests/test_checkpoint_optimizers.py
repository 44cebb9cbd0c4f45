"""Every optimizer and lr scheduler fairseq offers writes a checkpoint that resumes and evaluates.

fairseq's legacy optimizers/schedulers (no dataclass: ``sgd``, ``adafactor``, ``adagrad``, ...) used to leave
an ``argparse.Namespace`` in the saved ``cfg``, which every loader under torch >= 2.6 refuses. For each name
in fairseq's registries (read at run time: a newly registered one is tested with no new test code):
``fairseq-train`` 2 updates -> the checkpoint holds no unsafe global -> ``fairseq-train`` again resumes it to
update 3 -> ``fairseq-eval-lm`` scores it. The three commands run through fairseq_cli's own entry code
(``parse_args_and_arch`` -> ``convert_namespace_to_omegaconf`` -> ``call_main``, what the console scripts do)
in one subprocess, so that 70 command runs cost one interpreter start instead of 70.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import byte_corpus_bin

ROOT = Path(os.path.abspath(__file__)).parents[1]  # not resolve(): fairseq compares abspath()s
BASE = [
    "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm", "--criterion", "aux_cross_entropy",
    "--tokens-per-sample", "32", "--batch-size", "4", "--lr", "0.01", "--cpu", "--num-workers", "0",
    "--no-epoch-checkpoints", "--disable-validation", "--log-format", "none", "--seed", "1",
]  # fmt: skip
# what some schedulers need beyond their defaults (their dataclass leaves these '???' or null)
SCHEDULER_ARGS = {
    "polynomial_decay": ["--total-num-update", "3"],
    "tri_stage": ["--warmup-steps", "1", "--hold-steps", "1", "--decay-steps", "1"],
    "triangular": ["--max-lr", "0.02"],
}
# the composite optimizer and the pass-through scheduler (made for each other) are configured by a dict of
# parameter groups that only a hydra config can give (fairseq-hydra-train); set here as such a config would
LR = [0.01]
COMPOSITE_GROUPS = {
    "default": {"lr": LR, "optimizer": {"_name": "adam", "lr": LR}, "lr_scheduler": {"_name": "fixed", "lr": LR}}
}
NEEDS_PACKAGE = {"cpu_adam": "DeepSpeed", "lamb": "apex"}  # fairseq imports them when the optimizer is built


def jobs():
    """(id, fairseq-train arguments) for every registered optimizer and lr scheduler, and the LSTM study's."""
    from fairseq.optim import OPTIMIZER_REGISTRY
    from fairseq.optim.lr_scheduler import LR_SCHEDULER_REGISTRY

    out = {}
    for name in sorted(OPTIMIZER_REGISTRY):
        sched = "pass_through" if name == "composite" else "fixed"
        out[f"optimizer-{name}"] = ["--arch", "xl_tiny", "--optimizer", name, "--lr-scheduler", sched]
    for name in sorted(LR_SCHEDULER_REGISTRY):
        optimizer = "composite" if name == "pass_through" else "adam"
        out[f"scheduler-{name}"] = ["--arch", "xl_tiny", "--optimizer", optimizer, "--lr-scheduler", name]
        out[f"scheduler-{name}"] += SCHEDULER_ARGS.get(name, [])
    out["lstm-study"] = ["--arch", "lstm_stateful_tiny", "--optimizer", "sgd", "--lr-scheduler", "fixed"]
    return out


# ---- the driver (runs in a subprocess: python tests/test_checkpoint_optimizers.py DATA OUT) -------------
def _run(parser, argv, main):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import open_dict

    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
    if cfg.optimizer is not None and cfg.optimizer._name == "composite":
        with open_dict(cfg):
            cfg.optimizer.groups = COMPOSITE_GROUPS
    return main(cfg)  # what distributed_utils.call_main does in a single process


def _round_trip(data, save_dir, extra) -> dict:
    import torch
    from fairseq import checkpoint_utils, options
    from fairseq_cli import eval_lm, train

    last = os.path.join(save_dir, "checkpoint_last.pt")
    for max_update in (2, 3):  # train, then resume
        if hasattr(checkpoint_utils.save_checkpoint, "best"):  # fairseq keeps the best loss here, per process
            del checkpoint_utils.save_checkpoint.best
        _run(options.get_training_parser(), [data, *BASE, *extra, "--max-update", str(max_update), "--save-dir", save_dir], train.main)  # fmt: skip
        if max_update == 2:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(last)
    state = torch.load(last, map_location="cpu", weights_only=True)
    evaluated = _run(
        options.get_eval_lm_parser(),
        [data, "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm", "--path", last, "--gen-subset", "valid",
         "--tokens-per-sample", "32", "--batch-size", "4", "--cpu"],
        eval_lm.main,
    )  # fmt: skip
    return {
        "unsafe": unsafe,
        "num_updates": state["optimizer_history"][-1]["num_updates"],
        "saves": len(state["optimizer_history"]),  # one entry per run that saved: 2 if the second run resumed
        "eval_loss": float(evaluated["loss"]),
    }


def _driver(data, out, only=None):
    from fairseq import utils

    utils.import_user_module(argparse.Namespace(user_dir=str(ROOT / "plugins")))  # registers adagrad_clip etc.
    results = {}
    for job, extra in jobs().items():
        if only and job not in only:
            continue
        try:
            results[job] = _round_trip(data, os.path.join(out, job), extra)
        except BaseException as e:  # noqa: BLE001  (an argparse error is a SystemExit)
            results[job] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"}
        print("RESULT", json.dumps({job: results[job]}), flush=True)
    return results


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2], only=sys.argv[3:])  # optional job ids: run only those


# ---- the tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return byte_corpus_bin(tmp_path_factory.mktemp("optim"))


@pytest.fixture(scope="module")
def round_trips(data_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("round-trips")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the safe default of torch >= 2.6, as users have it
    proc = subprocess.run(
        [sys.executable, __file__, str(data_bin), str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=900,
    )  # fmt: skip
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            results.update(json.loads(line[len("RESULT ") :]))
    assert results, proc.stdout[-2000:] + proc.stderr[-3000:]
    return results


@pytest.mark.parametrize("job", sorted(jobs()))
def test_checkpoint_saves_resumes_and_evaluates(round_trips, job):
    result = round_trips[job]
    name = job.split("-", 1)[1]
    if "error" in result and name in NEEDS_PACKAGE and "ImportError" in result["error"]:
        pytest.skip(f"--optimizer {name} needs {NEEDS_PACKAGE[name]}, not installed here ({result['error']})")
    assert "error" not in result, result["error"]
    assert result["unsafe"] == [], f"the checkpoint would create {result['unsafe']}"
    assert result["num_updates"] == 3 and result["saves"] == 2, result  # resumed at 2, not restarted
    assert math.isfinite(result["eval_loss"]), result
