"""``python -m recipes.benchmarks.suite.worker KIND SPEC_JSON``: measure one case, print ``RESULT {json}``."""

import json
import os
import sys
from typing import Dict

import torch


def measure_case(kind: str, spec: Dict) -> Dict:
    torch.manual_seed(0)
    if kind == "layer":
        from . import layer

        if spec.get("peer"):
            from .peers import PEERS

            forward = PEERS[spec["peer"]].build(spec)
        else:
            forward = layer.build_ours(spec)
        return layer.measure(spec, forward, spec.get("repeats", 3))
    if kind == "generation":
        from . import generation

        return generation.measure(spec)
    if kind == "mechanism":
        from . import mechanisms

        return mechanisms.measure(spec)
    if kind == "gpu":
        from . import gpu

        return gpu.training_mfu(spec)
    raise ValueError(f"unknown case kind '{kind}'")


if __name__ == "__main__":
    import argparse

    from fairseq import utils

    from .isolate import REPO, report

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    utils.import_user_module(argparse.Namespace(user_dir=str(REPO / "plugins")))  # as fairseq-* --user-dir does
    report(measure_case(sys.argv[1], json.loads(sys.argv[2])))
