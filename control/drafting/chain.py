"""Chain drafting: one multi-step draft op per drafter, the chains merged into one tree.

Speculative mode drafts with the first usable drafter, specinfer with all of them, and a
cosine request routed to a single drafter (or rescued by one) with that one: then every
node is one of its candidates, labelled after verification for the router.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from ..proxies import DraftJob
from ..request import Mode, Request
from ..speculation import DraftPlan
from .drafters import DrafterSlot, draft_job
from .trees import ChainDraft, Draft, Proposal, chains_tree

if TYPE_CHECKING:
    from . import Drafting


def draft_chains(d: Drafting, reqs: list[Request], plans: dict[str, DraftPlan], drafts: dict[str, Draft],
                 pick: dict[str, list[DrafterSlot]] | None = None) -> None:
    """One multi-step draft op per drafter: the first usable drafter (speculative), all
    of them (specinfer), or the ones in ``pick`` (a cosine request routed to one)."""
    jobs: dict[int, list[DraftJob]] = defaultdict(list)
    stopping: set[tuple[int, str]] = set()  # (drafter, rid) chains that may end early
    for r in reqs:
        p = plans[r.rid]
        cand = pick[r.rid] if pick is not None else d.pool.usable(r)
        alive = [s for s in cand if s.alive and d.pool.fits(s, len(r.committed), p.draft_len)]
        use = alive[:1] if r.params.mode is Mode.SPECULATIVE else alive
        stops = d.chain_stops(r, p.draft_len) if pick is not None else None
        for s in use:
            stop = stops if s.name in d.pool.model_names else None
            jobs[s.index].append(draft_job(r, list(r.committed), p.draft_len, p.tree_width, min_reach=stop))
            if stop is not None:
                stopping.add((s.index, r.rid))
    outs = d.run(jobs)
    d.stats.stopped_chains += sum(len(res[rid].tokens) < plans[rid].draft_len
                                  for i, res in outs.items() for rid in res if (i, rid) in stopping)
    for r in reqs:
        dr = drafts[r.rid]
        chains = []
        for i, res in outs.items():
            o = res.get(r.rid)
            if o is None:
                continue
            chains.append(ChainDraft(i, o.tokens, o.probs, o.topk_ids, o.topk_probs, o.dists))
            name = d.pool.slots[i].name
            dr.drafters.append(name)
            dr.proposals[name] = (o.tokens, o.probs)
        if chains:
            built = chains_tree(r.committed[-1], chains, r.params.temperature > 0, plans[r.rid].tree_width)
            dr.tree, dr.dists = built.tree, built.dists
            if pick is not None:  # a routed solo chain: every node is one of its candidates
                t = dr.tree
                dr.labels.extend(Proposal(int(t.proposers[n]), int(t.tokens[n]), float(t.probs[n]),
                                          int(t.parents[n])) for n in range(1, t.n))
