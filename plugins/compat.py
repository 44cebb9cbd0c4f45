"""Compatibility shims for fairseq-fixed 0.12.3.1 on current numpy.

numpy 2 removed ``np.compat``; fairseq's ``TokenBlockDataset(break_mode="eos")`` still uses
``np.compat.long``, which breaks LM sampling (``fairseq-interactive``/``fairseq-generate``) and
``--sample-break-mode eos``. Restoring the one alias keeps a user's numpy-2 environment intact
instead of pinning ``numpy<2`` (which would break every package built against numpy 2).
"""

import types
import warnings

import numpy as np

# fairseq 0.12 composes its configuration with hydra 1.0's API; hydra >= 1.1 warns about it at every
# start (about 22 lines on stderr, before any error line of ours). The configuration is unaffected.
HYDRA_DEPRECATIONS = (
    r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental",
    r"The version_base parameter is not specified",
    r"In '.*': Usage of deprecated keyword in package header",
    r"'.*' is validated against ConfigStore schema",
    r"The strict flag in the compose API is deprecated",
)


def patch_numpy() -> None:
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)
    elif not hasattr(np.compat, "long"):
        np.compat.long = np.int64


def silence_hydra_deprecations() -> None:
    for message in HYDRA_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=r"\s*" + message, category=UserWarning)
