"""A checkpoint is a pickle, and unpickling runs code: a crafted checkpoint must not run anything.

The crafted file below is a real ``torch.save`` checkpoint whose ``extra_state`` creates an object
with ``__reduce__`` -> ``pathlib.Path.touch(MARKER)``: harmless, but any loader that unpickles it fully
leaves the marker file behind.
"""

import pathlib

import pytest
import torch
from fairseq import checkpoint_utils

from plugins.checkpointing import checkpoint_problem, inspect_checkpoint, load_checkpoint_safely
from plugins.errors import UserError


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra_state": {"payload": _RunsCode(str(marker))}}, path)
    assert not marker.exists()
    return path, marker


def test_the_projects_loaders_refuse_a_crafted_checkpoint_without_running_it(crafted):
    path, marker = crafted
    with pytest.raises(UserError, match=r"refusing to load .* it would create .*pathlib\.(Posix)?Path"):
        load_checkpoint_safely(str(path))
    problem, unsafe = inspect_checkpoint(str(path))  # the resume check: intact, but names what it would create
    assert problem is None and any("touch" in name or "Path" in name for name in unsafe), unsafe
    assert checkpoint_problem(str(path)) is None
    assert not marker.exists()


def test_a_plain_checkpoint_loads_with_the_safe_loader(tmp_path):
    torch.save({"model": {"w": torch.ones(3)}, "extra_state": {"epoch": 1, "val_loss": 2.5}}, tmp_path / "ok.pt")
    assert load_checkpoint_safely(str(tmp_path / "ok.pt"))["model"]["w"].sum() == 3


@pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6),
    reason="torch < 2.6 unpickles fully by default: fairseq's loaders run a crafted checkpoint's code",
)
def test_fairseqs_own_loader_refuses_it_too_on_torch_2_6_and_later(crafted, monkeypatch):
    """fairseq-train (resume, --restore-file), fairseq-eval-lm/-interactive/-generate all load through
    ``load_checkpoint_to_cpu``, which calls ``torch.load`` without ``weights_only``: safe only because
    torch >= 2.6 defaults to ``weights_only=True`` and only while TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is unset."""
    path, marker = crafted
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()


# ---- checkpoints that predate an option ---------------------------------------------------------------
@pytest.mark.parametrize("absent", [("score_chunk_elements",), ("span_window", "sparse_summary_blocks")])
def test_a_model_saved_before_an_option_existed_is_rebuilt_with_its_default(absent):
    """fairseq rebuilds a model from the checkpoint's ``cfg.model`` (an OmegaConf dict without the schema):
    an option added later is absent there. Before ``fill_missing_options``, fairseq-eval-lm stopped with
    ``ConfigAttributeError: Missing key score_chunk_elements`` on every model trained before that option."""
    import dataclasses

    from conftest import make_dictionary, make_task, model_config
    from omegaconf import OmegaConf

    from plugins.models.efficient_lm import EfficientLM, EfficientLMConfig

    values = dataclasses.asdict(model_config(attention="relative", pos_emb="relative", mem_len=8))
    saved = OmegaConf.create({k: v for k, v in values.items() if k not in absent})
    model = EfficientLM.build_model(saved, make_task(make_dictionary()))
    defaults = EfficientLMConfig()
    assert all(saved[name] == getattr(defaults, name) for name in absent)
    assert sum(p.numel() for p in model.parameters()) > 0
