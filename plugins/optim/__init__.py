"""Optimizers fairseq does not have (registered with ``@register_optimizer``, selected by ``--optimizer``)."""

from . import adagrad_clip  # noqa: F401  (registers on import)
