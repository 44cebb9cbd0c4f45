"""Shared fixtures of the plugin tests.

The plugin is imported exactly the way ``fairseq-* --user-dir plugins`` imports it (module name
``plugins``, its parent first on ``sys.path``), so a later ``--user-dir`` in the same process finds
the same module and nothing registers twice. Never import it through another path.
"""

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fairseq import utils
from fairseq.data import Dictionary

REPO = Path(os.path.abspath(__file__)).parents[1]  # not resolve(): fairseq compares abspath()s

utils.import_user_module(argparse.Namespace(user_dir=str(REPO / "plugins")))

import plugins  # noqa: E402  (the module fairseq just imported, not a second copy)
from plugins.models.efficient_lm import EfficientLM, EfficientLMConfig  # noqa: E402

assert Path(plugins.__file__).resolve().parent == (REPO / "plugins").resolve(), "plugins was imported from another path"


def byte_corpus_bin(tmp: Path, scale: float = 0.02) -> Path:
    """A small byte-level slice of the embedded corpus (``recipes.corpus --scale``), binarized by the
    project's own script into ``tmp/data-bin``: the data of the end-to-end CLI tests."""
    raw, out = tmp / "raw", tmp / "data-bin"
    subprocess.run([sys.executable, "-m", "recipes.corpus", "--out", raw, "--scale", str(scale)], check=True,
                   cwd=REPO, capture_output=True)  # fmt: skip
    splits = [a for s in ("train", "valid", "test") for a in (f"--{s}", raw / f"{s}.txt")]
    subprocess.run([sys.executable, "-m", "preprocess.text", *splits, "--level", "byte", "--binarizer", "fast",
                    "--out", out], check=True, cwd=REPO, capture_output=True)  # fmt: skip
    return out


@contextlib.contextmanager
def one_slurm_cluster_at_a_time():
    """Held while a test module runs its local Slurm cluster (tests/test_slurm*.py): clusters started by
    other pytest workers or checkouts on this machine wait, since they share munged (the first one to start
    it stops it) and the CPUs (each two-node job takes every node)."""
    with open("/tmp/efficient-lm-slurm-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cli: runs the real fairseq command-line tools in subprocesses (slow)")


def make_dictionary(num_symbols: int = 20) -> Dictionary:
    """4 specials (<s>=0, <pad>=1, </s>=2, <unk>=3) and ``num_symbols`` words w0, w1, ..."""
    d = Dictionary()
    for i in range(num_symbols):
        d.add_symbol(f"w{i}")
    return d


def make_task(dictionary: Dictionary, token_unit: str = "word") -> SimpleNamespace:
    """The parts of a fairseq task that ``EfficientLM.build_model`` and the criterion read."""
    return SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, token_unit=token_unit)


def model_config(**overrides):
    """``EfficientLMConfig`` with tiny sizes and dropout 0. ``tokens_per_sample`` and
    ``max_target_positions`` are ``II(task...)`` interpolations, so they are set explicitly."""
    values = dict(
        decoder_layers=2,
        decoder_embed_dim=16,
        decoder_ffn_embed_dim=32,
        decoder_attention_heads=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        tokens_per_sample=32,
        max_target_positions=64,
    )
    values.update(overrides)
    cfg = EfficientLMConfig()
    for name, value in values.items():
        if not hasattr(cfg, name):
            raise AttributeError(f"EfficientLMConfig has no field '{name}'")
        setattr(cfg, name, value)
    return cfg


def build_lm(dictionary: Dictionary = None, seed: int = 0, **overrides) -> EfficientLM:
    """Build ``efficient_lm`` the way fairseq does: ``build_model(cfg, task)``."""
    torch.manual_seed(seed)
    dictionary = dictionary if dictionary is not None else make_dictionary()
    return EfficientLM.build_model(model_config(**overrides), make_task(dictionary))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def lm():
    """The ``build_lm`` factory: ``lm(pos_emb="none", mem_len=4, ...)``."""
    return build_lm


@pytest.fixture
def lm_config():
    """The ``model_config`` factory."""
    return model_config


@pytest.fixture
def dictionary() -> Dictionary:
    return make_dictionary()


@pytest.fixture
def task_stub():
    """The ``make_task`` factory."""
    return make_task
