"""Options a checkpoint predates: a model saved before an option existed is rebuilt with that option's
default, which is the behaviour the model was trained with (every new option's default keeps the old
computation: e.g. ``--span-window inclusive``, ``--sparse-summary-blocks 1``, ``--init-range 0``).

fairseq rebuilds a model from the ``cfg.model`` stored in its checkpoint (an OmegaConf dict without the
dataclass schema, or an ``argparse.Namespace`` for old checkpoints); a field added to the config later
is absent there, and reading it stops ``fairseq-eval-lm``, a resume or the hub with
``ConfigAttributeError: Missing key``."""

import dataclasses

from omegaconf import DictConfig, open_dict


def fill_missing_options(cfg, config_class) -> list:
    """Set every field of ``config_class`` that ``cfg`` lacks to its default; return their names.
    Interpolated defaults (``II("task.tokens_per_sample")``) are left to the model's own fallbacks."""
    missing = []
    for f in dataclasses.fields(config_class):
        if (f.name in cfg) if isinstance(cfg, DictConfig) else hasattr(cfg, f.name):
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if isinstance(value, str) and value.startswith("${"):
            continue
        if isinstance(cfg, DictConfig):
            with open_dict(cfg):
                cfg[f.name] = value
        else:
            setattr(cfg, f.name, value)
        missing.append(f.name)
    return missing
