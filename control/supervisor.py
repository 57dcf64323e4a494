"""`cosine up`'s supervisor: restarts the children of a LocalCluster that exit unexpectedly.

`up()` calls ``tick(now)`` a few times a second. A child that exited is logged with its
exit code or signal and restarted after the back-off of control/restart.py; one that
crash-loops is left down with a loud log line while the cluster keeps serving without it
(serve marks a dead drafter dead and decodes with the others or plainly; a left-down
gateway leaves the ZeroMQ endpoint serving). Serving is impossible only when serve itself
or every verifier is left down: ``tick`` then returns why, and `up()` stops the cluster.
A restarted child that never reports ready within the start timeout is killed, which
counts as a crash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cosine.config import SupervisorConfig
from cosine.control.restart import RestartPolicy, describe_exit, restart_delay

log = logging.getLogger("cosine.control.supervisor")


def policy_of(sv: SupervisorConfig) -> RestartPolicy:
    return RestartPolicy(backoff_s=sv.restart_backoff_s, max_backoff_s=sv.restart_backoff_max_s,
                         max_restarts=sv.crash_loop_restarts, window_s=sv.crash_loop_window_s)


@dataclass
class ChildRecord:
    """What the supervisor knows of one child across its restarts."""

    exits: list[float] = field(default_factory=list)  # times of its unexpected exits
    restarts: int = 0
    due: float | None = None       # when the pending restart is due
    left_down: bool = False
    reported: bool = True          # the current instance's readiness was logged (or needs none)


class Supervisor:
    """Watches ``cluster`` (a LocalCluster: children(), role(), respawn())."""

    def __init__(self, cluster: Any, policy: RestartPolicy | None = None, start_timeout_s: float | None = None):
        self.cluster = cluster
        self.policy = policy or policy_of(cluster.cfg.supervisor)
        self.start_timeout_s = start_timeout_s if start_timeout_s is not None else cluster.start_timeout_s
        self.records: dict[str, ChildRecord] = {}

    def tick(self, now: float) -> str | None:
        """Handle exits, due restarts and readiness; returns why serving is impossible, if it is."""
        for name, child in self.cluster.children().items():
            rec = self.records.setdefault(name, ChildRecord())
            if rec.left_down:
                continue
            if rec.due is not None:
                if now >= rec.due:
                    self._restart(name, rec)
                continue
            rc = child.proc.poll()
            if rc is None:
                self._watch_start(name, child, rec, now)
            else:
                self._exited(name, child, rc, rec, now)
        return self._fatal()

    def summary(self) -> dict[str, int]:
        """Restarts per child (only those restarted at least once)."""
        return {n: r.restarts for n, r in self.records.items() if r.restarts}

    def left_down(self) -> list[str]:
        return sorted(n for n, r in self.records.items() if r.left_down)

    def _exited(self, name: str, child: Any, rc: int, rec: ChildRecord, now: float) -> None:
        delay = restart_delay(rec.exits, now, self.policy)
        rec.exits.append(now)
        what = describe_exit(rc) + (" (its ssh session ended)" if name in self.cluster.remote_workers else "")
        label = self._label(name)
        if delay is None:
            rec.left_down = True
            tail = "\n".join(list(child.tail)[-10:])
            log.error("%s CRASH-LOOPS: it exited with %s after %d restarts within %.0f s "
                      "([supervisor] crash_loop_restarts / crash_loop_window_s); LEAVING IT DOWN, the cluster "
                      "serves without it until `cosine up` is restarted. Its last output:\n%s",
                      label, what, self.policy.max_restarts, self.policy.window_s, tail)
            return
        rec.due = now + delay
        log.warning("%s (pid %d) exited unexpectedly with %s after %.1f s; restart %d in %.1f s",
                    label, child.proc.pid, what, now - child.started, rec.restarts + 1, delay)

    def _restart(self, name: str, rec: ChildRecord) -> None:
        rec.due = None
        rec.restarts += 1
        child = self.cluster.respawn(name)
        rec.reported = False
        log.warning("restarted %s (restart %d): pid %d", self._label(name), rec.restarts, child.proc.pid)

    def _label(self, name: str) -> str:
        """"drafter good", "verifier verifier-0", "serve"."""
        role = self.cluster.role(name)
        return name if role == name else f"{role} {name}"

    def _watch_start(self, name: str, child: Any, rec: ChildRecord, now: float) -> None:
        if rec.reported:
            return
        if child.ready.is_set():
            rec.reported = True
            log.warning("%s is back (restart %d, pid %d): ready %.1f s after its start", name, rec.restarts,
                        child.proc.pid, now - child.started)
        elif name != "gateway" and now - child.started > self.start_timeout_s:
            # a gateway need not print READY; workers and serve always do
            rec.reported = True
            log.error("%s (pid %d) was not ready %.0f s after its restart; killing it", name, child.proc.pid,
                      self.start_timeout_s)
            child.proc.kill()

    def _fatal(self) -> str | None:
        down = set(self.left_down())
        if "serve" in down:
            return "serve crash-loops"
        if self.cluster.verifiers and self.cluster.verifiers <= down:
            return f"every verifier crash-loops ({', '.join(sorted(self.cluster.verifiers))})"
        return None
