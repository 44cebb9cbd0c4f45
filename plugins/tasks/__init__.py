from . import segment_lm  # noqa: F401
