"""Make a checkpoint written before this project stored plain optimizer settings loadable again.

    python -m recipes.upgrade_checkpoint runs/x/checkpoints/checkpoint_best.pt [more.pt ...]

fairseq's legacy optimizers and lr schedulers (``sgd``, ``adafactor``, ``adagrad``, ...) keep their
settings as an ``argparse.Namespace`` in the saved ``cfg``; torch's safe loader (``weights_only``, used by
every resume and by ``fairseq-eval-lm``) refuses it. Checkpoints written by this project now store a
plain dict there (``plugins.checkpointing.plain_data``); this rewrites an older file the same way:
the model, optimizer state and everything else are unchanged, the file is replaced atomically.

It unpickles the file fully (``weights_only=False``): run it only on checkpoints you wrote yourself.
"""

import argparse
import os
import sys

import torch


def upgrade(path: str) -> bool:
    """Rewrite ``path`` with plain dicts for Namespaces; False if it had none (the file is untouched)."""
    from plugins.checkpointing import plain_data

    state = torch.load(path, map_location="cpu", weights_only=False)  # trusted: the user's own checkpoint
    plain = {**state, "cfg": plain_data(state.get("cfg"))}
    if repr(plain["cfg"]) == repr(state.get("cfg")):
        return False
    tmp = path + ".tmp"
    torch.save(plain, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.upgrade_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files you wrote (they are unpickled fully)")
    args = parser.parse_args(argv)
    missing = [p for p in args.checkpoints if not os.path.isfile(p)]
    if missing:
        sys.exit(f"error: no such checkpoint file: {missing[0]}")
    for path in args.checkpoints:
        print(f"{path}: {'upgraded' if upgrade(path) else 'nothing to change'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
