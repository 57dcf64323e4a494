"""CoSine's fused drafting: per step, every routed drafter proposes one token after the
same fused prefix; the most confident becomes the fused token all continue from, and
every candidate becomes a node of the request's tree (docs/algorithms.md, "Fusion").

With guided drafting one draft op covers several steps: the model drafters score a
weight-free drafter's chain as forced tokens (guide.py), and the op's steps are replayed
here, all requests in lockstep, one fusion call per step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..proxies import DraftJob, DraftOut
from ..request import Request
from ..speculation import DraftPlan
from .drafters import draft_job
from .fuser import FuseStep
from .guide import still_valid
from .trees import Draft, Proposal

if TYPE_CHECKING:
    from . import Drafting

Asked = dict[int, "list[int] | None"]   # drafter index -> the forced tokens it was given (None: free)
Got = dict[int, DraftOut]               # drafter index -> its op's output


@dataclass
class _Walk:
    """One request's fused path so far."""

    left: int                  # draft steps still planned
    floor: float               # fewest expected tokens one more step must bring (0: no early stop)
    parent: int = 0            # the fused node the next step continues
    prefix: list[int] = field(default_factory=list)  # the fused tokens
    reach: float = 1.0         # P(the fused path so far is accepted)
    guide: list[int] = field(default_factory=list)   # forced tokens for the model drafters' next op
    start: int = 0             # len(prefix) when the current op was sent


def draft_fused(d: Drafting, reqs: list[Request], plans: dict[str, DraftPlan], drafts: dict[str, Draft],
                weights: dict[str, dict[int, float] | None]) -> None:
    """Draft ``reqs`` (each routed to several drafters, ``Draft.routed``) step by step.
    A step is drafted only while its expected gain, reach * P(next position accepted), is
    worth its cost."""
    walks = {r.rid: _Walk(plans[r.rid].draft_len, d.step_floor(r)) for r in reqs}
    for r in reqs:
        dr = drafts[r.rid]
        dr.drafters = list(dr.routed)
        dr.proposals = {n: ([], []) for n in dr.routed}
    while True:
        live = [r for r in reqs if walks[r.rid].left > 0]
        jobs, asked = _ops(d, live, walks, drafts)
        if not jobs:
            break
        outs = d.run(jobs)
        got = {r.rid: {i: res[r.rid] for i, res in outs.items() if r.rid in res} for r in live}
        _replay(d, live, walks, drafts, asked, got, weights)
        _next_guides(d, reqs, walks, got)


def _ops(d: Drafting, live: list[Request], walks: dict[str, _Walk], drafts: dict[str, Draft]
         ) -> tuple[dict[int, list[DraftJob]], dict[str, Asked]]:
    """The next draft op of every live request's drafters: a weight-free drafter drafts
    its chain (greedy) or one step; a model drafter scores the guide, then one free step."""
    jobs: dict[int, list[DraftJob]] = defaultdict(list)
    asked: dict[str, Asked] = {}
    for r in live:
        w = walks[r.rid]
        w.start = len(w.prefix)
        ctx = r.committed + w.prefix
        # Greedy only: a sampled step must be drawn after the fused prefix is known.
        chain_k = w.left if d.guides(r) else 1
        guide = w.guide[:w.left - 1]
        asked[r.rid] = {}
        for n in drafts[r.rid].drafters:
            s = d.pool.by_name[n]
            model = s.name in d.pool.model_names
            k = len(guide) + 1 if model else chain_k
            if s.alive and d.pool.fits(s, len(ctx), k):
                forced = guide + [-1] if model and guide else None
                jobs[s.index].append(draft_job(r, ctx, k, topk=d.siblings(r), forced=forced))
                asked[r.rid][s.index] = forced
    return jobs, asked


def _replay(d: Drafting, live: list[Request], walks: dict[str, _Walk], drafts: dict[str, Draft],
            asked: dict[str, Asked], got: dict[str, Got], weights: dict[str, dict[int, float] | None]) -> None:
    """Replay one op's steps, all requests in lockstep (one fusion call per step). A request
    goes on to the next step only while every drafter it asked still holds a proposal made
    on the fused prefix, so each step fuses a full candidate set."""
    step = 0
    while live:
        steps, order = [], []
        for r in live:
            props = _proposals(d, r, walks[r.rid], drafts[r.rid], asked[r.rid], got[r.rid], step)
            if not props:
                walks[r.rid].left = 0
                continue
            steps.append(FuseStep(drafts[r.rid].tree, walks[r.rid].parent, props, r.params.temperature > 0,
                                  weights[r.rid], r.domain))
            order.append(r)
        if not steps:
            break
        nxt = []
        for r, f in zip(order, d.waits.get(d.fuser.fuse(steps), "fuser")):
            w, dr = walks[r.rid], drafts[r.rid]
            dr.tree = f.tree
            dr.dists.update(f.dists)
            if f.node is None:
                w.left = 0
                continue
            fused = int(f.tree.tokens[f.node])
            d.stats.metrics.on_fused_win(int(f.tree.proposers[f.node]))
            w.parent = f.node
            w.prefix.append(fused)
            w.left -= 1
            w.reach *= f.confidence
            # the next position's acceptance, given this one is accepted
            if w.reach * d.spec.rate_at(r.rid, len(w.prefix) + 1) < w.floor:
                w.left = 0
            got[r.rid] = {i: o for i, o in got[r.rid].items() if still_valid(o.tokens, step, fused)}
            if w.left > 0 and got[r.rid].keys() == asked[r.rid].keys():
                nxt.append(r)
        live = nxt
        step += 1


def _proposals(d: Drafting, r: Request, w: _Walk, dr: Draft, asked: Asked, got: Got, step: int) -> list[Proposal]:
    """Step ``step``'s candidates of every drafter that holds one (its runners-up too); each
    is also a label for the learners and extends its drafter's chain in ``dr.proposals``."""
    props = []
    for i, o in got.items():
        f = asked[i]
        own = f is not None and f[step] >= 0  # a scored guide token: its own pick is topk[0]
        d.stats.guided_steps += own
        tok = int(o.topk_ids[step][0]) if own else int(o.tokens[step])
        prob = float(o.topk_probs[step][0]) if own else float(o.probs[step])
        q = o.dists[step] if o.dists is not None else None
        props.append(Proposal(i, tok, prob, w.parent, q))
        toks, probs = dr.proposals[d.pool.slots[i].name]
        toks.append(tok)
        probs.append(prob)
        for alt, ap in zip(o.topk_ids[step][1:], o.topk_probs[step][1:]):  # runners-up
            if alt >= 0 and alt != tok:
                props.append(Proposal(i, int(alt), float(ap), w.parent))
    dr.labels.extend(props)
    return props


def _next_guides(d: Drafting, reqs: list[Request], walks: dict[str, _Walk], got: dict[str, Got]) -> None:
    """The weight-free chains that the fused path still follows guide the next op."""
    chains = []
    for r in reqs:
        w = walks[r.rid]
        w.guide = []
        if w.left > 1 and d.guides(r) and r.rid in got:
            done = len(w.prefix) - w.start  # steps replayed from this op
            ch = {i: (o.tokens[done:], o.probs[done:]) for i, o in got[r.rid].items()
                  if d.pool.slots[i].name not in d.pool.model_names}
            if ch:
                chains.append((r, ch))
    if chains:
        asks = [(r.domain, ch, d.cc.fusion.guide_min_reach, walks[r.rid].left - 1) for r, ch in chains]
        for (r, _), g in zip(chains, d.waits.get(d.fuser.guides(asks), "fuser")):
            walks[r.rid].guide = g
