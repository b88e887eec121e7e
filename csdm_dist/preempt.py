"""Stop cleanly when the scheduler asks: a signal (SLURM's SIGUSR1 before a time limit or preemption) sets a
flag; at the next step boundary the ranks agree (one tiny all-reduce) to save a checkpoint and return, so the
job can requeue itself and resume from exactly that step.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1,)):
        self.flag = False
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the next step boundary", signum)
        self.flag = True

    def requested(self) -> bool:
        """True on every rank as soon as any rank got the signal (collective: call it on all ranks)."""
        t = torch.tensor([1.0 if self.flag else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
