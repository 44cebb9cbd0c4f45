"""Launch an experiment (``recipes/experiments/<name>.yaml``): every run trains with ``fairseq-train`` and is
then evaluated with ``fairseq-eval-lm`` on its best checkpoint.

    python -m slurm.launch recipes/experiments/xl_memory_ptb_cpu.yaml --sweep --cluster local --max-parallel 2
    python -m slurm.launch xl_memory_enwik8 --sweep --cluster slurm --array --dry-run
    python -m slurm.launch xl_memory_enwik8 --sweep --emit-sbatch slurm/sbatch/xl_memory_enwik8

--cluster local   one process per run on this machine, --max-parallel at a time
--cluster debug   in this process, one run after the other (submitit's debug executor: breakpoints work)
--cluster slurm   submitit: one job per run (or a job array with --array), one task per GPU; fairseq
                  finds its rank and the rendezvous in the SLURM_* variables. A time limit or a
                  preemption saves checkpoint_last.pt and requeues the job, which resumes from it.

Before anything runs, every run's exact argument lists are parsed by fairseq's own parsers and the
configs are built; an unknown preset or option, a bad combination or missing data stops the launch
with one ``error:`` line. A run directory that exists is never overwritten: ``--resume`` continues
unfinished runs (from ``checkpoint_last.pt``) and skips finished ones (``eval.json`` present). With
--cluster local, a launcher holds a lock on each run directory while it trains and evaluates that run
(``<run>/.launch.lock``, the same lock fairseq-train takes on its save directory, plugins/resume.py): a
second launcher of the same study skips the runs the first is running and takes the others. (Training
itself refuses a second process on one save directory; without this lock the second launcher's attempt
would fail there, be reported FAILED and append its error to the running run's train.log.)
"""

import argparse
import contextlib
import json
import logging
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

from recipes import experiment as experiments
from recipes.experiment import ROOT, Experiment, Run, UserError, fairseq_tool


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slurm.launch", description=__doc__.split("\n\n")[0],
                                     epilog=PATHS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("experiment", help="recipes/experiments/<name>.yaml, or just <name>")
    parser.add_argument("--sweep", action="store_true", help="run every point of the sweep (default: the base run)")
    parser.add_argument("--cluster", choices=("local", "debug", "slurm"), default="local", help="where runs execute")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and sbatch parameters, run nothing")
    parser.add_argument("--resume", action="store_true", help="continue existing run directories; skip finished runs")
    parser.add_argument("--max-parallel", type=int, default=1, help="local: runs at a time; slurm --array: array tasks at a time")  # fmt: skip
    parser.add_argument(
        "--data", metavar="DIR", help="the data-bin to train and evaluate on, instead of the experiment file's 'data:'"
    )
    parser.add_argument("--out", "--runs-dir", dest="runs_dir", metavar="DIR",
                        help="where the run directories go: DIR/<swept values>/ (default: runs/<experiment>)")  # fmt: skip
    parser.add_argument("--array", action="store_true", help="slurm: submit the runs as one job array")
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and report each run")
    parser.add_argument("--emit-sbatch", metavar="DIR", help="write one plain sbatch script per run to DIR, run nothing")  # fmt: skip
    parser.add_argument("--partition", help="override resources.partition")
    parser.add_argument("--time-min", type=int, help="override resources.time_min")
    return parser.parse_args(argv)


PATHS_HELP = """
Paths: --data, --out and a relative 'data:' of the experiment file are taken against the working
directory, as the file's 'prepare:' command that writes the data is; run from the repository root, as
the docs do, they are the repository's data-bin/ and runs/.
"""


def prepare(args) -> tuple:
    exp = experiments.load(args.experiment)
    if args.partition:
        exp.spec.setdefault("resources", {})["partition"] = args.partition
    if args.time_min:
        exp.spec.setdefault("resources", {})["time_min"] = args.time_min
    runs_dir = Path(args.runs_dir or Path("runs") / exp.name).absolute()
    runs = experiments.make_runs(exp, runs_dir, sweep=args.sweep, data=args.data)
    experiments.validate(exp, runs, require_data=not (args.dry_run or args.emit_sbatch))
    return exp, runs_dir, runs


def check_existing(runs: List[Run], resume: bool) -> List[Run]:
    """Refuse to overwrite; with --resume keep only unfinished runs and make sure their commands did not change."""
    todo = []
    for run in runs:
        if not run.dir.exists() or not any(run.dir.iterdir()):
            todo.append(run)
            continue
        if not resume:
            raise UserError(
                f"run directory {run.dir} exists: pass --resume to continue it, or choose another --runs-dir"
            )
        saved = run.dir / "run.json"
        if saved.exists() and json.loads(saved.read_text())["train_args"] != run.train_args:
            raise UserError(f"{run.dir} was started with other training options (see its run.json): use another --runs-dir")  # fmt: skip
        if (run.dir / "eval.json").exists():
            print(f"[{run.name}] finished already ({run.dir / 'eval.json'}); not re-run")
            continue
        todo.append(run)
    return todo


