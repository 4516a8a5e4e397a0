"""The adaptive load planner: per chunk, which codec level to fetch, or recompute it from its tokens.

Primitives:
- `DecayedRate`: a rate over recent observations (amounts over durations, older ones decayed).
- `Estimates`: measured figures, updated from real work (thread-safe): the tier link's bandwidth (record
  bytes per second of each fetch), each level's decode speed (KV bytes per second) and size (record bytes
  per KV byte, from every encode and fetch; before any, each level's `prior`: its codec's nominal size),
  and the model's prefill speed (tokens per second).
  `figures()` is a frozen snapshot of them: `Figures`.
- `plan_load(available, allowed, chunk_tokens=, kv_bytes=, figures=)` -> `LoadPlan`: a pure function.
- `estimate_seconds(...)`: the time model behind it, also pure.

The time model (what a load does): a fetcher requests the fetched chunks one after another over the link
(`record bytes / bandwidth` each) while the CPU first prefills the `head` chunks from their tokens (these
need no stored KV, so they overlap the transfers), then decodes each fetched chunk once it has arrived
(`KV bytes / decode speed`), then prefills the `tail` chunks (which attend to everything before them, so
they wait for the last fetch). The estimate is when the CPU is done; the prompt's remaining tokens cost
the same in every plan and are left out. A plan is `head` recomputed chunks, then one level per fetched
chunk, then `tail` recomputed chunks; the planner tries every head (or, when re-planning the rest of a
load already under way, every tail) with every allowed level and keeps the fastest.

Figures not measured yet: no bandwidth -> transfers count as free (the first fetch measures it, and the
load re-plans); a level's decode speed unknown -> the fastest measured level's (none measured: free); a
level's size not measured -> its prior (its codec's nominal bits per element: a process that reads copies
another process stored learns the small levels' real sizes only by fetching them, so without a prior it
would keep to the first level it measured), and with no prior either the KV's own size; no prefill speed
-> nothing is recomputed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

import numpy as np

RECOMPUTE = "recompute"  # the action of a chunk rebuilt from its tokens
# Plans within this much of the fastest count as ties, which go to fewer recomputed chunks, then to the
# more faithful level: a difference the estimates cannot resolve is not worth quality.
TIE_FRACTION = 0.02
TIE_SECONDS = 1e-3


@dataclass(frozen=True, slots=True)
class Figures:
    """Measured figures (None or absent: not measured yet)."""

    bandwidth: float | None = None  # record bytes per second over the tier's link
    decode: Mapping[str, float] = field(default_factory=dict)  # level -> KV bytes decoded per second
    ratio: Mapping[str, float] = field(default_factory=dict)  # level -> record bytes per KV byte
    prefill: float | None = None  # tokens per second of the model's prefill
    prior: Mapping[str, float] = field(default_factory=dict)  # level -> ratio expected before one is measured

    def size_ratio(self, level: str) -> float:
        return self.ratio.get(level) or self.prior.get(level, 1.0)

    def fetch_seconds(self, level: str, kv_bytes: int) -> float:
        if not self.bandwidth:
            return 0.0
        return kv_bytes * self.size_ratio(level) / self.bandwidth

    def decode_seconds(self, level: str, kv_bytes: int) -> float:
        speed = self.decode.get(level) or max(self.decode.values(), default=0.0)
        return kv_bytes / speed if speed else 0.0

    def prefill_seconds(self, tokens: int) -> float:
        return tokens / self.prefill if self.prefill else float("inf")


@dataclass(frozen=True, slots=True)
class LoadPlan:
    head: int  # leading chunks recomputed, overlapping the fetches
    levels: tuple[str, ...]  # the level of each fetched chunk, chunks head .. head + len(levels) - 1
    tail: int  # chunks recomputed after the fetched ones
    estimate_s: float  # the time model's figure for this plan

    @property
    def num_chunks(self) -> int:
        return self.head + len(self.levels) + self.tail

    def actions(self) -> list[str]:
        """Per chunk, its level or `RECOMPUTE`."""
        return [RECOMPUTE] * self.head + list(self.levels) + [RECOMPUTE] * self.tail


def estimate_seconds(head: int, levels: Sequence[str], tail: int, *, chunk_tokens: int, kv_bytes: int,
                     figures: Figures, cpu_start: float = 0.0, link_start: float = 0.0) -> float:
    """When the CPU finishes the plan (seconds from now), given the CPU busy until `cpu_start` and the
    link until `link_start` with work already committed."""
    cpu = cpu_start + (figures.prefill_seconds(head * chunk_tokens) if head else 0.0)
    if levels:
        fetch = np.array([figures.fetch_seconds(level, kv_bytes) for level in levels])
        decode = np.array([figures.decode_seconds(level, kv_bytes) for level in levels])
        arrive = link_start + np.cumsum(fetch)
        # c_k = max(c_{k-1}, arrive_k) + decode_k unrolls to: the latest of (start + every decode) and
        # (chunk k's arrival + the decodes from k on).
        after = np.cumsum(decode[::-1])[::-1]
        cpu = max(cpu + float(after[0]), float(np.max(arrive + after)))
    return cpu + (figures.prefill_seconds(tail * chunk_tokens) if tail else 0.0)


def _picks(available: Sequence[Collection[str]], allowed: Sequence[str], level: str) -> list[str | None]:
    """Each chunk's copy for a plan that asks for `level`: that one where stored, else the nearest stored
    more faithful allowed level, else the nearest less faithful one (still allowed); None where a chunk
    has no allowed copy."""
    i = allowed.index(level)
    order = list(allowed[i:]) + list(reversed(allowed[:i]))
    return [next((lv for lv in order if lv in have), None) for have in available]


def plan_load(available: Sequence[Collection[str]], allowed: Sequence[str], *, chunk_tokens: int, kv_bytes: int,
              figures: Figures, recompute: bool = True, head: bool = True, cpu_start: float = 0.0,
              link_start: float = 0.0) -> LoadPlan:
    """The fastest plan for consecutive chunks whose stored levels are `available[i]`.

    `allowed`: the levels the quality floor allows, least faithful first. `recompute=False` fetches every
    chunk; `head=False` recomputes only a tail (a load under way, or an engine that computes after it
    loads). Plans within `TIE_FRACTION` (or `TIE_SECONDS`) of the fastest are ties: they go to fewer
    recomputed chunks, then to the more faithful level.

    Every (level, split) pair is estimated as `estimate_seconds` would, all splits of a level at once
    (prefix and suffix sums): a load re-plans on the caller's thread as chunks arrive, so this runs in
    well under a millisecond for a few dozen chunks.
    """
    n = len(available)
    if not allowed:
        raise ValueError("no level is allowed")
    splits = recompute and figures.prefill is not None  # else only the plan that fetches every chunk
    # prefill[k]: the seconds to recompute k chunks
    prefill = np.array([0.0] + [figures.prefill_seconds(k * chunk_tokens) for k in range(1, n + 1)]) \
        if splits else np.zeros(n + 1)
    missing = [i for i, have in enumerate(available) if not any(lv in have for lv in allowed)]
    cost = {lv: (figures.fetch_seconds(lv, kv_bytes), figures.decode_seconds(lv, kv_bytes)) for lv in allowed}
    best: tuple[tuple[int, int, float], float, int, int, tuple[str, ...]] | None = None
    rows: list[tuple[int, np.ndarray, list[str | None]]] = []
    for rank, level in enumerate(allowed):
        picks = _picks(available, allowed, level)
        fetch = np.array([cost[p][0] if p else 0.0 for p in picks])
        decode = np.array([cost[p][1] if p else 0.0 for p in picks])
        after = np.concatenate([np.cumsum(decode[::-1])[::-1], [0.0]])  # after[k]: the decodes from k on
        sent = np.concatenate([[0.0], np.cumsum(fetch)])  # sent[k]: the transfers before chunk k
        reach = sent[1:] + after[:-1]  # chunk k's arrival (from the first transfer) + the decodes from k on
        if head:  # split h: chunks h.. fetched, the transfers starting with chunk h
            latest = np.concatenate([np.maximum.accumulate(reach[::-1])[::-1], [-np.inf]])
            est = np.maximum(cpu_start + prefill + after, link_start + latest - sent)
            valid = np.arange(n + 1) > (missing[-1] if missing else -1)
            if not splits:
                valid[1:] = False
        else:  # split m: chunks ..m-1 fetched, the last n - m recomputed after them
            latest = np.concatenate([[-np.inf], np.maximum.accumulate(reach)])
            est = np.maximum(cpu_start + after[0], link_start + latest) - after + prefill[::-1]
            valid = np.arange(n + 1) <= (missing[0] if missing else n)
            if not splits:
                valid[:n] = False
        est = np.where(valid, est, np.inf)
        rows.append((rank, est, picks))
    fastest = min(float(est.min()) for _, est, _ in rows)
    if not np.isfinite(fastest):  # some chunk has no allowed copy and nothing may be recomputed
        raise ValueError("a chunk has no allowed copy; the caller loads only chunks that have one")
    near = fastest * (1 + TIE_FRACTION) + TIE_SECONDS
    for rank, est, picks in rows:
        for k in np.flatnonzero(est <= near):
            h, t = (int(k), 0) if head else (0, n - int(k))
            key = (h + t, -rank, float(est[k]))
            if best is None or key < best[0]:
                best = (key, float(est[k]), h, t, tuple(picks[h:n - t]))
    assert best is not None
    _, estimate, h, t, levels = best
    return LoadPlan(h, levels, t, estimate)


class DecayedRate:
    """A rate over recent observations: their amounts summed over their durations (or any ratio of two
    sums), each older observation weighing `decay` times the next. A slow observation counts by how long
    it took, not as one vote among equals, so one outlier moves the figure by its share of the time."""

    __slots__ = ("decay", "num", "den")

    def __init__(self, decay: float) -> None:
        self.decay, self.num, self.den = decay, 0.0, 0.0

    def add(self, num: float, den: float) -> None:
        self.num = self.num * self.decay + num
        self.den = self.den * self.decay + den

    @property
    def value(self) -> float:
        return self.num / self.den


class Estimates:
    """Measured figures over recent real observations (`DecayedRate`). The link's bandwidth follows each
    transfer closely (`link_decay`: it is what changes, and a load re-plans on its own transfers anyway);
    decode speeds, sizes and the prefill speed are properties of the machine, the codecs and the model,
    and are kept over about ten observations (`decay`), since a single chunk's decode varies by tens of
    percent on a shared CPU and a plan ranks levels by their differences."""

    def __init__(self, decay: float = 0.9, link_decay: float = 0.5) -> None:
        self.decay = decay
        self._lock = threading.Lock()
        self._bandwidth = DecayedRate(link_decay)
        self._seed: float | None = None  # a bandwidth from the tier's own counters, until a transfer of ours
        self._prefill = DecayedRate(decay)
        self._decode: dict[str, DecayedRate] = {}
        self._ratio: dict[str, DecayedRate] = {}
        self._prior: dict[str, float] = {}

    def observe_fetch(self, nbytes: int, seconds: float) -> float | None:
        """One transfer of `nbytes` record bytes in `seconds`; returns that transfer's own bandwidth."""
        if nbytes <= 0 or seconds <= 0:
            return None
        with self._lock:
            self._bandwidth.add(nbytes, seconds)
        return nbytes / seconds

    def seed_bandwidth(self, rate: float) -> None:
        """A first figure from earlier measured transfers (a tier's own counters), if none is kept yet."""
        with self._lock:
            if self._seed is None and rate > 0:
                self._seed = rate

    def observe_decode(self, level: str, kv_bytes: int, seconds: float) -> None:
        if kv_bytes > 0 and seconds > 0:
            with self._lock:
                self._decode.setdefault(level, DecayedRate(self.decay)).add(kv_bytes, seconds)

    def observe_size(self, level: str, record_bytes: int, kv_bytes: int) -> None:
        if record_bytes > 0 and kv_bytes > 0:
            with self._lock:
                self._ratio.setdefault(level, DecayedRate(self.decay)).add(record_bytes, kv_bytes)

    def set_prior(self, ratios: Mapping[str, float]) -> None:
        """Each level's expected size (record bytes per KV byte), used until one of its records is measured."""
        with self._lock:
            self._prior = dict(ratios)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._prefill.add(tokens, seconds)

    def figures(self) -> Figures:
        with self._lock:
            bandwidth = self._bandwidth.value if self._bandwidth.den else self._seed
            return Figures(bandwidth, {k: r.value for k, r in self._decode.items()},
                           {k: r.value for k, r in self._ratio.items()},
                           self._prefill.value if self._prefill.den else None, dict(self._prior))
