"""How the control core talks to the objects behind the other actors.

The core calls a port's methods: an ask returns a future whose ``.get()`` gives the
answer, ``method.defer(...)`` is a tell (fire and forget). Behind a Pykka proxy
(control/actors.py) the call runs on the callee's thread; ``Inline`` runs the same pure
object on the caller's thread and hands back a completed future, so the same core runs
in-process (tests/test_control_core.py).

``Waits`` times every ``.get()`` the core blocks in, per actor kind: the round's actor
overhead, reported in the serve stats (``actor_wait``).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, TypeVar

log = logging.getLogger("cosine.control.ports")

KINDS = ("router", "fuser", "drafters", "verifiers")

F = TypeVar("F", bound=Callable[..., Any])


def told(method: F) -> F:
    """For the methods the core calls as tells: an error is logged, never raised. A tell
    has no future to carry it, and a Pykka actor that raises on a tell stops."""

    @functools.wraps(method)
    def safe(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception:  # noqa: BLE001 - see above
            log.exception("%s failed", method.__qualname__)
            return None
    return safe  # type: ignore[return-value]


class Done:
    """A future that is already resolved (the ``get`` of pykka.Future)."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self._value, self._error = value, error

    def get(self, timeout: float | None = None) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class _InlineCall:
    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Done:
        try:
            return Done(self._fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - like an actor's ask: the error travels in the future
            return Done(error=e)

    def defer(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a tell has no future to carry its error: log it
            log.exception("told %s failed", getattr(self._fn, "__qualname__", self._fn))


class Inline:
    """Stand-in for an actor proxy: calls ``obj``'s methods on the caller's thread."""

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        return _InlineCall(attr) if callable(attr) else Done(attr)


class Waits:
    """Seconds the core spent blocked in ``.get()`` per actor kind: in total, and in the
    round under way (``end_round`` hands those over and starts the next)."""

    def __init__(self) -> None:
        self.total = dict.fromkeys(KINDS, 0.0)
        self.calls = dict.fromkeys(KINDS, 0)
        self.round = dict.fromkeys(KINDS, 0.0)

    def get(self, future: Any, kind: str, timeout: float | None = None) -> Any:
        t = time.perf_counter()
        try:
            return future.get(timeout=timeout)
        finally:
            dt = time.perf_counter() - t
            self.total[kind] += dt
            self.round[kind] += dt
            self.calls[kind] += 1

    def end_round(self) -> dict[str, float]:
        done, self.round = self.round, dict.fromkeys(KINDS, 0.0)
        return done

    def snapshot(self, rounds: int) -> dict[str, Any]:
        """Per actor kind: milliseconds and ``.get()`` calls per round, and seconds in all.
        The router's and fuser's are the actor overhead proper (a thread hop around pure
        work); the workers' include the worker's own compute."""
        n = max(rounds, 1)
        return {"per_round_ms": {k: 1e3 * s / n for k, s in self.total.items()},
                "gets_per_round": {k: c / n for k, c in self.calls.items()},
                "total_s": dict(self.total)}
