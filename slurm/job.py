"""One run as a job: ``fairseq-train`` (resuming from ``checkpoint_last.pt``), then ``fairseq-eval-lm`` on
``checkpoint_best.pt``, with the result saved as ``eval.json``.

``TrainAndEvaluate`` is a submitit ``Checkpointable`` (submitit docs, "Checkpointing"): when Slurm
signals the job (SIGUSR2, ``signal_delay_s`` before the time limit, or on preemption), submitit calls
``checkpoint()``; it asks ``fairseq-train`` to save and stop (``slurm/train.py``), waits for it, and
returns the same callable, which submitit requeues. The requeued job runs the same command, and
fairseq resumes from ``checkpoint_last.pt``. A run whose ``eval.json`` exists is never run again.

Files of a run directory: ``run.json`` (the exact commands and resources), ``train.log`` (fairseq's
``--log-format json`` output), ``checkpoints/``, ``tensorboard/``, ``eval.log`` and ``eval.json``.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import submitit

from recipes.experiment import ROOT, Run, fairseq_tool
from slurm.children import die_with_parent
from slurm.train import PREEMPTED

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq's: the log parser relies on it


class RunFailed(RuntimeError):
    """A run that failed: the message names the run and ends with the tail of its log."""


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"(no {path.name})"
    text = path.read_text(errors="replace").splitlines()
    keep = [line for line in text if "Warning" not in line and "warnings.warn" not in line]
    return "\n".join(keep[-lines:])


def global_rank() -> int:
    try:
        return submitit.JobEnvironment().global_rank
    except RuntimeError:  # not inside a submitit job (the local runner)
        return int(os.environ.get("SLURM_PROCID", 0))


def parse_eval(text: str) -> dict:
    # words: "Loss (base 2): 6.76, Perplexity: 108.04"; characters / bytes: "Loss (base 2): 1.23, bpc: 1.23 (...)"
    loss = re.search(r"Loss \(base 2\): ([\d.]+|inf)(?:, Perplexity: ([\d.]+|inf))?", text)
    if not loss:
        raise ValueError("no 'Loss (base 2)' line")
    base2 = float(loss.group(1))
    out = {"loss_base2": base2, "ppl": float(loss.group(2)) if loss.group(2) else round(2.0**base2, 2)}
    speed = re.search(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)", text)
    if speed:
        out.update(tokens=int(speed.group(1).replace(",", "")), tokens_per_s=float(speed.group(3)))
    return out


def metric_of(train_log: Path) -> str:
    """bpb / bpc / ppl: the name the criterion gave the metric (from the data's unit) in the training log."""
    if train_log.exists():
        for line in train_log.read_text(errors="replace").splitlines():
            found = re.search(r'"(?:valid_)?(bpb|bpc|ppl)":', line)
            if found:
                return found.group(1)
    return "ppl"


def write_eval_json(run_dir: Path, name: str, swept: dict, subset: str, checkpoint: str) -> dict:
    """eval.log -> eval.json (written atomically: its presence means the run is finished)."""
    log = run_dir / "eval.log"
    try:
        result = parse_eval(log.read_text(errors="replace"))
    except (ValueError, FileNotFoundError):
        raise RunFailed(f"{name}: fairseq-eval-lm printed no loss; end of {log}:\n{log_tail(log)}") from None
    metric = metric_of(run_dir / "train.log")
    result.update(run=name, swept=swept, subset=subset, metric=metric, checkpoint=checkpoint,
                  value=result["ppl"] if metric == "ppl" else result["loss_base2"])  # fmt: skip
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.rename(run_dir / "eval.json")
    return result


class TrainAndEvaluate(submitit.helpers.Checkpointable):
    def __init__(self, run: Run, in_process: bool = False, save_timeout_s: Optional[float] = None):
        self.run = run
        self.in_process = in_process  # submitit's debug executor: fairseq runs in this process (breakpoints work)
        self.save_timeout_s = save_timeout_s or max(run.resources.signal_delay_s - 15, 10)
        self._child = None

    def __getstate__(self):  # the training process is not part of the state submitit pickles for the requeue
        return {**self.__dict__, "_child": None}

    # -- the job ---------------------------------------------------------------------------------
    def __call__(self) -> dict:
        run_dir = self.run.dir
        result = run_dir / "eval.json"
        if result.exists():  # finished runs are never re-run
            return json.loads(result.read_text())
        rank = global_rank()
        code = self.train(rank)
        if code == PREEMPTED:
            return {"status": "preempted", "run": self.run.name}  # only without submitit's requeue (local runs)
        if rank != 0:
            return {"status": "trained", "rank": rank}
        return self.evaluate()

    def train(self, rank: int = 0) -> int:
        log = self.run.dir / ("train.log" if rank == 0 else f"train.rank{rank}.log")
        if self.in_process:
            from slurm import train

            with _log_to(log):
                try:
                    code = train.main(self.run.train_args)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
        else:
            command = [sys.executable, "-m", "slurm.train", *self.run.train_args]
            with open(log, "a") as out:
                self._child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(),
                                               preexec_fn=die_with_parent())  # fmt: skip
                code = self._wait_child()
            self._child = None
        if code not in (0, PREEMPTED):
            raise RunFailed(f"{self.run.name}: fairseq-train failed (exit {code}); end of {log}:\n{log_tail(log)}")
        return code

    def evaluate(self) -> dict:
        run_dir = self.run.dir
        log = run_dir / "eval.log"
        if self.in_process:
            from fairseq_cli import eval_lm

            saved, sys.argv = sys.argv, ["fairseq-eval-lm", *self.run.eval_args]
            try:
                with _log_to(log, mode="w"):
                    eval_lm.cli_main()
            finally:
                sys.argv = saved
        else:
            with open(log, "w") as out:
                code = subprocess.call([fairseq_tool("fairseq-eval-lm"), *self.run.eval_args], stdout=out,
                                       stderr=subprocess.STDOUT, cwd=ROOT, env=_env(), preexec_fn=die_with_parent())  # fmt: skip
            if code != 0:
                raise RunFailed(f"{self.run.name}: fairseq-eval-lm failed (exit {code}); end of {log}:\n{log_tail(log)}")  # fmt: skip
        subset = self.run.eval_args[self.run.eval_args.index("--gen-subset") + 1] if "--gen-subset" in self.run.eval_args else "test"  # fmt: skip
        checkpoint = self.run.eval_args[self.run.eval_args.index("--path") + 1]
        return write_eval_json(run_dir, self.run.name, self.run.swept, subset, checkpoint)

    # -- preemption / time limit --------------------------------------------------------------------
    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit (rank 0) on SIGUSR2: let fairseq-train save checkpoint_last.pt, then requeue."""
        child = self._child
        if child is not None and child.returncode is None:
            try:
                os.kill(child.pid, signal.SIGUSR2)  # Slurm may have signalled it already; once more is harmless
            except ProcessLookupError:
                pass
            self._wait_child(timeout=self.save_timeout_s)
            if child.returncode is None:  # did not save in time: the requeued job resumes from the last save
                child.kill()
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _wait_child(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait by polling with os.waitpid: this also runs inside a signal handler, where Popen.wait's lock
        may be held by the interrupted main loop."""
        child, deadline = self._child, None if timeout is None else time.monotonic() + timeout
        while child.returncode is None and (deadline is None or time.monotonic() < deadline):
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the interrupted loop; Popen keeps the code
                break
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.2)
        return child.returncode


def _env() -> dict:
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": python_path}


class _log_to:
    """Copy everything logged (fairseq's format) into a file while fairseq runs in this process."""

    def __init__(self, path: Path, mode: str = "a"):
        self.handler = logging.FileHandler(path, mode=mode)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))

    def __enter__(self):
        logging.getLogger().addHandler(self.handler)
        logging.getLogger().setLevel(logging.INFO)

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


def main(argv=None) -> None:
    """``python -m slurm.job eval-json RUN_DIR``: write eval.json from eval.log (used by the sbatch scripts)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "eval-json":
        sys.exit("usage: python -m slurm.job eval-json RUN_DIR")
    run_dir = Path(argv[1])
    saved = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    text = (run_dir / "eval.log").read_text(errors="replace") if (run_dir / "eval.log").exists() else ""
    subset = re.search(r"'gen_subset': '([^']+)'", text)
    swept = saved.get("swept") or dict(p.split("=", 1) for p in run_dir.name.split(",") if "=" in p)
    result = write_eval_json(run_dir, run_dir.name, swept, subset.group(1) if subset else "test",
                             str(run_dir / "checkpoints" / "checkpoint_best.pt"))  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
