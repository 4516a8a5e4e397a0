"""The adaptive load planner as a pure function over measured figures, its time model against a plain
step-by-step simulation, and the estimates it is fed."""

from __future__ import annotations

import random

import pytest

from kvstore.planner import RECOMPUTE, TIE_FRACTION, TIE_SECONDS, Estimates, Figures, estimate_seconds, plan_load

LEVELS = ("small", "mid", "lossless")  # least faithful first
RATIO = {"small": 0.1, "mid": 0.25, "lossless": 0.9}
KV = 1_000_000  # KV bytes of one chunk
C = 256


def figures(bandwidth, prefill=None, decode=1e9):
    return Figures(bandwidth, {lv: decode for lv in LEVELS}, RATIO, prefill)


def all_of(n, levels=LEVELS):
    return [frozenset(levels)] * n


def plan(n, fig, allowed=LEVELS, **kw):
    return plan_load(all_of(n), allowed, chunk_tokens=C, kv_bytes=KV, figures=fig, **kw)


def test_a_fast_link_fetches_the_most_faithful_level():
    p = plan(8, figures(bandwidth=1e12, prefill=1e3))
    assert p.actions() == ["lossless"] * 8


def test_a_slow_link_fetches_the_smallest_level():
    p = plan(8, figures(bandwidth=1e7, prefill=10.0))  # recompute: 25.6 s a chunk, fetch of small: 0.01 s
    assert p.actions() == ["small"] * 8


def test_the_quality_floor_bounds_the_levels():
    p = plan(8, figures(bandwidth=1e7), allowed=("mid", "lossless"))
    assert set(p.actions()) == {"mid"}
    p = plan(8, figures(bandwidth=1e7), allowed=("lossless",))
    assert set(p.actions()) == {"lossless"}


def test_a_very_slow_link_recomputes_leading_chunks_while_the_rest_arrive():
    # small: 0.1 MB at 0.1 MB/s = 1 s a chunk; prefill: 256 tokens at 512 tok/s = 0.5 s a chunk.
    p = plan(8, figures(bandwidth=1e5, prefill=512.0))
    assert p.head > 0 and p.levels and p.tail == 0
    assert set(p.levels) == {"small"}
    # The overlap pays: better than fetching everything or recomputing everything.
    assert p.estimate_s < estimate_seconds(0, ["small"] * 8, 0, chunk_tokens=C, kv_bytes=KV, figures=p_fig())
    assert p.estimate_s < 8 * 0.5


def p_fig():
    return figures(bandwidth=1e5, prefill=512.0)


def test_recompute_everything_when_the_link_is_hopeless():
    p = plan(4, figures(bandwidth=1e2, prefill=1e4))
    assert p.actions() == [RECOMPUTE] * 4


def test_nothing_is_recomputed_without_a_measured_prefill_speed_or_when_disallowed():
    assert RECOMPUTE not in plan(8, figures(bandwidth=1e2, prefill=None)).actions()
    assert RECOMPUTE not in plan(8, figures(bandwidth=1e2, prefill=1e4), recompute=False).actions()


def test_an_unmeasured_link_counts_as_free():
    p = plan(4, Figures(None, {}, {}, None))
    assert p.actions() == ["lossless"] * 4 and p.estimate_s == 0.0


def test_slow_decode_of_a_level_steers_away_from_it():
    fig = Figures(1e9, {"small": 1e6, "mid": 1e6, "lossless": 1e10}, RATIO, None)
    assert set(plan(4, fig).actions()) == {"lossless"}


def test_a_chunk_without_the_chosen_copy_takes_the_nearest_allowed_one():
    avail = [frozenset(LEVELS), frozenset({"lossless"}), frozenset({"mid", "small"})]
    p = plan_load(avail, LEVELS, chunk_tokens=C, kv_bytes=KV, figures=figures(bandwidth=1e7))
    assert p.actions() == ["small", "lossless", "small"]
    p = plan_load(avail, ("mid", "lossless"), chunk_tokens=C, kv_bytes=KV, figures=figures(bandwidth=1e7))
    assert p.actions() == ["mid", "lossless", "mid"]


def test_a_replan_without_head_recomputes_a_tail():
    p = plan(6, figures(bandwidth=1e2, prefill=1e4), head=False)
    assert p.head == 0 and p.tail == 6


