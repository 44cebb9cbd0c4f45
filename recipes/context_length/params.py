"""Parameter counts of the study's presets at a given vocabulary (the numbers quoted in the README).

    python -m recipes.context_length.params --vocab 260 full_tiny universal_tiny lstm_stateful_tiny

For each preset: total parameters, parameters stored in the layers, and the layer weights *applied* per
token (a shared layer applied D times counts D times): 2 x that is the per-token matmul FLOPs of the
layers (attention scores, which grow with the context, come on top and are the same for shared and
unshared layers).
"""

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(os.path.abspath(__file__)).parents[2]


def build(arch: str, vocab: int, tokens_per_sample: int = 64):
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    model_cls = ARCH_MODEL_REGISTRY[arch]
    cfg = model_cls.__dataclass()
    for name, value in vars(args).items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    cfg.tokens_per_sample, cfg.max_target_positions = tokens_per_sample, tokens_per_sample
    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    return model_cls.build_model(cfg, SimpleNamespace(target_dictionary=d, source_dictionary=d))


def count(model) -> dict:
    decoder = model.decoder
    total = sum(p.numel() for p in model.parameters())
    if hasattr(decoder, "layers"):  # efficient_lm
        stored = sum(p.numel() for p in decoder.layers.parameters())
        applied = stored * decoder.num_layers // len(decoder.layers)
    else:  # lstm_stateful
        stored = applied = sum(p.numel() for p in decoder.lstm.parameters())
    return {"total": total, "layers_stored": stored, "layers_applied": applied}


def main(argv=None) -> None:
    from fairseq import utils

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("presets", nargs="+", help="--arch names")
    p.add_argument("--vocab", type=int, required=True, help="dictionary size including the 4 specials")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    utils.import_user_module(argparse.Namespace(user_dir=str(ROOT / "plugins")))
    print("| preset | vocab | parameters | layer parameters stored | layer weights applied per token |")
    print("|---|---:|---:|---:|---:|")
    for arch in a.presets:
        c = count(build(arch, a.vocab))
        print(f"| {arch} | {a.vocab} | {c['total']:,} | {c['layers_stored']:,} | {c['layers_applied']:,} |")


if __name__ == "__main__":
    main()
