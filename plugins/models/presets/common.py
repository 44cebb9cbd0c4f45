"""What every preset file shares."""

import dataclasses
import logging

from ...attention import ATTENTION_REGISTRY

logger = logging.getLogger(__name__)
ABSOLUTE_POSITIONS = ("sinusoidal", "learned")


def foreign_options(attention) -> set:
    """Options that only mechanisms other than ``attention`` declare (e.g. --cmem-len for relative)."""
    if attention not in ATTENTION_REGISTRY:
        return set()
    names = {f.name for entry in ATTENTION_REGISTRY.values() for f in dataclasses.fields(entry.config)}
    return names - {f.name for f in dataclasses.fields(ATTENTION_REGISTRY[attention].config)}


def positions_of_another_attention(args, attention, values) -> set:
    """The preset's ``pos_emb`` (and then its ``mem_len``) when they belong to another attention than the one in
    force: ``--arch xl_tiny --attention full`` keeps the preset's sizes, but Transformer-XL's relative positions
    are computed inside relative attention, so the model gets the default --pos-emb (sinusoidal), and a memory
    needs positions that stay valid across segments, so none. What the command line typed always stands."""
    entry = ATTENTION_REGISTRY.get(attention)
    pos_emb = values.get("pos_emb")
    if entry is None or pos_emb is None or hasattr(args, "pos_emb") or pos_emb in entry.cls.encodes_positions:
        return set()
    if pos_emb in ABSOLUTE_POSITIONS or pos_emb == "none":
        return set()  # input-side positions: every attention takes them
    dropped = {"pos_emb"}
    if values.get("mem_len", 0) > 0 and not hasattr(args, "mem_len"):
        dropped.add("mem_len")  # the default --pos-emb sinusoidal is absolute: no memory
    logger.info(
        f"--attention {attention}: the preset's --pos-emb {pos_emb}"
        + (f" and --mem-len {values['mem_len']}" if "mem_len" in dropped else "")
        + f" belong to --attention {values.get('attention', '?')}; using the defaults (give --pos-emb / --mem-len to choose)"
    )
    return dropped


def defaults(args, **values):
    """Set ``values`` on ``args`` where the command line did not: presets only set defaults. An option of
    another mechanism than the attention in force is left unset (at its default): ``--arch compressive_tiny
    --attention relative`` switches the mechanism without the preset's --cmem-len blocking it, and
    ``--arch xl_tiny --attention full`` without its relative positions and memory blocking it."""
    attention = getattr(args, "attention", values.get("attention"))
    foreign = foreign_options(attention) | positions_of_another_attention(args, attention, values)
    for name, value in values.items():
        if name in foreign and not hasattr(args, name):
            continue
        setattr(args, name, getattr(args, name, value))