def _brute_force(available, allowed, *, figures, recompute, head, cpu_start, link_start):
    """Every (level, split) through `estimate_seconds`, the planner's rule spelled out: (head, levels, tail,
    estimate) of the plan chosen, None where no plan exists."""
    n = len(available)
    splits = [(0, 0)]
    if recompute and figures.prefill is not None:
        splits = [(r, 0) for r in range(n + 1)] if head else [(0, r) for r in range(n + 1)]
    found = []
    for rank, level in enumerate(allowed):
        order = list(allowed[rank:]) + list(reversed(allowed[:rank]))
        for h, t in splits:
            picks = [next((lv for lv in order if lv in have), None) for have in available[h:n - t]]
            if None in picks:
                continue
            est = estimate_seconds(h, picks, t, chunk_tokens=C, kv_bytes=KV, figures=figures,
                                   cpu_start=cpu_start, link_start=link_start)
            found.append((h + t, -rank, est, h, tuple(picks), t))
    if not found:
        return None
    fastest = min(f[2] for f in found)
    chosen = min((f for f in found if f[2] <= fastest * (1 + TIE_FRACTION) + TIE_SECONDS), key=lambda f: f[:3])
    return chosen[3:] + (chosen[2],)


def test_the_planner_chooses_what_trying_every_plan_through_the_time_model_chooses():
    rng = random.Random(7)
    for case in range(400):
        n = rng.randrange(0, 12)
        allowed = LEVELS[rng.randrange(3):]
        available = [frozenset(lv for lv in LEVELS if rng.random() < 0.6) for _ in range(n)]
        fig = Figures(rng.choice([None, 10 ** rng.uniform(4, 9)]),
                      {lv: 10 ** rng.uniform(5, 9) for lv in LEVELS if rng.random() < 0.8},
                      {lv: r for lv, r in RATIO.items() if rng.random() < 0.7},
                      rng.choice([None, 10 ** rng.uniform(1, 5)]), {"small": 0.12})
        kw = dict(figures=fig, recompute=rng.random() < 0.8, head=rng.random() < 0.5,
                  cpu_start=rng.choice([0.0, rng.uniform(0, 2)]), link_start=rng.choice([0.0, rng.uniform(0, 2)]))
        want = _brute_force(available, allowed, **kw)
        if want is None:
            with pytest.raises(ValueError):
                plan_load(available, allowed, chunk_tokens=C, kv_bytes=KV, **kw)
            continue
        got = plan_load(available, allowed, chunk_tokens=C, kv_bytes=KV, **kw)
        assert (got.head, got.levels, got.tail) == want[:3], (case, kw)
        assert got.estimate_s == pytest.approx(want[3], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("bw,dec,head", [(1e6, 1e7, 0), (1e7, 1e6, 0), (1e6, 1e6, 2), (3e6, 2e6, 5)])
def test_the_time_model_matches_a_step_by_step_simulation(bw, dec, head):
    fig = Figures(bw, {lv: dec for lv in LEVELS}, RATIO, 1000.0)
    levels = ["small", "lossless", "mid", "mid", "small"]
    link, cpu = 0.3, head * C / 1000.0 + 0.1
    got = estimate_seconds(head, levels, 1, chunk_tokens=C, kv_bytes=KV, figures=fig, cpu_start=0.1, link_start=0.3)
    for lv in levels:
        link += KV * RATIO[lv] / bw
        cpu = max(cpu, link) + KV / dec
    assert got == pytest.approx(cpu + C / 1000.0)


def test_estimates_weigh_real_observations_by_their_duration():
    e = Estimates(decay=0.5, link_decay=0.5)
    assert e.figures() == Figures()
    e.seed_bandwidth(50.0)  # the tier's own counters: used until a transfer of ours
    assert e.figures().bandwidth == 50
    assert e.observe_fetch(100, 1.0) == 100
    e.observe_fetch(300, 1.0)
    e.observe_fetch(0, 1.0)  # ignored
    e.seed_bandwidth(1.0)  # no effect
    e.observe_decode("mid", 1000, 0.5)
    e.observe_size("mid", 250, 1000)
    e.observe_prefill(512, 2.0)
    f = e.figures()
    assert f.bandwidth == pytest.approx((50 + 300) / 1.5)  # (100 * 0.5 + 300) bytes over (0.5 + 1) s
    assert f.decode == {"mid": 2000} and f.ratio == {"mid": 0.25} and f.prefill == 256
    # One slow decode among fast ones moves the figure by its share of the time (a moving average of
    # rates with weight 0.5 would have gone half the way, to 1500).
    e = Estimates()
    for _ in range(8):
        e.observe_decode("mid", 1000, 0.5)
    e.observe_decode("mid", 1000, 1.0)  # 1000 B/s once, against 2000
    assert 1700 < e.figures().decode["mid"] < 2000
    assert f.decode_seconds("other", 2000) == 1.0  # an unmeasured level: the fastest measured one's speed
