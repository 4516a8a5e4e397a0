"""Fidelity metrics against hand-computed values on small tensors."""

import math

import pytest
import torch

from benchmarks import fidelity


def test_kl_identical_and_shifted_logits_is_zero():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, 11, generator=g)  # [B, S, V]
    assert fidelity.kl_divergence(ref, ref).shape == (3, 5)
    assert torch.allclose(fidelity.kl_divergence(ref, ref), torch.zeros(3, 5), atol=1e-6)
    # a constant shift of the logits leaves the distribution unchanged
    assert torch.allclose(fidelity.kl_divergence(ref, ref + 7.5), torch.zeros(3, 5), atol=1e-5)


def test_kl_known_value_and_asymmetry():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.9, 0.1])
    expected_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    expected_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    ref, test = p.log().view(1, 1, 2), q.log().view(1, 1, 2)
    assert fidelity.kl_divergence(ref, test).item() == pytest.approx(expected_pq, rel=1e-5)
    assert fidelity.kl_divergence(test, ref).item() == pytest.approx(expected_qp, rel=1e-5)
    assert expected_pq != pytest.approx(expected_qp)


def test_kl_nonnegative_on_random_and_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(4, 7, 50, generator=g) * 3
    test = torch.randn(4, 7, 50, generator=g) * 3
    kl = fidelity.kl_divergence(ref, test)
    assert (kl >= 0).all() and (kl > 0.01).all()
    kl16 = fidelity.kl_divergence(ref.bfloat16(), test.bfloat16())
    assert kl16.dtype == torch.float32
    assert torch.allclose(kl16, kl, rtol=0.1, atol=0.05)


def test_mean_kl_respects_mask():
    ref = torch.zeros(1, 3, 2)
    test = torch.zeros(1, 3, 2)
    test[0, 2] = torch.tensor([0.0, 5.0])  # only the last position differs
    mask = torch.tensor([[True, True, False]])
    assert fidelity.mean_kl(ref, test, mask) == pytest.approx(0.0, abs=1e-7)
    full = fidelity.kl_divergence(ref, test)[0, 2].item()
    assert full > 0.5
    assert fidelity.mean_kl(ref, test) == pytest.approx(full / 3, rel=1e-5)
    assert math.isnan(fidelity.mean_kl(ref, test, torch.zeros(1, 3, dtype=torch.bool)))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        fidelity.kl_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError):
        fidelity.top1_agreement(torch.zeros(2, 3), torch.zeros(3, 3))


def test_top1_agreement():
    ref = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0]]])  # argmax 0, 1, 2
    test = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 0.1]]])  # argmax 0, 2, 2
    agree = fidelity.top1_agreement(ref, test)
    assert agree.tolist() == [[True, False, True]]
    assert fidelity.mean_top1_agreement(ref, test) == pytest.approx(2 / 3)
    assert fidelity.mean_top1_agreement(ref, test, torch.tensor([[False, True, False]])) == 0.0


def test_greedy_exact_match():
    gen = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [1, 2, 3, 4]])
    exp = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 2, 9]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    assert fidelity.greedy_exact_match(gen, exp).tolist() == [True, False, False]
    assert fidelity.greedy_exact_match(gen, exp, mask).tolist() == [True, False, True]
    # a continuation shorter than the expected tokens never matches
    assert fidelity.greedy_exact_match(torch.tensor([[5, 6]]), torch.tensor([[5, 6, 7]])).tolist() == [False]


def test_answer_match():
    assert fidelity.answer_match(" Varnhold. The city", " Varnhold")
    assert not fidelity.answer_match(" Varn", " Varnhold")
    assert not fidelity.answer_match(" anything", "  ")


def test_perplexity_uniform_and_known():
    V = 8
    logits = torch.zeros(2, 5, V)  # uniform: every token has probability 1/V
    labels = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    assert fidelity.nll(logits, labels) == pytest.approx(math.log(V), rel=1e-6)
    assert fidelity.perplexity(logits, labels) == pytest.approx(V, rel=1e-5)
    # position s predicts labels[s + 1]: put all mass on the right next token except one position
    sharp = torch.full((1, 4, 3), -1e4)
    labels = torch.tensor([[0, 1, 2, 1]])
    for s in range(3):
        sharp[0, s, labels[0, s + 1]] = 0.0
    assert fidelity.nll(sharp, labels) == pytest.approx(0.0, abs=1e-5)
    sharp[0, 1] = torch.tensor([0.0, 0.0, math.log(2.0)])  # p(label 2) = 2/4
    assert fidelity.nll(sharp, labels) == pytest.approx(math.log(2.0) / 3, rel=1e-4)


def test_perplexity_ignore_index():
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, 3] = 10.0  # confident and right for labels[1] = 3
    labels = torch.tensor([[0, 3, -100, -100]])
    assert fidelity.nll(logits, labels) == pytest.approx(-torch.log_softmax(logits[0, 0], -1)[3].item(), rel=1e-5)
    assert math.isnan(fidelity.nll(logits, torch.full((1, 4), -100)))
