"""Attention registry: one file per mechanism, registered where it is defined.

``--attention NAME`` selects ``ATTENTION_REGISTRY[NAME]``. Each entry carries its config dataclass; its
fields become command-line options of ``efficient_lm`` automatically (see ``models/efficient_lm.py``),
so adding a mechanism is adding a file here and an import below.
"""

# Import every mechanism so it registers itself (fairseq only auto-imports models/ and tasks/).
from . import adaptive_span, compressive, full, linear, lsh, naive, relative, sparse  # noqa: E402,F401
from .base import ATTENTION_REGISTRY, Attention, AuxLoss, build_attention, register_attention

__all__ = ["ATTENTION_REGISTRY", "Attention", "AuxLoss", "build_attention", "register_attention"]
