from . import aux_cross_entropy  # noqa: F401
