from . import efficient_lm, lstm_stateful, presets  # noqa: F401  (presets register architectures)
