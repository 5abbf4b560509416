"""Plans over several cards: the card each component computes on, or context parallelism for the
denoiser. Pure, like `planner.py`: plain data in, a Plan out. Every decision on one card (scheme,
placement, compilation) is `make_plan`'s; this module only chooses what goes where.

Two kinds of plans are weighed, and the fastest predicted one wins (then the least expected error,
then the fewest cards):
1. **Components across cards.** Every assignment of components to cards (assignments that only swap
   identical cards, same table entry and budget, are tried once). Each card gets `make_plan` of the
   profile restricted to its components (`sub_profile`: their phases only, so a card is charged only
   the activations of what runs there), within its own budget; the memory model holds per card. The
   speed-critical components are the whole pipeline's (a card holding only T5 keeps T5 faithful, as
   one card would). Seconds add up, since the pipeline calls its components one after another, plus
   the copies of activations between cards: the pipeline computes on the denoiser's card (its
   execution device), so a component elsewhere gets its inputs copied over and its outputs copied
   back, at every call, over the slower of the two cards' links (`Hardware.card_link`) plus a fixed
   latency per copy. The profile records no output sizes: a component's boundary activations are
   estimated from its first Linear layer's input and its last one's output (`boundary_bytes`), exact
   for an encoder's hidden states, an overestimate for a VAE's latents. These copies are megabytes: they
   decide little next to seconds of compute.
2. **Context parallelism** (`parallel.py`): the denoiser split by sequence over k identical cards
   (k in 2, 4, 8 up to the cards given), one process per card, each card holding the whole pipeline
   as diffusers' examples run it (encoders and VAE run on every card, the same work at the same time).
   Each card's plan is `make_plan` of the profile with the denoiser's per-card shard, within its
   budget; its seconds plus the denoiser's communication are the plan's.

Per-call times come from the roofline model of each card (`cost.py`): the running device's
measured layer times are for whole calls on one card, not shards, and are not used here.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import product

from . import parallel as P
from .cost import bf16_seconds
from .errors import NoPlanError, TierquantError
from .hardware import GiB, Hardware, gib
from .plan import Plan
from .planner import CRITICAL_SHARE, make_plan
from .profile import Phase, Profile

COPY_LATENCY_S = {"nvlink": 10e-6, "pcie": 20e-6}  # one copy between two cards besides its bytes (assumed)
BF16 = 2


def sub_profile(profile: Profile, names) -> Profile:
    """`profile` restricted to the components `names`: their phases, renumbered in order."""
    keep = [n for n in profile.components if n in set(names)]
    phases, index = [], {}
    for ph in profile.phases:
        inside = [n for n in ph.components if n in keep]
        if inside:
            index[ph.index] = len(phases)
            phases.append(Phase(len(phases), inside))
    comps = {n: replace(profile.components[n], phase=index.get(profile.components[n].phase, -1)) for n in keep}
    return replace(profile, components=comps, phases=phases,
                   sensitivity={n: v for n, v in (profile.sensitivity or {}).items() if n in keep})


def critical_of(profile: Profile, hw: Hardware) -> set[str]:
    """The speed-critical components of the whole pipeline, as `make_plan` finds them."""
    crit = {n for n, c in profile.components.items() if c.scales_with_steps}
    if crit:
        return crit
    total = sum(bf16_seconds(c, hw, None) for c in profile.components.values()) or 1.0
    return {n for n, c in profile.components.items() if bf16_seconds(c, hw, None) / total >= CRITICAL_SHARE}


def home(profile: Profile) -> str:
    """The component whose card the pipeline computes on: the one doing the most work per generation,
    among those called at every step where there are some."""
    pool = [n for n, c in profile.components.items() if c.scales_with_steps] or list(profile.components)
    return max(pool, key=lambda n: profile.components[n].flops_per_call * profile.components[n].calls)


def boundary_bytes(c) -> int:
    """Bytes entering and leaving one call of `c`: its first Linear's input and its last one's output."""
    if not c.layers:
        return 0
    first, last = c.layers[0], c.layers[-1]
    return int((first.rows_per_call * first.in_features + last.rows_per_call * last.out_features) * BF16)


def copy_seconds(c, a: Hardware, b: Hardware) -> float:
    """Per generation: `c`'s boundary activations between its card `a` and the pipeline's card `b`."""
    link = min(a.card_link, b.card_link)
    latency = max(COPY_LATENCY_S.get(a.link_kind, 20e-6), COPY_LATENCY_S.get(b.link_kind, 20e-6))
    return c.calls * (boundary_bytes(c) / link + 2 * latency)


def assignments(names: list[str], classes: list) -> list[tuple[int, ...]]:
    """Every assignment of `names` to cards (a card index each), skipping those that only relabel
    cards of the same class: within a class, cards are first used in index order."""
    members: dict = {}
    for i, k in enumerate(classes):
        members.setdefault(k, []).append(i)
    out = []
    for assign in product(range(len(classes)), repeat=len(names)):
        used: dict = {}
        ok = True
        for d in assign:
            seen = used.setdefault(classes[d], [])
            if d in seen:
                continue
            if members[classes[d]][len(seen)] != d:
                ok = False
                break
            seen.append(d)
        if ok:
            out.append(assign)
    return out


def plan_devices(profile: Profile, hws: list[Hardware], budgets: list[int], catalog=None, tolerance=None,
                 pin=None, images=None, parallel: bool = True) -> Plan:
    """The fastest plan for `profile` over the cards `hws` with per-card `budgets` (same length, 2+).
    parallel: also weigh context parallelism for the denoiser; False: components across cards only;
    (kind, degree), e.g. ("ulysses", 4): that context parallelism only (benchmarks compare them)."""
    if len(hws) != len(budgets) or len(hws) < 2:
        raise TierquantError(f"a plan over several cards needs one budget per card and at least two cards; "
                             f"got {len(budgets)} budget(s) for {len(hws)} card(s)")
    if any(h.device != "cuda" for h in hws):
        raise TierquantError("plans over several devices are for CUDA GPUs: give one budget for the CPU")
    names = list(profile.components)
    critical = critical_of(profile, hws[0])
    classes = [(h.name, b) for h, b in zip(hws, budgets)]
    memo: dict = {}
    failures: dict = {}

    def card_plan(d: int, comps: tuple[str, ...], prof: Profile | None = None, key=None):
        k = key or (classes[d], comps)
        if k not in memo:
            try:
                memo[k] = make_plan(prof or sub_profile(profile, comps), hws[d], budgets[d], catalog=catalog,
                                    tolerance=tolerance, pin={n: s for n, s in (pin or {}).items() if n in comps},
                                    images=images, critical=critical & set(comps))
            except NoPlanError as e:
                memo[k] = None
                failures[k] = e
        return memo[k]

    center = home(profile)
    only = tuple(parallel) if isinstance(parallel, (tuple, list)) else None
    candidates = []
    for assign in assignments(names, classes) if only is None else []:
        on = {d: tuple(n for n, a in zip(names, assign) if a == d) for d in sorted(set(assign))}
        plans = {d: card_plan(d, comps) for d, comps in on.items()}
        if any(p is None for p in plans.values()):
            continue
        where = dict(zip(names, assign))
        copies = {n: copy_seconds(profile.components[n], hws[where[n]], hws[where[center]])
                  for n in names if where[n] != where[center]}
        latency = sum(p.predicted_latency_s for p in plans.values()) + sum(copies.values())
        error = sum(c.expected_error for p in plans.values() for c in p.components.values())
        candidates.append(((latency, round(error, 6), len(on)), ("cards", where, plans, copies)))
    if parallel:
        candidates += _parallel_candidates(profile, hws, budgets, classes, center, card_plan, only)
    if only and not candidates:
        why = P.why_not(profile.components[center], only[0], only[1]) if only[0] in P.KINDS else \
            f"the kinds are {', '.join(P.KINDS)}"
        raise NoPlanError(f"no {only[0]} context parallelism over {only[1]} cards for {center}: "
                          f"{why or 'it does not fit the budget, or there are not that many identical cards'}")
    if not candidates:
        raise _nothing_fits(profile, hws, budgets, failures)
    _, best = min(candidates, key=lambda x: x[0])
    return _compose(profile, hws, budgets, best)


def _parallel_candidates(profile, hws, budgets, classes, center, card_plan, only=None) -> list:
    out = []
    c = profile.components[center]
    for k in P.DEGREES:
        groups = [[i for i, x in enumerate(classes) if x == cls] for cls in dict.fromkeys(classes)]
        for group in (g[:k] for g in groups if len(g) >= k):
            for kind in P.KINDS:
                if (only and (kind, k) != only) or P.why_not(c, kind, k):
                    continue
                hw = hws[group[0]]
                prof = replace(profile, components={**profile.components, center: P.shard(c, k, hw)})
                p = card_plan(group[0], tuple(profile.components), prof, key=("cp", classes[group[0]], k))
                if p is None:
                    continue
                comm = c.calls * P.comm_seconds(c, kind, k, hw)
                error = sum(x.expected_error for x in p.components.values())
                out.append(((p.predicted_latency_s + comm, round(error, 6), k),
                            ("parallel", {"component": center, "kind": kind, "degree": k, "devices": group}, p, comm)))
    return out


def _compose(profile: Profile, hws, budgets, best) -> Plan:
    devices = [{"hardware": h.to_dict(), "budget_bytes": int(b), "peak_bytes": 0, "components": []}
               for h, b in zip(hws, budgets)]
    if best[0] == "parallel":
        _, par, p, comm = best
        name, group = par["component"], par["devices"]
        for d in group:
            devices[d].update(peak_bytes=p.predicted_peak_bytes, components=list(p.components))
        comps = dict(p.components)
        ch = comps[name]
        comps[name] = replace(ch, device=group[0], predicted_seconds=ch.predicted_seconds + comm,
                              reason=f"{ch.reason}; context parallel ({par['kind']}) over {par['degree']} cards "
                                     f"({', '.join(map(str, group))}), each computing 1/{par['degree']} of the "
                                     f"tokens, {comm:.3f} s of communication per generation")
        comps = {n: replace(x, device=group[0]) if n != name else x for n, x in comps.items()}
        notes = [f"context parallelism: {name} split over {par['degree']} cards ({par['kind']}), one process per "
                 f"card, each holding the whole pipeline (run it with `tierquant run --devices`)"] + p.notes
        return replace(p, components={n: comps[n] for n in profile.components}, devices=devices, parallel=par,
                       predicted_latency_s=p.predicted_latency_s + comm, notes=notes,
                       host_bytes=p.host_bytes * par["degree"])  # every process pins its own host copies
    _, where, plans, copies = best
    comps, notes = {}, []
    for d, p in plans.items():
        devices[d].update(peak_bytes=p.predicted_peak_bytes, components=list(p.components))
        for n, ch in p.components.items():
            extra = copies.get(n, 0.0)
            reason = ch.reason + (f"; on card {d}, its activations copied to and from card {where[home(profile)]} "
                                  f"({extra * 1e3:.2f} ms per generation)" if extra else "")
            comps[n] = replace(ch, device=d, predicted_seconds=ch.predicted_seconds + extra, reason=reason)
        notes += [f"card {d}: {x}" for x in p.notes if f"card {d}: {x}" not in notes]
    phases = []
    for ph in profile.phases:
        peak = max((x["peak_bytes"] for x in devices if set(x["components"]) & set(ph.components)), default=0)
        phases.append({"components": list(ph.components), "peak_bytes": peak})
    first = plans[min(plans)]
    return Plan(components={n: comps[n] for n in profile.components},
                predicted_latency_s=sum(p.predicted_latency_s for p in plans.values()) + sum(copies.values()),
                predicted_peak_bytes=max(x["peak_bytes"] for x in devices), budget_bytes=int(budgets[0]),
                hardware=hws[0].to_dict(), pipeline=profile.fingerprint(), phases=phases, steps=first.steps,
                notes=["per-call times from the roofline model of each card (measured times are for one card)"]
                + [n for n in notes if "roofline" not in n and "measured" not in n],
                host_bytes=sum(p.host_bytes for p in plans.values()),
                compile_s=sum(p.compile_s for p in plans.values()),
                compile_warm_s=sum(p.compile_warm_s for p in plans.values()), images=first.images,
                devices=devices, parallel=None,
                # a card's plan may count on its cache being emptied between phases: do it everywhere
                free_between_phases=any(p.free_between_phases for p in plans.values()))


def _nothing_fits(profile: Profile, hws, budgets, failures) -> NoPlanError:
    """Say which component fits on no card, and what it needs."""
    big = max(range(len(hws)), key=lambda d: budgets[d])
    needs = {}
    for n in profile.components:
        try:
            make_plan(sub_profile(profile, [n]), hws[big], budgets[big])
        except NoPlanError as e:
            needs[n] = e.smallest_bytes or 0
    if needs:
        n = max(needs, key=needs.get)
        return NoPlanError(f"no plan fits {profile.pipeline} on {len(hws)} cards: {n} alone needs {gib(needs[n])} "
                           f"on a card, more than the largest budget ({gib(budgets[big])}). Raise that budget to "
                           f"at least {needs[n] / GiB:.1f}GiB, or lower the resolution or batch size.",
                           smallest_bytes=needs[n])
    return NoPlanError(f"no plan fits {profile.pipeline} on {len(hws)} cards with budgets "
                       f"{', '.join(gib(b) for b in budgets)}: each component fits a card alone, but not "
                       f"together with the others on these cards. Raise the budgets or add a card.")
