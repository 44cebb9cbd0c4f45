"""What every preset file shares."""

import dataclasses

from ...attention import ATTENTION_REGISTRY


def foreign_options(attention) -> set:
    """Options that only mechanisms other than ``attention`` declare (e.g. --cmem-len for relative)."""
    if attention not in ATTENTION_REGISTRY:
        return set()
    names = {f.name for entry in ATTENTION_REGISTRY.values() for f in dataclasses.fields(entry.config)}
    return names - {f.name for f in dataclasses.fields(ATTENTION_REGISTRY[attention].config)}


def defaults(args, **values):
    """Set ``values`` on ``args`` where the command line did not: presets only set defaults. An option of
    another mechanism than the attention in force is left unset (at its default): ``--arch compressive_tiny
    --attention relative`` switches the mechanism without the preset's --cmem-len blocking it."""
    foreign = foreign_options(getattr(args, "attention", values.get("attention")))
    for name, value in values.items():
        if name in foreign and not hasattr(args, name):
            continue
        setattr(args, name, getattr(args, name, value))
