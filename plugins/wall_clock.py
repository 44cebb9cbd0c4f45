"""fairseq's ``wall`` clock across a resume.

``fairseq-train`` logs ``wall``, the seconds since training started, with every ``train_inner`` and epoch line;
the reports plot loss against it and read a run's training time from it (``recipes/report.py``). fairseq
0.12.3 keeps it in a ``StopwatchMeter`` of the ``default`` aggregator, started once when the trainer is built
(``metrics.log_start_time("wall")``). A checkpoint saves every meter (``extra_state["metrics"]``), but a
stopwatch's state holds only its *stopped* intervals (``sum``: 0 for a watch that never stopped), and loading it
leaves the watch stopped (``start_time = None``, so ``elapsed_time`` is 0). After a resume every ``wall`` is
logged as 0 and the time trained before the restart is lost.

Here a running stopwatch also saves how long it has been running (``running_s``), and loading such a state
restarts it that far along: ``wall`` continues from the value it had when the checkpoint was saved. The time
between a kill and the restart is not counted, nor the updates after the checkpoint that the restart trains
again (they are counted once, when trained again). Stopwatches that are stopped when the checkpoint is saved
(``train_wall``: started and stopped around each update) are saved and loaded as before. A checkpoint written
without this field loads as before (wall from 0).
"""

import time

from fairseq.logging.meters import StopwatchMeter

_STATE_DICT, _LOAD_STATE_DICT = StopwatchMeter.state_dict, StopwatchMeter.load_state_dict


def _state_dict(self) -> dict:
    state = _STATE_DICT(self)
    if self.start_time is not None:  # running: how far along it is (the wall clock, always running)
        state["running_s"] = time.perf_counter() - self.start_time
    return state


def _load_state_dict(self, state: dict) -> None:
    _LOAD_STATE_DICT(self, state)
    if state.get("running_s") is not None:
        self.start_time = time.perf_counter() - state["running_s"]


def install() -> None:
    """Patch ``StopwatchMeter`` (idempotent)."""
    StopwatchMeter.state_dict, StopwatchMeter.load_state_dict = _state_dict, _load_state_dict
