"""``fairseq-train`` that saves and stops cleanly when asked (SIGUSR2), for time limits and preemption.

    python -m slurm.train <fairseq-train arguments>

Identical to ``fairseq-train`` except on SIGUSR2 (what Slurm sends ``signal_delay_s`` before a time
limit or at preemption, and what the submitit job forwards): training finishes the current update,
validates, writes ``checkpoint_last.pt`` and exits with ``PREEMPTED`` (75). Rerunning the same command
resumes from that checkpoint exactly (same update count, data position and learning-rate schedule:
they are all in fairseq's checkpoint, and the stream memory of ``segment_lm`` too).

How it stops: through fairseq's own ``--stop-time-hours`` test in ``validate_and_save``. The signal
adds a huge offset to this process's training clock; with several processes fairseq averages the
clocks of all ranks at every update (an all-reduce), so every rank sees the jump at the same update
and they stop together (a per-rank flag could stop one rank an update before the others and hang
them). The offset is never saved: the checkpoint keeps the true training time.

It also fixes fairseq's Slurm rendezvous for CPU jobs of one task per node (``slurm/cpu_nodes.py``).
"""

import logging
import os
import signal
import sys

PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with checkpoint_last.pt written; run the same command again
_NEVER_HOURS = "1e9"  # --stop-time-hours when none is given: real training time never reaches it
_OFFSET_S = 1e18  # added to the clock once signalled: far past any --stop-time-hours, even averaged over ranks

logger = logging.getLogger("slurm.train")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # fairseq-train's log format (set before anything logs: the first log call would fix Python's default)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout)  # fmt: skip
    if "--stop-time-hours" not in argv:
        argv += ["--stop-time-hours", _NEVER_HOURS]
    requested = {"stop": False}

    def on_signal(signum, frame):
        if not requested["stop"]:
            logger.warning(f"{signal.Signals(signum).name}: finishing this update, then saving checkpoint_last.pt")
        requested["stop"] = True

    previous = signal.signal(signal.SIGUSR2, on_signal)

    from fairseq.trainer import Trainer
    from fairseq_cli import train as fairseq_train

    from slurm import cpu_nodes

    cpu_nodes.install()  # CPU jobs of one task per node: the rank and world size from SLURM_* (fairseq's are 0)

    seen = {}  # the trainer and its latest epoch iterator: did training end by itself?

    class StoppableTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["trainer"] = self

        def get_train_iterator(self, *args, **kwargs):
            seen["epoch_itr"] = super().get_train_iterator(*args, **kwargs)
            return seen["epoch_itr"]

        def _local_cumulative_training_time(self):
            elapsed = super()._local_cumulative_training_time()
            return elapsed + _OFFSET_S if requested["stop"] else elapsed

        def state_dict(self):
            state = super().state_dict()
            if requested["stop"]:  # the true time, not the offset clock
                state["extra_state"]["previous_training_time"] = Trainer._local_cumulative_training_time(self)
            return state

    original, fairseq_train.Trainer = fairseq_train.Trainer, StoppableTrainer
    saved_argv, sys.argv = sys.argv, ["fairseq-train", *argv]
    try:
        fairseq_train.cli_main()
        release_process_group()
    finally:
        fairseq_train.Trainer, sys.argv = original, saved_argv
        # a stop asked after training ended has nothing left to do: ignored, not the default (which kills)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN if previous in (signal.SIG_DFL, None) else previous)
    if requested["stop"] and finished(seen):
        logger.info("training had reached its end when the stop was asked: finished (exit 0), nothing to resume")
        return 0
    return PREEMPTED if requested["stop"] else 0


def release_process_group() -> None:
    """After training ended on every rank: wait for all ranks, then tear the process group down before the
    interpreter exits. fairseq leaves it alive; a rank whose peers already exited could then abort in gloo's
    threads at exit ("terminate called without an active exception", seen on a 2-node CPU job), failing the
    job step after a complete training."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finished(seen: dict) -> bool:
    """Training reached --max-update, or the end of the last epoch of --max-epoch: a stop signal that came
    after the last update must not make the job look preempted (and be requeued to train update N+1)."""
    trainer, epoch_itr = seen.get("trainer"), seen.get("epoch_itr")
    if trainer is None:
        return False
    optimization = trainer.cfg.optimization
    if optimization.max_update and trainer.get_num_updates() >= optimization.max_update:
        return True
    return bool(optimization.max_epoch and epoch_itr is not None and epoch_itr.epoch >= optimization.max_epoch
                and epoch_itr.end_of_epoch())  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
