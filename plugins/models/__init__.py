from . import efficient_lm, presets  # noqa: F401  (presets register architectures of efficient_lm)
