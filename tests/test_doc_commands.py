"""Every example command of README.md and docs/ parses (issue 17: none goes stale).

The commands are read from the Markdown code blocks (fenced ``bash``/``sh``/plain blocks and 4-space
indented blocks; ``\\`` continuations joined, ``# comments`` and a trailing ``...`` dropped) and checked
without running anything:

- ``fairseq-train`` / ``fairseq-eval-lm`` / ``fairseq-interactive``: fairseq's own parsers with the plugins
  loaded (``options.get_training_parser`` / ``get_eval_lm_parser`` / ``get_interactive_generation_parser`` +
  ``parse_args_and_arch``), so --arch, --task, --criterion and every option must be known; an
  ``efficient_lm`` config must also pass ``validate_config``;
- ``python -m slurm.launch``: the launcher itself with ``--dry-run`` (the experiment file is loaded, every
  run's fairseq arguments parsed; missing data is only a warning there);
- ``python -m recipes.*`` / ``python -m preprocess.*``: the module's ``main`` (``run``) with its real
  argparse parser, stopped right after the parse (nothing is computed or downloaded). ``a|b|c`` (one of)
  stands for its first value.

Data, checkpoints and run directories need not exist: the options are checked, not the run.
"""

import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_NAME_REGISTRY

from plugins.models.efficient_lm import validate_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PROGRAMS = re.compile(
    r"^(fairseq-train|fairseq-eval-lm|fairseq-interactive|python -m slurm\.launch"
    r"|python -m (?:recipes|preprocess)\.[\w.]+)(\s|$)"
)
ALTERNATIVES = re.compile(r"^[\w-]+(\|[\w-]+)+$")  # `--level byte|char|word`: one of them (the first is checked)


def code_blocks(text: str):
    """The lines of every fenced block (``bash``, ``sh``, ``shell`` or no language) and indented block."""
    fence, block = None, []
    for line in text.splitlines() + [""]:
        if fence is not None:
            if line.strip().startswith("```"):
                if fence != "skip":
                    yield block
                fence, block = None, []
            else:
                block.append(line)
        elif line.strip().startswith("```"):
            if block:  # an indented block just before
                yield block
            language = line.strip()[3:].strip()
            fence = language if language in ("", "bash", "sh", "shell", "console") else "skip"
            block = []
        elif line.startswith("    "):
            block.append(line[4:])
        elif block:
            yield block
            block = []


def commands(page: Path):
    """(line text, argv) of every example command of ``page`` that starts with one of PROGRAMS."""
    for block in code_blocks(page.read_text()):
        joined, current = [], ""
        for line in block:
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            joined.append(current.strip())
            current = ""
        for line in joined:
            if PROGRAMS.match(line):
                argv = shlex.split(line, comments=True)
                yield line, [a.split("|")[0] if ALTERNATIVES.match(a) else a for a in argv]


EXAMPLES = [(f"{page.relative_to(ROOT)}: {line[:70]}", argv) for page in PAGES for line, argv in commands(page)]


def test_the_examples_are_found():
    programs = {argv[0] if argv[0] != "python" else argv[2].split(".")[0] for _, argv in EXAMPLES}
    assert {"fairseq-train", "fairseq-eval-lm", "slurm", "recipes", "preprocess"} <= programs, programs
    assert len(EXAMPLES) >= 25, len(EXAMPLES)


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def stop_after_parsing():
    """argparse's parse_args runs as usual, then the program stops (nothing after the parse runs)."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = parse


def parse_error(call) -> str:
    """'' if ``call()`` parses, else what the parser printed."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            call()
    except _Parsed:
        return ""
    except SystemExit as e:
        if e.code in (0, None):
            return ""
        return err.getvalue().strip() or str(e.code)
    except Exception as e:  # noqa: BLE001  (preprocess's parser raises PreprocessError; anything else is a failure too)
        return f"{type(e).__name__}: {e}"
    return ""


def check_fairseq(argv) -> str:
    program, args = argv[0], [a for a in argv[1:] if a != "..."]
    parser = {"fairseq-train": options.get_training_parser, "fairseq-eval-lm": options.get_eval_lm_parser,
              "fairseq-interactive": options.get_interactive_generation_parser}[program]()  # fmt: skip
    holder = {}
    error = parse_error(lambda: holder.setdefault("args", options.parse_args_and_arch(parser, args)))
    if error or program != "fairseq-train":
        return error
    parsed = holder["args"]
    if ARCH_MODEL_NAME_REGISTRY.get(parsed.arch) == "efficient_lm":
        validate_config(convert_namespace_to_omegaconf(parsed).model)
    return ""


LAUNCHED = set()  # (experiment, --sweep): its runs were validated once already


def check_python_module(argv) -> str:
    module, args = argv[2], argv[3:]
    if module == "slurm.launch":
        from slurm import launch

        parsed = launch.parse_args(args)
        key = (parsed.experiment, parsed.sweep)
        if key in LAUNCHED:  # the same runs again, with other launcher flags (already parsed above)
            return ""
        LAUNCHED.add(key)
        return parse_error(lambda: launch.main([*args, "--dry-run"]) and None)
    program = importlib.import_module(module)
    main = program.run if module.startswith("preprocess.") else program.main  # run(argv): the parse, then the work
    with stop_after_parsing():
        return parse_error(lambda: main(args))


@pytest.mark.parametrize("argv", [argv for _, argv in EXAMPLES], ids=[name for name, _ in EXAMPLES])
def test_every_documented_command_parses(argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' commands run from the repository root (--user-dir plugins, data-bin/)
    check = check_fairseq if argv[0].startswith("fairseq-") else check_python_module
    error = check(argv)
    assert not error, f"{shlex.join(argv)}\n{error}"
