"""Graceful preemption: a signal (SLURM's SIGTERM, or the one ``sbatch --signal=USR1@120`` sends) asks the training
loop to stop at the next step boundary, where every rank agrees (one all-reduce of the flag, so all save at the
same step), the resumable state is written atomically, and the process exits with ``PREEMPTED_EXIT``. A second
signal during the save only sets the flag again: the save finishes, and the previous state stays loadable until
the new one replaces it in one rename. Anchors: Lightning's SLURM auto-requeue and Megatron-LM's distributed
signal handler (https://github.com/NVIDIA/Megatron-LM, ``megatron/training/dist_signal_handler.py``).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

__all__ = ["PREEMPTED_EXIT", "Preempted", "PreemptionGuard", "parse_signals", "requeue_slurm_job"]

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure; the user is invited to retry"


class Preempted(Exception):
    """Raised by the trainer after it saved the resumable state at ``step`` because a preemption signal came."""

    def __init__(self, step: int, state_file, signal_name: str | None):
        super().__init__(f"preempted by {signal_name or 'a signal'}: state saved at step {step} in {state_file}")
        self.step, self.state_file, self.signal_name = step, state_file, signal_name


def parse_signals(spec: str) -> list[signal.Signals]:
    """``"SIGTERM,SIGUSR1"`` -> the signals (``""``: none); an unknown name raises ValueError naming it."""
    out = []
    for name in (s.strip().upper() for s in spec.split(",") if s.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        sig = getattr(signal.Signals, name, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name}: not a signal that can be caught")
        out.append(sig)
    return out


class PreemptionGuard:
    """While entered, the given signals set :attr:`signal_name` instead of killing the process (handlers can be
    installed from the main thread only; elsewhere the guard does nothing)."""

    def __init__(self, signals: str = "SIGTERM,SIGUSR1"):
        self.signals = parse_signals(signals)
        self.signal_name: str | None = None
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving the state at the next step boundary", self.signal_name)

    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False


def requeue_slurm_job() -> str:
    """``scontrol requeue $SLURM_JOB_ID`` (what Lightning does on SIGUSR1); a line saying what happened."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set (not a SLURM job)"
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"requeue of SLURM job {job} failed: {e}"
    return f"SLURM job {job} requeued"
