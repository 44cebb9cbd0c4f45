"""Child processes that die with their parent, even when the parent is SIGKILLed.

Without it a killed launcher leaves its training running (parent 1), and a killed ``python -m
preprocess.*`` leaves its ``fairseq_cli.preprocess`` child running to completion. No import beyond the
standard library: ``preprocess/`` uses it too.
"""

import os
import signal
import sys


def die_with_parent():
    """A ``preexec_fn`` that makes the child die (SIGKILL) when this process dies, even by SIGKILL: Linux's
    parent-death signal (``prctl(PR_SET_PDEATHSIG)``). Without it a killed launcher leaves its training
    running (parent 1), and a ``--resume`` would start a second one on the same run. ``None`` elsewhere.
    The signal follows the *thread* that forked the child: the runner threads live until their child ends.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing is imported after the fork
    parent = os.getpid()

    def preexec():
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before the prctl: no signal will come
            os._exit(1)

    return preexec
