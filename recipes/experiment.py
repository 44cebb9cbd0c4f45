"""Experiment definitions: one YAML file per experiment in ``recipes/experiments/``, turned into runs.

A file names the data, the preset, the ``fairseq-train`` options, the resources and, optionally, a
sweep and the evaluation::

    description: what the experiment shows (and the paper number to compare with, if any)
    base: other.yaml               # optional: start from another file (dicts merge, lists/values replace)
    data: data-bin/ptb             # relative to the working directory (as every path a user types), or absolute
    prepare: python -m preprocess.ptb --raw ../shared/data/ptb --out data-bin/ptb   # printed if data is missing
    arch: xl_tiny                  # the preset (--arch)
    train:                         # fairseq-train options without the leading --; true = a flag; null/false = unset
      tokens-per-sample: 32
      lr: 0.003
    sweep:                         # optional; used with --sweep
      grid: {mem-len: [0, 32, 64]} # every combination of the lists, or
      list: [{arch: full_tiny}, {arch: xl_tiny, mem-len: 64}]   # these points (grid x list if both)
    eval:                          # fairseq-eval-lm options (defaults: gen-subset test, the training
      gen-subset: test             #   tokens-per-sample / batch-size / cpu)
    resources: {nodes: 1, gpus_per_node: 1, cpus_per_task: 8, time_min: 600, partition: null}

Every point of a sweep is a run: its own directory, an exact ``fairseq-train`` argument list and an
``fairseq-eval-lm`` argument list on ``checkpoint_best.pt``. ``validate`` parses both with fairseq's
own option parsers (``--user-dir plugins`` included) and builds the model config, so an unknown
preset or option, or a bad combination, is rejected before anything is submitted.
"""

import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

ROOT = Path(os.path.abspath(__file__)).parents[1]  # not resolve(): fairseq compares abspath()s of --user-dir
EXPERIMENTS = ROOT / "recipes" / "experiments"

# Always given by the launcher: the project's task and criterion, and where a run keeps its files.
FIXED_TRAIN = ["--task", "segment_lm", "--criterion", "aux_cross_entropy"]
OWNED_BY_LAUNCHER = {"save-dir", "tensorboard-logdir", "log-format", "log-file", "user-dir", "task", "criterion",
                     "distributed-world-size", "distributed-port", "distributed-no-spawn", "path"}  # fmt: skip


class UserError(ValueError):
    """Bad experiment input: reported as one ``error:`` line. (Not plugins.errors.UserError: importing
    ``plugins`` imports fairseq, which a submitted job's supervising process does not need.)"""


TOP_LEVEL = {"description", "base", "data", "prepare", "arch", "train", "sweep", "eval", "resources"}


