"""When is a model drafter worth engaging for a request?

A weight-free drafter (prompt lookup, n-gram table) costs nothing to bring in. A model
drafter must first prefill the request's prompt (0.8 s for the Qwen2.5-Coder-0.5B on a
128-token prompt on 2 CPU cores), which only pays if drafting with it then saves more
than that over the tokens still to generate. ``Engagement`` learns, per domain, the
goodput (committed tokens per second of drafting plus verification) of rounds drafted
with each model drafter and of rounds drafted by weight-free drafters alone, and engages
a model drafter for a request when

    tokens_left * (1 / goodput_free - 1 / goodput_with_it) > its prefill time.

Without both numbers for the domain it falls back on the drafter's declared domains: a
declared drafter is engaged (trust the deployment until data says otherwise); an
undeclared one is probed once per domain: one request drafts weight-free first (so the
domain's free goodput is known), then engages it, so its goodput there is measured.
Pure and deterministic. Formulas: docs/algorithms.md, "Engaging model drafters".
"""

from __future__ import annotations

FREE = ""  # the arm of rounds drafted by weight-free drafters only


class Engagement:
    def __init__(self, keep: float = 0.9):
        if not 0.0 <= keep < 1.0:
            raise ValueError(f"Engagement: keep must be in [0, 1), got {keep}")
        self.keep = keep
        self._sums: dict[tuple[str, str], list[float]] = {}  # (domain, arm) -> [tokens, seconds]
        self._probed: set[tuple[str, str]] = set()           # (domain, drafter) probes started

    def observe(self, domain: str, arm: str, tokens: float, seconds: float) -> None:
        """One speculative round: ``arm`` is the model drafter that drafted in it (FREE if
        none did); ``tokens`` it committed in ``seconds`` of drafting plus verification."""
        if seconds <= 0.0:
            return
        s = self._sums.setdefault((domain, arm), [0.0, 0.0])
        s[0] = self.keep * s[0] + tokens
        s[1] = self.keep * s[1] + seconds

    def goodput(self, domain: str, arm: str) -> float | None:
        s = self._sums.get((domain, arm))
        return s[0] / s[1] if s and s[1] > 0.0 else None

    def decide(self, domain: str, drafter: str, declared: bool, tokens_left: int, prefill_s: float) -> bool:
        """Engage ``drafter`` for a request of ``domain`` now? (Engaging is for the rest of
        the request: its prompt prefill is paid once.)"""
        g_model, g_free = self.goodput(domain, drafter), self.goodput(domain, FREE)
        if g_model is not None and g_free is not None:
            return tokens_left * (1.0 / g_free - 1.0 / g_model) > prefill_s
        if declared:
            return True
        if g_free is None:  # weight-free rounds first: they give the probe its baseline
            return False
        if (domain, drafter) in self._probed:
            return False
        self._probed.add((domain, drafter))
        return True

    def snapshot(self) -> dict[str, dict[str, float]]:
        """domain -> arm ("free" or drafter) -> goodput, for the serve stats."""
        out: dict[str, dict[str, float]] = {}
        for (dom, arm), (t, s) in self._sums.items():
            if s > 0.0:
                out.setdefault(dom, {})[arm or "free"] = t / s
        return out
