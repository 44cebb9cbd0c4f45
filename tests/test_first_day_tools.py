"""A researcher's first day (issue 17), the tools around training: the complete ``--help`` (item 7), the
launcher from another directory (9), output that arrives while a long step runs (12), and
``fairseq-generate`` on a language model (13). Real command-line tools in subprocesses, as a user runs them.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.attention import ATTENTION_REGISTRY
from plugins.models.efficient_lm import EfficientLMConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
}

pytestmark = pytest.mark.cli


def run(argv, cwd=ROOT, check=True, timeout=600):
    proc = subprocess.run([*map(str, argv)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def only_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# ---- 7. --help lists every model, attention and task option ------------------------------------------------
@pytest.mark.parametrize("arch", ["efficient_lm", "xl_tiny"])
def test_help_lists_every_model_and_attention_option(arch):
    """README's command (``fairseq-train --user-dir plugins --arch efficient_lm --help``): fairseq's own help
    stops before the model's options are added; the plugin prints the complete parser."""
    proc = run([BIN / "fairseq-train", "--user-dir", "plugins", "--task", "segment_lm", "--arch", arch, "--help"])
    out = proc.stdout
    options = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(EfficientLMConfig) if f.name != "_name"}
    options -= {"--tokens-per-sample", "--max-target-positions"}  # the task's (printed with the task's options)
    for entry in ATTENTION_REGISTRY.values():
        options |= {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(entry.config)}
    assert {"--attention", "--mem-len", "--compression-rate", "--lsh-n-hashes", "--sparse-stride"} <= options
    missing = sorted(o for o in options if f"  {o} " not in out and f"  {o}\n" not in out)
    assert not missing, missing
    assert "  --tokens-per-sample " in out and "  --criterion " in out  # task and common options too
    assert out.startswith("usage: fairseq-train") and out.count("usage:") == 1 and proc.stderr == ""


def test_readme_help_command_without_task():
    out = run([BIN / "fairseq-train", "--user-dir", "plugins", "--arch", "efficient_lm", "--help"]).stdout
    assert "  --attention {" in out and "  --mem-len MEM_LEN" in out and "  --lsh-bucket-size " in out


# ---- 13. fairseq-generate on a language model ---------------------------------------------------------------
def test_generate_refuses_a_language_model_task_and_names_the_tools_to_use(tmp_path):
    proc = run([BIN / "fairseq-generate", tmp_path, "--user-dir", "plugins", "--task", "segment_lm",
                "--path", tmp_path / "checkpoint_best.pt"], check=False)  # fmt: skip
    line = only_error_line(proc)
    assert "fairseq-interactive" in line and "from_pretrained" in line and "fairseq-eval-lm" in line, line
