"""The restart policy of `cosine up`'s supervisor, as pure functions of a restart history.

A child that exits unexpectedly is restarted after an exponential back-off: ``backoff_s``
after its first exit in a while, doubling with every further exit inside ``window_s``, up
to ``max_backoff_s``. A child that already had ``max_restarts`` restarts inside the last
``window_s`` is crash-looping: it is left down (restarting it again would only burn CPU
and fill the log). A child that ran longer than ``window_s`` since its last crash starts
over at ``backoff_s``. Defaults (1 s doubling to 30 s; 5 restarts within 60 s) come from
``[supervisor]`` in config.toml (docs/reliability.md, "Supervision").
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 60.0


def restart_delay(exits: Sequence[float], now: float, policy: RestartPolicy) -> float | None:
    """Seconds to wait before restarting a child that exited at ``now``, or None: it is
    crash-looping, leave it down. ``exits`` are the times of its earlier unexpected exits
    (each of which was followed by a restart); only those inside the window count."""
    recent = sum(1 for t in exits if now - t < policy.window_s)
    if recent >= policy.max_restarts:
        return None
    return min(policy.max_backoff_s, policy.backoff_s * 2.0 ** recent)


def describe_exit(returncode: int) -> str:
    """"code 3" or "signal SIGKILL" (a negative return code is the signal that ended it)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"
