"""Efficient transformers for language modeling, loaded by ``fairseq-* --user-dir plugins``.

fairseq auto-imports only ``models/`` and ``tasks/`` of a user dir; everything else is imported here,
explicitly, before them (the model's options are built from the attention registry).
"""

from . import checkpointing, distributed, rank_states, resume, wall_clock
from .compat import patch_numpy, silence_hydra_deprecations
from .errors import install_excepthook

patch_numpy()
silence_hydra_deprecations()
install_excepthook()
checkpointing.install()  # atomic checkpoint copies, resume from the newest intact checkpoint
distributed.install()  # rank 0 sends a loaded checkpoint to the other ranks as plain data, unpickled safely
resume.install()  # one training per --save-dir (a lock held for the process's life)
rank_states.install()  # every rank's stream memory in the checkpoint, each rank's back on resume
wall_clock.install()  # the logged wall clock continues after a resume (fairseq logs 0)

from . import attention, criterions, memory, models, modules, optim, tasks, text_encoders  # noqa: E402,F401
from .cli import check_command_line  # noqa: E402

check_command_line()  # a mistyped --arch, a --model-overrides that is no dict: one error line, before fairseq
