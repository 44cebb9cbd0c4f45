"""Compatibility shims for fairseq-fixed 0.12.3.1 on current numpy.

numpy 2 removed ``np.compat``; fairseq's ``TokenBlockDataset(break_mode="eos")`` still uses
``np.compat.long``, which breaks LM sampling (``fairseq-interactive``/``fairseq-generate``) and
``--sample-break-mode eos``. Restoring the one alias keeps a user's numpy-2 environment intact
instead of pinning ``numpy<2`` (which would break every package built against numpy 2).
"""

import types

import numpy as np


def patch_numpy() -> None:
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)
    elif not hasattr(np.compat, "long"):
        np.compat.long = np.int64
