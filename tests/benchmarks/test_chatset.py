"""The held-out chat set read back as the benchmark reads it: each question's answer is stated in exactly one
passage of its prompt, every person's value differs, the splits are disjoint; and every variant the sweep
compares is a valid `BlendConfig`."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.models.chatset import ATTRIBUTES, SPLITS, load_chat


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_the_answer_is_in_exactly_one_passage(split):
    examples = load_chat(split)
    assert len(examples) == SPLITS[split][2]
    for ex in examples:
        values, fact, question, lead = ATTRIBUTES[ex.relation]
        value = ex.answer.strip()
        assert value in values and ex.answer.startswith(" ")
        before, after = lead.split("{n}")
        name = ex.lead[len(before) : len(ex.lead) - len(after)]
        assert ex.lead == lead.format(n=name) and ex.question == question.format(n=name)
        assert sum(fact.format(n=name, v=value) in p for p in ex.passages) == 1
        assert sum(name in p for p in ex.passages) == 1  # the only passage about that person
        assert ex.chance == pytest.approx(1 / len(ex.passages))
        # every other person holds a different value of the same relation
        stated = [v for v in values for p in ex.passages if fact.split("{n}")[-1].format(v=v) in p]
        assert len(stated) == len(set(stated)) == len(ex.passages)


def test_splits_are_disjoint_and_unknown_split_is_refused():
    eval_q = {(ex.question, ex.passages) for ex in load_chat("eval")}
    assert not eval_q & {(ex.question, ex.passages) for ex in load_chat("dev")}
    with pytest.raises(ValueError):
        load_chat("train")


def test_sweep_variants_are_valid_configs():
    from benchmarks.blend_sweep import VARIANTS
    from blend import BlendConfig

    for name, change in VARIANTS.items():
        cfg = dataclasses.replace(BlendConfig(), **change, ratio=0.15)
        assert all(getattr(cfg, k) == v for k, v in change.items()), name
