"""Adaptive speculation control: per-request draft length by expected goodput, a
speculation on/off switch against plain decoding, a global pipeline bias, and the
per-round verify-token cap.

Goodput (committed tokens per second), not acceptance rate, drives every decision:
a high acceptance rate is worthless if drafting or verifying the extra tokens costs
more than it saves. Formulas and defaults: docs/algorithms.md, "Adaptive speculation control".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from cosine.config import SpeculationConfig

from .costs import CostBook, VerifyFit, ewma


@dataclass(frozen=True)
class DraftPlan:
    speculate: bool
    draft_len: int
    tree_width: int


OFF = DraftPlan(False, 0, 1)


def expected_tokens(alpha: float, k: int, alpha_next: float | Sequence[float] | None = None) -> float:
    """Tokens committed per round (accepted drafts plus the bonus token) for a k-token draft.

    One rate (``alpha_next`` None): each position is accepted with probability alpha given
    its parent was, E(k) = 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha).
    Two rates: the first position with alpha, every later one with alpha_next given its
    parent was, E(k) = 1 + alpha * (1 + alpha_next + ... + alpha_next^(k-1)).
    Per position (``alpha_next`` a sequence: positions 2, 3, ...; the last one repeats):
    E(k) = 1 + sum_i prod_{j <= i} p_j. Acceptance runs in streaks (a drafter that got the
    first tokens of an easy stretch usually gets the rest), so the deeper positions are
    likelier than the first ones, and these models ask for the longer drafts that pay.
    """
    if k <= 0:
        return 1.0
    if alpha_next is None:
        return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    if isinstance(alpha_next, (int, float)):
        tail = float(k) if alpha_next >= 1.0 else (1.0 - alpha_next ** k) / (1.0 - alpha_next)
        return 1.0 + alpha * tail
    later = list(alpha_next) or [alpha]
    e, reach = 1.0, 1.0
    for i in range(k):
        reach *= alpha if i == 0 else later[min(i - 1, len(later) - 1)]
        e += reach
    return e


class _Rates:
    """Per draft position i, the chance it is accepted given position i - 1 was, as decayed
    counts shrunk towards a prior: (hits_i + m * prior_i) / (trials_i + m)."""

    def __init__(self, keep: float, n: int):
        self.keep = keep
        self.h = [0.0] * n
        self.t = [0.0] * n

    def add(self, accepted: int, depth: int) -> None:
        """A round of ``depth`` drafted positions (per path) with ``accepted`` accepted:
        position i was a trial when i - 1 positions were accepted, a hit when i were."""
        for i in range(len(self.h)):
            tt = float(i < depth and accepted >= i)
            self.h[i] = self.keep * self.h[i] + float(tt > 0 and accepted > i)
            self.t[i] = self.keep * self.t[i] + tt

    def rates(self, prior: Sequence[float], m: float) -> tuple[float, ...]:
        """Position i shrinks towards max(its prior, position i - 1's rate): a deep position
        is only measured when drafts reach it, so after short drafts a low prior would keep
        them short for good; acceptance runs in streaks, so without evidence a deeper
        position is taken to be at least as likely as the one before."""
        out: list[float] = []
        for i, (h, t) in enumerate(zip(self.h, self.t)):
            p = prior[min(i, len(prior) - 1)]
            out.append((h + m * (max(p, out[-1]) if out else p)) / (t + m))
        return tuple(out)


@dataclass
class _ReqState:
    est: tuple[float, ...]               # per draft position: P(accepted | parent accepted)
    rates: _Rates
    draft_step_s: float | None = None   # non-overlapped draft time per draft step
    tok_ema: float | None = None         # committed tokens per round (EMA)
    time_ema: float | None = None        # seconds per round (EMA)
    domain: str = ""                     # seeds its rates; its rounds teach the domain's
    rounds_on: int = 0                   # speculative rounds since (re)enabled
    off: bool = False
    off_rounds: int = 0
    last_plan: DraftPlan | None = None

    def goodput(self) -> float | None:
        return None if self.tok_ema is None or not self.time_ema else self.tok_ema / self.time_ema


class SpeculationController:
    """Plans each request's next round and learns from what each round cost and yielded."""

    def __init__(self, draft_len: int = 4, min_draft_len: int = 1, max_draft_len: int = 8,
                 tree_width: int = 1, max_tree_width: int = 4, adaptive: bool = True,
                 disable_below_ratio: float = 1.0, max_verify_tokens: int = 256, probe_every: int = 16,
                 ema: float = 0.5, alpha_init: float = 0.6, min_rounds: int = 2,
                 idle_high: float = 0.25, queue_high: int = 8, bias_step: float = 0.5,
                 bias_decay: float = 0.9, verify_decay: float = 0.95, verify_token_frac: float = 0.05,
                 alpha_keep: float = 0.85, alpha_prior: float = 4.0, min_gain: float = 0.0,
                 costs: CostBook | None = None):
        if not 1 <= min_draft_len <= draft_len <= max_draft_len:
            raise ValueError("SpeculationController: need 1 <= min_draft_len <= draft_len <= max_draft_len, got "
                             f"{min_draft_len}, {draft_len}, {max_draft_len}")
        if not 1 <= tree_width <= max_tree_width:
            raise ValueError(f"SpeculationController: need 1 <= tree_width <= max_tree_width, got "
                             f"{tree_width}, {max_tree_width}")
        self.draft_len, self.min_draft_len, self.max_draft_len = draft_len, min_draft_len, max_draft_len
        self.tree_width, self.max_tree_width = tree_width, max_tree_width
        self.adaptive = adaptive
        self.disable_below_ratio = disable_below_ratio
        self.max_verify_tokens = max_verify_tokens
        self.probe_every = max(1, probe_every)
        self.ema = ema
        self.min_rounds = max(1, min_rounds)
        self.idle_high, self.queue_high = idle_high, queue_high
        self.bias_step, self.bias_decay = bias_step, bias_decay
        self.min_gain = min_gain
        # Pipeline bias in draft steps; beyond the draft-length range it spills into tree width.
        self.bias_limit = float((max_draft_len - min_draft_len) + (max_tree_width - 1))
        self.bias = 0.0
        # Per request and draft position: acceptance rates from counts decayed by alpha_keep
        # per round and shrunk with alpha_prior pseudo-trials towards the domain's rates
        # (shrunk towards the global ones, shrunk towards alpha_init): one missed round must
        # not halve the draft length.
        self.alpha_keep, self.alpha_prior, self.alpha_init = alpha_keep, alpha_prior, alpha_init
        self.rates_global: tuple[float, ...] = (alpha_init,) * max_draft_len  # seeds new requests
        self._g_rates = _Rates(0.95, max_draft_len)
        # Per domain, the same decayed counts: a new request starts from its domain's rates
        # (shrunk towards the global ones), so a code request after a German one does not
        # open with German-length drafts.
        self._d_rates: dict[str, _Rates] = {}
        # The verify line, the plain step and the global draft step live in the cost book
        # (shared with the batch gate when the controller passes its own).
        self.costs = costs or CostBook(verify_trees=VerifyFit(verify_decay), token_frac=verify_token_frac, keep=ema)
        self._reqs: dict[str, _ReqState] = {}

    @classmethod
    def from_config(cls, cfg: SpeculationConfig, max_verify_tokens: int, **kw) -> "SpeculationController":
        return cls(draft_len=cfg.draft_len, min_draft_len=cfg.min_draft_len, max_draft_len=cfg.max_draft_len,
                   tree_width=cfg.tree_width, max_tree_width=max(cfg.tree_width, kw.pop("max_tree_width", 4)),
                   adaptive=cfg.adaptive, disable_below_ratio=cfg.disable_below_ratio, min_gain=cfg.min_gain,
                   max_verify_tokens=max_verify_tokens, **kw)

    def _state(self, rid: str, domain: str = "") -> _ReqState:
        st = self._reqs.get(rid)
        if st is None:
            st = self._reqs[rid] = _ReqState(self.prior(domain), _Rates(self.alpha_keep, self.max_draft_len),
                                             draft_step_s=self.draft_step_global, domain=domain)
        return st

    def prior(self, domain: str = "") -> tuple[float, ...]:
        """The per-position rates a new request of ``domain`` starts from: the domain's
        decayed counts shrunk towards the global rates (the global rates for an unseen domain)."""
        d = self._d_rates.get(domain)
        return d.rates(self.rates_global, self.alpha_prior) if d is not None else self.rates_global

    def forget(self, rid: str) -> None:
        self._reqs.pop(rid, None)

    # -- cost model (control/costs.py) -----------------------------------------------------
    def verify_s(self, n_tokens: int) -> float:
        """Predicted verify time of an n-token tree (0 before any measurement)."""
        return self.costs.tree_verify_s(n_tokens)

    @property
    def draft_step_global(self) -> float | None:
        """One draft step over all requests (a new request's first estimate)."""
        return self.costs.draft_step_s

    @property
    def plain_tok_s(self) -> float | None:
        """EMA of a plain (one-token) target step."""
        return self.costs.plain_step_s

    def best_draft_len(self, rid: str, tree_width: int = 1) -> int:
        """argmax over k in [min, max] of E(k) / (verify_s(1 + k*width) + draft_step_s*k);
        ties go to the shorter draft (less wasted work)."""
        st = self._state(rid)
        step = st.draft_step_s or 0.0
        best_k, best_g = self.draft_len, -1.0
        for k in range(self.min_draft_len, self.max_draft_len + 1):
            cost = self.verify_s(1 + k * tree_width) + step * k
            e = expected_tokens(st.est[0], k, st.est[1:])
            g = e / cost if cost > 0 else e
            if g > best_g * (1.0 + 1e-9):
                best_k, best_g = k, g
        return best_k

    # -- planning ------------------------------------------------------------------------
    def _shape(self, k: int) -> tuple[int, int]:
        """Apply the pipeline bias: lengthen/shorten first, then widen/narrow the tree."""
        target = k + round(self.bias)
        width = self.tree_width
        if target > self.max_draft_len:
            width += target - self.max_draft_len
        elif target < self.min_draft_len:
            width -= self.min_draft_len - target
        k = min(self.max_draft_len, max(self.min_draft_len, target))
        return k, min(self.max_tree_width, max(1, width))

    def plan(self, rid: str, domain: str = "") -> DraftPlan:
        """The next round's plan; ``domain`` seeds a request's first plan (see ``prior``)."""
        if not self.adaptive:
            return DraftPlan(True, self.draft_len, self.tree_width)
        st = self._state(rid, domain)
        if st.off:
            st.off_rounds += 1
            if st.off_rounds < self.probe_every:
                st.last_plan = OFF
                return OFF
            st.off, st.off_rounds, st.rounds_on = False, 0, 0  # probe: measure speculation afresh
            st.tok_ema = st.time_ema = None
            st.rates = _Rates(self.alpha_keep, self.max_draft_len)
            st.est = self.prior(st.domain)
        # A request's first round is planned from its domain's rates and the global draft
        # step and verify line once any request measured them; draft_len before that.
        measured = st.tok_ema is not None or (st.draft_step_s is not None and self.verify_s(1) > 0)
        k = self.best_draft_len(rid, self.tree_width) if measured else self.draft_len
        k, width = self._shape(k)
        st.last_plan = DraftPlan(True, k, width)
        return st.last_plan

    def explain(self, rid: str) -> str:
        """The estimates behind a request's plan, for debug logs."""
        st = self._reqs.get(rid)
        if st is None:
            return "new"
        step = st.draft_step_s or 0.0
        return (f"rates={'/'.join(f'{a:.2f}' for a in st.est)} step={step * 1e3:.0f}ms "
                f"verify={self.verify_s(1) * 1e3:.0f}+{(self.verify_s(2) - self.verify_s(1)) * 1e3:.1f}ms/node "
                f"goodput={st.goodput() or 0:.1f}")

    def rates(self, rid: str) -> tuple[float, ...]:
        """This request's estimated acceptance rate per draft position, each given its parent
        was accepted (the global rates if new)."""
        st = self._reqs.get(rid)
        return st.est if st else self.rates_global

    def rate_at(self, rid: str, position: int) -> float:
        """P(draft position ``position`` (1-based) is accepted | the one before it was), for
        this request; positions past the last estimated one take its rate."""
        rates = self.rates(rid)
        return rates[min(max(position, 1), len(rates)) - 1]

    def is_off(self, rid: str) -> bool:
        st = self._reqs.get(rid)
        return bool(st and st.off)

    def goodput(self, rid: str) -> float | None:
        st = self._reqs.get(rid)
        return st.goodput() if st else None

    def gain_floors(self, rid: str) -> tuple[float, float]:
        """(node, step): the fewest expected tokens that pay for one more tree node, and for
        one more draft step plus its node. Adding work that yields g tokens for c seconds
        raises a round's goodput G (tokens/s) iff g > G * c; c is the verifier's measured
        cost per tree node, plus this request's draft step. Never below ``min_gain``; only
        that before anything is measured."""
        st = self._reqs.get(rid)
        # The rate the saved time would earn: the request's measured goodput, but never below
        # plain decoding's (the off-switch keeps it there) nor, before its first round, the
        # cost model's prediction from its domain's rates. Traced: a code request's first
        # round, with nothing measured, verified 16 nodes (two 8-step chains) for 0 tokens;
        # after it its goodput read 1.4 tok/s and the next round verified 17.
        measured = st.goodput() if st is not None else None
        g = max(measured or 0.0, self.plain_rate or 0.0,
                (self.predicted_goodput(rid) or 0.0) if st is not None and measured is None else 0.0)
        if not g:
            return self.min_gain, self.min_gain
        node_s = max(0.0, self.verify_s(2) - self.verify_s(1))
        step_s = (st.draft_step_s if st is not None else self.draft_step_global) or 0.0
        return max(self.min_gain, g * node_s), max(self.min_gain, g * (node_s + step_s))

    @property
    def plain_rate(self) -> float | None:
        """Plain decoding tokens per second (1 / EMA of a one-token target step)."""
        return 1.0 / self.plain_tok_s if self.plain_tok_s else None

    # -- feedback ------------------------------------------------------------------------
    def observe_plain(self, verify_s_single_token: float) -> None:
        self.costs.observe_plain_step(verify_s_single_token)

    def observe(self, rid: str, drafted: int, accepted: int, draft_s: float, verify_s: float,
                depth: int | None = None, overlapped_s: float = 0.0, steps: int = 0) -> None:
        """One speculative round of ``rid``: ``drafted`` tree nodes besides the root,
        ``accepted`` of them on the committed path, ``draft_s`` drafting wall time of which
        ``overlapped_s`` ran while the verifier was busy, ``verify_s`` its verify time.
        ``depth`` is the draft length (tree depth); default: the last plan's, else drafted.
        ``steps`` is how many draft steps the drafters ran, when pruning left fewer in the
        tree (the draft time paid for all of them); default: ``depth``."""
        st = self._state(rid)
        drafted, accepted = max(0, int(drafted)), max(0, int(accepted))
        draft_s = max(0.0, float(draft_s) - max(0.0, float(overlapped_s)))
        verify_s = max(0.0, float(verify_s))
        if depth is None:
            depth = st.last_plan.draft_len if st.last_plan is not None and st.last_plan.draft_len else drafted
        depth = max(depth, accepted)
        if depth > 0:
            # Per-position acceptance: positions 1..accepted succeeded, the next one (if any)
            # failed. accepted/drafted would understate alpha for trees and long drafts.
            st.rates.add(accepted, depth)
            self._g_rates.add(accepted, depth)
            if st.domain:
                self._d_rates.setdefault(st.domain, _Rates(0.95, self.max_draft_len)).add(accepted, depth)
            self.rates_global = self._g_rates.rates((self.alpha_init,), self.alpha_prior)
            st.est = st.rates.rates(self.prior(st.domain), self.alpha_prior)
            per_step = draft_s / max(depth, int(steps))
            st.draft_step_s = ewma(st.draft_step_s, per_step, self.ema)
            self.costs.observe_draft_step(per_step)
        if verify_s > 0:
            self.costs.observe_tree(1.0 + drafted, verify_s)
        st.tok_ema = ewma(st.tok_ema, accepted + 1.0, self.ema)
        st.time_ema = ewma(st.time_ema, verify_s + draft_s, self.ema)
        st.rounds_on += 1
        # Off when the goodput predicted from this request's measured acceptance, draft step
        # and the verifier's measured cost curve, at the best draft length, is below plain
        # decoding's: a model of measurements, not one noisy round's wall time (a round
        # that included the drafter's prompt catch-up would otherwise switch it off).
        g, plain = self.predicted_goodput(rid), self.plain_rate
        if (self.adaptive and plain is not None and g is not None and st.rounds_on >= self.min_rounds
                and g < self.disable_below_ratio * plain):
            st.off, st.off_rounds = True, 0

    def predicted_goodput(self, rid: str) -> float | None:
        """Tokens/s of this request's best speculative round by the cost model (None before
        anything is measured)."""
        st = self._reqs.get(rid)
        if st is None or st.draft_step_s is None or self.verify_s(1) <= 0:
            return None
        width = st.last_plan.tree_width if st.last_plan is not None and st.last_plan.speculate else self.tree_width
        k = self.best_draft_len(rid, width)
        return expected_tokens(st.est[0], k, st.est[1:]) / (self.verify_s(1 + k * width) + st.draft_step_s * k)

    def observe_pipeline(self, verifier_idle_frac: float, draft_queue_len: int) -> None:
        """Verifier waiting -> draft more; drafts queueing at the verifier -> draft less;
        neither -> the bias relaxes towards 0."""
        up = verifier_idle_frac > self.idle_high
        down = draft_queue_len > self.queue_high
        if up != down:
            self.bias += self.bias_step if up else -self.bias_step
        else:
            self.bias *= self.bias_decay
        self.bias = min(self.bias_limit, max(-self.bias_limit, self.bias))

    # -- verify-token cap ----------------------------------------------------------------
    def trim_to_cap(self, plans: Mapping[str, DraftPlan],
                    tokens_per_plan: Callable[[DraftPlan], int] | None = None) -> dict[str, DraftPlan]:
        """Fit the round under max_verify_tokens: repeatedly shorten (by one step) the plan
        with the most candidate tokens, down to min_draft_len, then narrow it to width 1;
        if still over, turn speculation off for the largest plans. Among equally large
        plans the smallest rid goes first (deterministic). Pure: returns a new dict."""
        size = tokens_per_plan or (lambda p: 1 + p.draft_len * p.tree_width if p.speculate else 1)
        out = dict(plans)
        total = sum(size(p) for p in out.values())
        cap = self.max_verify_tokens

        def largest(ok: Callable[[DraftPlan], bool]) -> str | None:
            cands = [(-size(p), rid) for rid, p in out.items() if p.speculate and ok(p)]
            return min(cands)[1] if cands else None

        steps = (lambda p: p.draft_len > self.min_draft_len,
                 lambda p: p.tree_width > 1,
                 lambda p: True)
        for stage, ok in enumerate(steps):
            while total > cap:
                rid = largest(ok)
                if rid is None:
                    break
                p = out[rid]
                if stage == 0:
                    q = DraftPlan(True, p.draft_len - 1, p.tree_width)
                elif stage == 1:
                    q = DraftPlan(True, p.draft_len, p.tree_width - 1)
                else:
                    q = OFF
                total += size(q) - size(p)
                out[rid] = q
        return out


def speculation_pays(plans: Mapping[str, DraftPlan], alphas: Mapping[str, float | Sequence[float]],
                     verify_s: Callable[[int], float], draft_s: Callable[[int], float], ratio: float = 1.0,
                     once_s: float = 0.0) -> bool:
    """Whole-round check (CoSine: speculation must never be slower under load).

    One round verifies every request's tree in one forward. With speculation the round
    costs verify_s(all tree tokens) + the longest draft and commits sum E(k_r) tokens;
    without it, one batched step costs verify_s(batch) and commits one token per request.
    On a memory-bound GPU the bigger forward is nearly free; on a compute-bound CPU, or
    with a large batch, it is not, and plain batched decoding wins. Unmeasured costs
    (zero) never turn speculation off; it pays while its goodput is at least ``ratio``
    times plain decoding's ([controller.speculation] disable_below_ratio; 0 = always).
    ``once_s`` is a one-off cost of speculating now, e.g. drafters prefilling the prompts
    of requests that never drafted (charged to this round: the first round must pay it).
    """
    spec = {r: p for r, p in plans.items() if p.speculate and p.draft_len > 0}
    if not spec:
        return False
    B = len(plans)
    t_plain = verify_s(B)
    if t_plain <= 0:
        return True
    tokens = B + sum(p.draft_len * p.tree_width for p in spec.values())
    def expect(r: str, k: int) -> float:
        a = alphas.get(r, 0.0)
        return expected_tokens(a[0], k, a[1:]) if isinstance(a, (tuple, list)) else expected_tokens(a, k)

    committed = (B - len(spec)) + sum(expect(r, p.draft_len) for r, p in spec.items())
    t_spec = verify_s(tokens) + max(draft_s(p.draft_len) for p in spec.values()) + max(0.0, once_s)
    return committed / t_spec >= ratio * B / t_plain


class GoodputGate:
    """Batch-level speculation switch learnt from measured rounds.

    Per batch-size bucket (1, 2, 4, 8, ...) it keeps an EMA of the goodput (committed
    tokens per second of controller round time) under each regime, speculating and plain
    batched decoding, measured over windows of ``window`` rounds. It plays the better
    regime and, every ``explore_every``-th window of a bucket, the other one, so that a
    change of load, CPU contention or acceptance is noticed. Until both regimes have a
    measurement in a bucket, ``prior`` (the profiled cost model) picks the first window
    and the other regime is tried next. The gate measures what the profile can only
    predict: on a 2-core CPU, drafting steals cores from verification.
    """

    def __init__(self, window: int = 8, explore_every: int = 8, keep: float = 0.5):
        self.window, self.explore_every, self.keep = max(1, window), max(2, explore_every), keep
        self.rate: dict[tuple[int, bool], float] = {}   # (bucket, speculate) -> tokens/s
        self.windows: dict[int, int] = {}                # bucket -> windows opened
        self.open: list | None = None                    # [bucket, speculate, rounds, tokens, wall_s]

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, int(batch).bit_length() - 1)

    def decide(self, batch: int, prior: Callable[[], bool]) -> bool:
        """The regime for this round: True = speculate."""
        b = self.bucket(batch)
        w = self.open
        if w is not None and w[0] == b and w[2] < self.window:
            return w[1]
        self._close()
        n = self.windows[b] = self.windows.get(b, 0) + 1
        spec, plain = self.rate.get((b, True)), self.rate.get((b, False))
        if spec is None and plain is None:
            choice = prior()
        elif spec is None or plain is None:
            choice = spec is None            # try the regime not measured yet
        else:
            best = spec > plain
            choice = (not best) if n % self.explore_every == 0 else best
        self.open = [b, choice, 0, 0, 0.0]
        return choice

    def observe(self, tokens: int, wall_s: float) -> None:
        """One round of the open window: tokens committed and its duration."""
        if self.open is None:
            return
        self.open[2] += 1
        self.open[3] += tokens
        self.open[4] += wall_s
        if self.open[2] >= self.window:
            self._close()

    def _close(self) -> None:
        w, self.open = self.open, None
        # a window cut short by a batch-size change is kept when at least half full
        if w is None or w[2] < max(1, self.window // 2) or w[4] <= 0:
            return
        key = (w[0], w[1])
        self.rate[key] = ewma(self.rate.get(key), w[3] / w[4], self.keep)

    def snapshot(self) -> dict[str, float]:
        return {f"{b}:{'spec' if s else 'plain'}": r for (b, s), r in sorted(self.rate.items())}