# -- what a run asks Slurm for ----------------------------------------------------------------------
def sbatch_options(run: Run) -> Dict[str, str]:
    r = run.resources
    options = {"job-name": f"{run.experiment}:{run.name}", "nodes": r.nodes, "ntasks-per-node": r.tasks_per_node,
               "cpus-per-task": r.cpus_per_task, "time": r.time_min}  # fmt: skip
    if r.gpus_per_node:
        options["gpus-per-node"] = r.gpus_per_node
    if r.mem_gb:
        options["mem"] = f"{int(r.mem_gb * 1024)}M"
    for key in ("partition", "account", "constraint"):
        if getattr(r, key):
            options[key] = getattr(r, key)
    return {k: str(v) for k, v in options.items()}


def submitit_parameters(run: Run) -> dict:
    r = run.resources
    params = dict(name=f"{run.experiment}:{run.name}", nodes=r.nodes, tasks_per_node=r.tasks_per_node,
                  cpus_per_task=r.cpus_per_task, timeout_min=r.time_min, slurm_signal_delay_s=r.signal_delay_s,
                  slurm_setup=[f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"])  # fmt: skip
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb:
        params["mem_gb"] = r.mem_gb
    if r.partition:
        params["slurm_partition"] = r.partition
    extra = {k: getattr(r, k) for k in ("account", "constraint") if getattr(r, k)}
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def print_dry_run(exp: Experiment, runs: List[Run], cluster: str) -> None:
    print(f"# experiment {exp.name} ({exp.path}): {len(runs)} run(s), cluster {cluster}")
    for run in runs:
        print(f"\n## {run.name}  ->  {run.dir}")
        if cluster == "slurm":
            print("sbatch " + " ".join(f"--{k}={v}" for k, v in sbatch_options(run).items())
                  + f" --signal=USR2@{run.resources.signal_delay_s} --requeue")  # fmt: skip
        print(shlex.join(["fairseq-train", *run.train_args]))
        print(shlex.join(["fairseq-eval-lm", *run.eval_args]))


# -- plain sbatch scripts ---------------------------------------------------------------------------
def _shell(args: List[str], runs_dir: Path) -> str:
    """Quote for bash, writing the checkout and the runs directory as $REPO and $RUNS."""
    out = []
    for arg in args:
        for prefix, var in ((str(runs_dir), "$RUNS"), (str(ROOT), "$REPO")):
            if arg == prefix or arg.startswith(prefix + "/"):
                rest = arg[len(prefix) :]
                out.append(f'"{var}{rest}"' if re.fullmatch(r"[\w./,=+-]*", rest) else shlex.quote(arg))
                break
        else:
            out.append(shlex.quote(arg))
    return " ".join(out)


SBATCH_BODY = """\
set -uo pipefail
REPO="${{REPO:-$SLURM_SUBMIT_DIR}}"   # the efficient-lm checkout (submit from there, or export REPO)
RUNS="${{RUNS:-{runs_dir}}}"
RUN="{run_dir}"
export PYTHONPATH="$REPO${{PYTHONPATH:+:$PYTHONPATH}}"
cd "$REPO"
if [ -f "$RUN/eval.json" ]; then echo "finished already: $RUN/eval.json"; exit 0; fi
mkdir -p "$RUN"

# One task per GPU; fairseq reads its rank and the rendezvous from SLURM_*. slurm.train is fairseq-train,
# plus: on SIGUSR2 it finishes the update, saves checkpoint_last.pt and exits 75. A rerun resumes from it.
srun --unbuffered python -m slurm.train {train} >> "$RUN/train.log" 2>&1 &
train=$!
trap 'echo "USR2: saving checkpoint_last.pt, then requeueing"; kill -USR2 $train' USR2   # --signal=B:USR2@...
code=0; wait $train || code=$?
while kill -0 $train 2>/dev/null; do code=0; wait $train || code=$?; done   # wait returns early on the trap
if [ "$code" = 75 ]; then scontrol requeue "$SLURM_JOB_ID"; exit 0; fi
if [ "$code" != 0 ]; then echo "fairseq-train failed ($code):"; tail -n 20 "$RUN/train.log"; exit "$code"; fi

fairseq-eval-lm {eval} > "$RUN/eval.log" 2>&1 || {{ tail -n 20 "$RUN/eval.log"; exit 1; }}
python -m slurm.job eval-json "$RUN"   # eval.log -> eval.json (the results table reads it)
"""


def _relative(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(ROOT))
    except ValueError:
        return str(path)


def emit_sbatch(exp: Experiment, runs: List[Run], runs_dir: Path, out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        header = [f"#SBATCH --{k}={v}" for k, v in sbatch_options(run).items()]
        header += [f"#SBATCH --signal=B:USR2@{run.resources.signal_delay_s}", "#SBATCH --requeue",
                   "#SBATCH --open-mode=append", f"#SBATCH --output=slurm-{exp.name}-%j.out"]  # fmt: skip
        default_runs = "$REPO/runs/" + exp.name if runs_dir == ROOT / "runs" / exp.name else str(runs_dir)
        body = SBATCH_BODY.format(experiment=exp.name, runs_dir=default_runs, run_dir=_shell([str(run.dir)], runs_dir).strip('"'),
                                  train=_shell(run.train_args, runs_dir), eval=_shell(run.eval_args, runs_dir))  # fmt: skip
        text = "\n".join(["#!/bin/bash", f"# {exp.name} [{run.name}], from {exp.path.name}: generated by",
                          f"#   python -m slurm.launch {exp.path.name}{' --sweep' if run.swept else ''} --emit-sbatch DIR",
                          f"# Submit from the repository root: sbatch {_relative(out_dir)}/{run.name}.sbatch",
                          *header, "", body])  # fmt: skip
        path = out_dir / f"{run.name}.sbatch"
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


# -- running ----------------------------------------------------------------------------------------
def write_run_dirs(exp: Experiment, runs_dir: Path, runs: List[Run]) -> None:
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "experiment.json").write_text(experiments.snapshot(exp) + "\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    for run in runs:
        run.dir.mkdir(parents=True, exist_ok=True)
        snapshot = {**run.to_json(), "git_commit": commit or None, "experiment_file": str(exp.path),
                    "train_command": [fairseq_tool("fairseq-train"), *run.train_args],
                    "eval_command": [fairseq_tool("fairseq-eval-lm"), *run.eval_args]}  # fmt: skip
        (run.dir / "run.json").write_text(json.dumps(snapshot, indent=2) + "\n")


def report(run: Run, result=None, error: BaseException = None) -> bool:
    if error is None and isinstance(result, dict) and "value" in result:
        print(
            f"[{run.name}] done: {result['subset']} {result['metric']} {result['value']:.4f} ({run.dir / 'eval.json'})"
        )
        return True
    if error is None:
        print(f"[{run.name}] stopped before the end ({result}); rerun with --resume to continue")
        return False
    from slurm.job import log_tail

    print(f"[{run.name}] FAILED: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    print("  " + log_tail(run.dir / "train.log" if not (run.dir / "eval.log").exists() else run.dir / "eval.log").replace("\n", "\n  "))  # fmt: skip
    return False


# -- progress while a run trains ----------------------------------------------------------------------
PROGRESS_EVERY_S = 10  # at most one progress line per run this often (and the first and last as they come)


class LogProgress:
    """The newest update, train loss and valid loss of a run's ``train.log`` (fairseq's ``--log-format json``
    lines), read incrementally."""

    def __init__(self, run: Run):
        self.log, self.offset, self.partial = run.dir / "train.log", 0, ""
        self.update = self.loss = self.valid = None
        args = run.train_args
        self.max_update = args[args.index("--max-update") + 1] if "--max-update" in args else "?"

    def read(self) -> None:
        if not self.log.exists():
            return
        with open(self.log, errors="replace") as f:
            f.seek(self.offset)
            text = self.partial + f.read()
            self.offset = f.tell()
        *lines, self.partial = text.split("\n")
        for line in lines:
            for tag, prefix in (("train_inner", ""), ("train", "train_"), ("valid", "valid_")):
                if f"| {tag} | {{" in line:
                    try:
                        stats = json.loads(line.split(f"| {tag} | ", 1)[1])
                    except ValueError:
                        break
                    self.update = stats.get(f"{prefix}num_updates", self.update)
                    if tag == "valid":
                        self.valid = stats.get("valid_loss", self.valid)
                    else:
                        self.loss = stats.get(f"{prefix}loss", self.loss)
                    break

    def line(self) -> str:
        valid = f", valid loss {self.valid}" if self.valid is not None else ""
        return f"update {self.update}/{self.max_update}: train loss {self.loss}{valid}"


@contextlib.contextmanager
def progress_lines(run: Run, every_s: float = PROGRESS_EVERY_S):
    """While the block runs, print ``[run] update U/M: ...`` from its train.log: the first as soon as it is
    there, then at most every ``every_s`` seconds, the last when the block ends; and when evaluation starts."""
    stop, started = threading.Event(), time.monotonic()

    def follow():
        progress, shown, last_print, evaluating = LogProgress(run), None, 0.0, False
        while True:
            stopped = stop.wait(1.0)
            progress.read()
            due = shown is None or stopped or time.monotonic() - last_print >= every_s
            state = (progress.update, progress.valid)
            if progress.update is not None and state != shown and due:
                print(f"[{run.name}] {progress.line()} ({time.monotonic() - started:.0f} s)", flush=True)
                shown, last_print = state, time.monotonic()
            if not evaluating and (run.dir / "eval.log").exists():
                print(f"[{run.name}] training finished; evaluating (log: {run.dir / 'eval.log'})", flush=True)
                evaluating = True
            if stopped:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``run_dir/.launch.lock`` while the block runs (the training's own lock primitive,
    ``plugins.resume.try_lock``). Yields None when this process holds it, else the holder's line."""
    from plugins.resume import release_lock, try_lock  # loaded already: validation parsed --user-dir plugins

    fd, holder = try_lock(str(run_dir / ".launch.lock"))
    if fd is None:
        yield holder
        return
    try:
        yield None
    finally:
        release_lock(fd)


def run_local(runs: List[Run], max_parallel: int) -> bool:
    from slurm.job import TrainAndEvaluate

    def one(run):
        with run_lock(run.dir) as holder:
            if holder is not None:
                print(f"[{run.name}] skipped: another launcher ({holder}) is running it; "
                      f"rerun with --resume once that one has stopped, if it did not finish", flush=True)  # fmt: skip
                return True
            return train_and_evaluate(run)

    def train_and_evaluate(run):
        print(f"[{run.name}] started: {run.dir}", flush=True)
        try:
            with progress_lines(run):
                result = TrainAndEvaluate(run)()
            return report(run, result)
        except Exception as e:  # noqa: BLE001  (reported with the log's tail; the other runs go on)
            return report(run, error=e)

    with ThreadPoolExecutor(max(max_parallel, 1)) as pool:
        return all(list(pool.map(one, runs)))


def run_debug(runs: List[Run], runs_dir: Path) -> bool:
    import submitit

    from slurm.job import TrainAndEvaluate

    executor = submitit.AutoExecutor(folder=runs_dir / ".submitit", cluster="debug")
    ok = True
    for run in runs:
        job = executor.submit(TrainAndEvaluate(run, in_process=True))
        ok &= report(run, job.result())
    return ok


def run_slurm(runs: List[Run], runs_dir: Path, array: bool, max_parallel: int, wait: bool) -> bool:
    import submitit

    from slurm.job import TrainAndEvaluate

    r = runs[0].resources
    executor = submitit.AutoExecutor(folder=runs_dir / ".submitit" / "%j", cluster="slurm",
                                     slurm_max_num_timeout=r.max_requeues)  # fmt: skip
    if array:
        executor.update_parameters(**{**submitit_parameters(runs[0]), "name": runs[0].experiment},
                                   slurm_array_parallelism=max(max_parallel, 1))  # fmt: skip
        with executor.batch():
            jobs = [executor.submit(TrainAndEvaluate(run)) for run in runs]
    else:
        jobs = []
        for run in runs:
            executor.update_parameters(**submitit_parameters(run))
            jobs.append(executor.submit(TrainAndEvaluate(run)))
    ids = {run.name: job.job_id for run, job in zip(runs, jobs)}
    (runs_dir / "jobs.json").write_text(json.dumps(ids, indent=2) + "\n")
    for run, job in zip(runs, jobs):
        print(f"[{run.name}] submitted: job {job.job_id}, logs {runs_dir / '.submitit' / job.job_id}", flush=True)
    if not wait:
        print(f"watch with: squeue -u $USER; results: python -m recipes.report {runs_dir}")
        return True
    ok = True
    pending = list(zip(runs, jobs))
    while pending:
        for run, job in list(pending):
            if job.done():
                pending.remove((run, job))
                try:
                    ok &= report(run, job.results()[0])
                except Exception as e:  # noqa: BLE001
                    ok &= report(run, error=e)
        time.sleep(2)
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    exp, runs_dir, runs = prepare(args)
    if args.dry_run:
        print_dry_run(exp, runs, args.cluster)
        return 0
    if args.emit_sbatch:
        for path in emit_sbatch(exp, runs, runs_dir, Path(args.emit_sbatch)):
            print(path)
        return 0
    runs = check_existing(runs, args.resume)
    if not runs:
        print("nothing to run: every run has finished")
        return 0
    write_run_dirs(exp, runs_dir, runs)
    if args.cluster == "local":
        ok = run_local(runs, args.max_parallel)
    elif args.cluster == "debug":
        ok = run_debug(runs, runs_dir)
    else:
        ok = run_slurm(runs, runs_dir, args.array, args.max_parallel, args.wait)
    if args.cluster != "slurm" or args.wait:
        print(f"results table and loss curves: python -m recipes.report {runs_dir}")
    return 0 if ok else 1


def cli(argv=None) -> None:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress and results as they come, also into a pipe or a file
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # fairseq's and hydra's info lines are noise here
    try:
        sys.exit(main(argv))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
