"""Same command, same seed: bitwise-identical loss curves on CPU, for every ``*_tiny`` preset.

Every ``efficient_lm`` preset named ``*_tiny`` (read from fairseq's architecture registry, so a new
mechanism's tiny preset is covered with no new test code) trains for ``UPDATES`` updates with dropout,
Adam and segment memory over contiguous streams of the embedded corpus, twice, in two separate processes
with different ``PYTHONHASHSEED``s (so nothing may depend on set/dict hash order). The per-update losses
and gradient norms must be identical to the last bit (``float.hex``). The real ``fairseq-train`` loop is
compared bitwise in ``test_kill_resume.py`` (an uninterrupted run against a killed-and-resumed one).

GPU: cuDNN/cuBLAS kernels and atomics-based reductions (e.g. ``index_add_``, the backward of embedding
lookups and of scatter/gather) are not bitwise reproducible by default; this test runs on CPU only.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPDATES, SEGMENT, STREAMS = 30, 32, 4


def tiny_presets() -> list:
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return sorted(a for a, m in ARCH_MODEL_NAME_REGISTRY.items() if m == "efficient_lm" and a.endswith("_tiny"))


def train_curve(arch: str, seed: int = 1, updates: int = UPDATES) -> list:
    """(loss, grad norm) per update, as ``float.hex`` strings, of ``arch`` trained in process."""
    import numpy as np
    import torch
    from fairseq.models import ARCH_CONFIG_REGISTRY

    from plugins.criterions.aux_cross_entropy import AuxCrossEntropyCriterion
    from plugins.models.efficient_lm import EfficientLM, EfficientLMConfig
    from plugins.tasks.stream_dataset import SegmentStreamDataset
    from recipes.corpus import generate

    torch.set_num_threads(1)
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)  # the preset's defaults
    cfg = EfficientLMConfig()
    for name, value in vars(args).items():
        setattr(cfg, name, value)
    cfg.dropout, cfg.tokens_per_sample, cfg.max_target_positions = 0.1, SEGMENT, SEGMENT
    dictionary = _byte_dictionary()
    task = argparse.Namespace(source_dictionary=dictionary, target_dictionary=dictionary, token_unit="byte")
    torch.manual_seed(seed)
    model = EfficientLM.build_model(cfg, task)
    criterion = AuxCrossEntropyCriterion(task, sentence_avg=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    text = generate(STREAMS * SEGMENT * (updates + 1), seed=5).encode()
    tokens = np.array([4 + b if b != 10 else dictionary.eos() for b in text])
    data = SegmentStreamDataset(tokens, eos=dictionary.eos(), pad=dictionary.pad(), segment_len=SEGMENT,
                                streams_per_rank=STREAMS, world_size=1, rank=0)  # fmt: skip
    curve = []
    model.train()
    for i in range(updates):
        torch.manual_seed(seed + i)  # as fairseq does every update
        sample = data.collater([data[i]])
        optimizer.zero_grad()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.step()
        curve.append((loss.item().hex(), norm.item().hex()))
    return curve


def _byte_dictionary():
    from fairseq.data import Dictionary

    d = Dictionary()
    for b in range(256):
        d.add_symbol(str(b))
    return d


def _curves_in_a_new_process(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_tiny_preset_gives_bitwise_identical_curves_in_two_processes():
    first, second = _curves_in_a_new_process("1"), _curves_in_a_new_process("2")
    assert sorted(first) == tiny_presets() and {"full_tiny", "xl_tiny"} <= set(first)
    for arch in first:
        assert len(first[arch]) == UPDATES
        assert first[arch] == second[arch], arch
        assert len({tuple(step) for step in first[arch]}) > 1, arch  # it trained: the loss changed


def test_a_different_seed_gives_a_different_curve():
    """The control: the comparison above can fail."""
    assert train_curve("xl_tiny", seed=1, updates=3) != train_curve("xl_tiny", seed=2, updates=3)


if __name__ == "__main__":  # one process: every tiny preset's curve, as one JSON line
    sys.path.insert(0, str(ROOT))
    from fairseq import utils

    utils.import_user_module(argparse.Namespace(user_dir=str(ROOT / "plugins")))
    print(json.dumps({arch: train_curve(arch) for arch in tiny_presets()}))
