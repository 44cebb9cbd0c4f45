"""Presets (``--arch NAME``): one file per mechanism; each function only sets defaults, anything given on
the command line wins. ``--arch efficient_lm`` (registered by fairseq itself) means the plain defaults.

Every preset cites its source (a paper table or an official script) in its docstring."""

from . import adaptive_span, compressive, full, linear, lstm, reformer, sparse, transformer_xl, universal  # noqa: F401  (register on import)
