"""Efficient transformers for language modeling, as fairseq plugins.

fairseq itself is NOT listed in ``install_requires``: the only release that imports on Python 3.11+
(``fairseq-fixed==0.12.3.1``) requires torchaudio, and every torchaudio release pins one exact torch,
so resolving it would replace the user's torch (and on a CPU machine download GBs of CUDA wheels).
``install.sh`` installs it with ``--no-deps`` plus its real runtime dependencies, built against the
torch that is already there.
"""

from setuptools import find_packages, setup

setup(
    name="efficient-lm",
    version="0.1.0",
    description="Efficient transformers for language modeling (Transformer-XL, Compressive, Sparse, "
    "Reformer, linear attention, adaptive span, all-attention) as fairseq plugins",
    python_requires=">=3.10,<3.13",
    packages=find_packages(
        include=["plugins", "plugins.*", "preprocess", "preprocess.*", "recipes", "recipes.*", "slurm", "slurm.*"]
    ),
    install_requires=[
        "torch>=2.1",  # never reinstalled by install.sh when importable
        "numpy",  # numpy 2 is fine: plugins/compat.py restores the alias fairseq needs
        "sentencepiece>=0.1.99",
        "submitit>=1.5",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "tensorboardX>=2.6",  # fairseq --tensorboard-logdir (and silences its import-time notice)
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "ruff>=0.5", "hypothesis>=6.100"]},
)
