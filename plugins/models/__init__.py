from . import efficient_lm  # noqa: F401