@dataclass
class Resources:
    """What one run asks the cluster for. ``gpus_per_node`` 0 = a CPU job (one task per node)."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None
    time_min: int = 60
    partition: Optional[str] = None
    signal_delay_s: int = 90  # USR2 this long before the time limit: finish the update, save, requeue
    max_requeues: int = 3  # time-limit requeues (preemptions do not count), submitit's slurm_max_num_timeout
    constraint: Optional[str] = None
    account: Optional[str] = None

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)  # one task per GPU: fairseq's Slurm init gives each its rank

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class Run:
    """One point of an experiment: everything needed to train, evaluate and report it."""

    experiment: str
    name: str  # the swept values, e.g. "mem-len=32", or "base"
    swept: Dict[str, Any]
    run_dir: str
    data: str
    train_args: List[str]  # fairseq-train arguments (without the program)
    eval_args: List[str]  # fairseq-eval-lm arguments (without the program)
    resources: Resources = field(default_factory=Resources)

    @property
    def dir(self) -> Path:
        return Path(self.run_dir)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "Run":
        return cls(**{**values, "resources": Resources(**values["resources"])})


@dataclass
class Experiment:
    name: str
    path: Path
    spec: dict  # the merged YAML

    def points(self, sweep: bool) -> List[Dict[str, Any]]:
        """The swept values of every run: ``[{}]`` without ``--sweep`` or without a sweep."""
        spec = self.spec.get("sweep") or {}
        if not sweep or not spec:
            return [{}]
        unknown = set(spec) - {"grid", "list"}
        if unknown:
            raise UserError(f"{self.path}: sweep has unknown keys {sorted(unknown)}: use grid: and/or list:")
        grid = spec.get("grid") or {}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"{self.path}: sweep.grid.{key} must be a non-empty list, got {values!r}")
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        listed = spec.get("list") or [{}]
        if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
            raise UserError(f"{self.path}: sweep.list must be a list of mappings (option: value)")
        return [{**c, **p} for p in listed for c in combos]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_path(path) -> Path:
    """An experiment given as a path, or by name (``xl_memory_ptb`` -> recipes/experiments/xl_memory_ptb.yaml)."""
    path = Path(path)
    for candidate in (path, EXPERIMENTS / path, EXPERIMENTS / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"no experiment file {path}: give a path or a name from {EXPERIMENTS.relative_to(ROOT)}/")


def load(path, _seen=()) -> Experiment:
    path = resolve_path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    unknown = set(spec) - TOP_LEVEL
    if unknown:
        raise UserError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    if "base" in spec:
        base_path = (path.parent / spec["base"]).resolve()
        if base_path in _seen:
            raise UserError(f"{path}: base files form a cycle")
        spec = _merge(load(base_path, (*_seen, path.resolve())).spec, {k: v for k, v in spec.items() if k != "base"})
    return Experiment(name=path.stem, path=path, spec=spec)


def _option(key: str, value) -> List[str]:
    """A YAML option -> argv: ``lr: 0.001`` -> ``--lr 0.001``, ``cpu: true`` -> ``--cpu``, null/false -> nothing."""
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{key}"]
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return [f"--{key}", str(value)]


def _label(swept: Dict[str, Any]) -> str:
    if not swept:
        return "base"
    return ",".join(f"{k}={v}" for k, v in swept.items()).replace("/", "_").replace(" ", "")


def distributed_port(run_dir: str) -> int:
    """A port that is the same for every task of a run and differs between runs (a sweep on one node)."""
    return 10000 + int(hashlib.sha256(run_dir.encode()).hexdigest(), 16) % 50000


def data_dir(exp: Experiment, data: Optional[str] = None) -> Path:
    """The data-bin of ``exp``: ``data`` (the launcher's ``--data``) or the file's ``data:``. A relative path
    is taken against the working directory, like every path typed on a command line and like the file's
    ``prepare:`` command, which writes there: run from the repository root (as the docs do), ``data-bin/ptb``
    is the repository's; run from elsewhere, it is that directory's."""
    value = data or exp.spec.get("data")
    if not value:
        raise UserError(f"{exp.path}: 'data' is required (or give --data DIR)")
    return Path(value).absolute()


def make_runs(exp: Experiment, runs_dir: Path, sweep: bool, data: Optional[str] = None) -> List[Run]:
    """Every run of ``exp`` (the sweep's points with ``sweep``), in ``runs_dir``/<swept values>, on ``data``
    (default: the file's ``data:``; see :func:`data_dir`)."""
    spec = exp.spec
    data = data_dir(exp, data)
    if not spec.get("arch"):
        raise UserError(f"{exp.path}: 'arch' is required")
    runs_dir = Path(runs_dir).absolute()
    resources_spec = spec.get("resources") or {}
    unknown = set(resources_spec) - set(Resources.__dataclass_fields__)
    if unknown:
        raise UserError(f"{exp.path}: unknown resources {sorted(unknown)}; allowed: {', '.join(Resources.__dataclass_fields__)}")  # fmt: skip
    resources = Resources(**resources_spec)
    runs = []
    for swept in exp.points(sweep):
        train = {"arch": spec["arch"], **(spec.get("train") or {}), **swept}
        for key in set(train) & OWNED_BY_LAUNCHER:
            raise UserError(f"{exp.path}: --{key} is set by the launcher (each run has its own directory); remove it")
        run_dir = runs_dir / _label(swept)
        train_args = [str(data), "--user-dir", str(ROOT / "plugins"), *FIXED_TRAIN]
        for key, value in train.items():
            train_args += _option(key, value)
        train_args += ["--save-dir", str(run_dir / "checkpoints"), "--tensorboard-logdir", str(run_dir / "tensorboard"),
                       "--log-format", "json"]  # fmt: skip
        if resources.world_size > 1:  # the rendezvous comes from SLURM_* (fairseq's _infer_slurm_init)
            train_args += ["--distributed-world-size", str(resources.world_size), "--distributed-port",
                           str(distributed_port(str(run_dir))), "--distributed-no-spawn"]  # fmt: skip
        evaluation = {"gen-subset": "test", "tokens-per-sample": train.get("tokens-per-sample"),
                      "batch-size": train.get("batch-size"), "cpu": train.get("cpu"), **(spec.get("eval") or {})}  # fmt: skip
        eval_args = [str(data), "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm",
                     "--path", str(run_dir / "checkpoints" / "checkpoint_best.pt")]  # fmt: skip
        for key, value in evaluation.items():
            eval_args += _option(key, value)
        runs.append(Run(exp.name, _label(swept), swept, str(run_dir), str(data), train_args, eval_args, resources))
    if len({r.run_dir for r in runs}) != len(runs):
        raise UserError(f"{exp.path}: two sweep points have the same values")
    return runs


@contextlib.contextmanager
def _parser_errors(where: str):
    """argparse prints usage and exits; turn that into one UserError line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else "invalid options"
        raise UserError(f"{where}: {message}") from None


def validate(exp: Experiment, runs: List[Run], require_data: bool = True) -> None:
    """Parse every run's exact argument lists with fairseq's parsers and build the configs (no data is
    read, nothing is trained); check that the data is there (only warn with ``require_data=False``: a dry
    run or sbatch scripts written on a machine without the data)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    data = Path(runs[0].data)
    if not (data / "dict.txt").is_file():
        hint = f": prepare it with `{exp.spec['prepare']}`" if exp.spec.get("prepare") else ""
        message = f"{exp.path}: data dir {data} not found (no dict.txt){hint}, or give --data DIR"
        if require_data:
            raise UserError(message)
        print(f"warning: {message}", file=sys.stderr)
    for run in runs:
        where = f"{exp.path.name} [{run.name}]"
        with _parser_errors(where):
            args = options.parse_args_and_arch(options.get_training_parser(), input_args=run.train_args)
        with _parser_errors(where):
            cfg = convert_namespace_to_omegaconf(args)
        if ARCH_MODEL_NAME_REGISTRY.get(args.arch) == "efficient_lm":
            from plugins.errors import UserError as PluginError
            from plugins.models.efficient_lm import validate_config

            try:
                validate_config(cfg.model)  # what build_model checks, before any data is read
            except PluginError as e:
                raise UserError(f"{where}: {e}") from None
        with _parser_errors(f"{where} eval"):
            options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=run.eval_args)
        subset = next((run.eval_args[i + 1] for i, a in enumerate(run.eval_args) if a == "--gen-subset"), "test")
        for split in {subset, getattr(args, "valid_subset", "valid").split(",")[0], "train"}:
            if (data / "dict.txt").is_file() and not (data / f"{split}.idx").is_file():
                raise UserError(f"{where}: data dir {data} has no '{split}' split")


def fairseq_tool(name: str) -> str:
    """The fairseq console script next to this Python (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def snapshot(exp: Experiment) -> str:
    return json.dumps(exp.spec, indent=2, sort_keys=True)
