"""Notices a preemption (SIGTERM) so that training stops at a step boundary after saving.

In a multi-process run, JAX's preemption service receives the signal on any process and all
processes agree on the step to stop at (`reached_preemption_sync_point`). A single process has no
such service, so it catches SIGTERM (and SIGINT) itself and stops at the next step.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`should_stop(step)` turns True once the run has been asked to stop (SIGTERM / Ctrl-C)."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signal_name: str | None = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess:
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: stopping after the current step and saving a checkpoint.", self.signal_name)

  def should_stop(self, step: int) -> bool:
    """Called once per step, on every process, with the number of steps done."""
    if self._multiprocess:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = self.signal_name or "SIGTERM"
          return True
      except RuntimeError:  # The preemption service is disabled: nothing to watch.
        return False
      return False
    return self.signal_name is not None

  def close(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
