"""Fidelity metrics: how far a model's output moved against a reference run.

Every benchmark that trades exactness for speed (compressed KV, blended KV, reused chunks) compares its
logits with those of a reference (full prefill, uncompressed KV) through these functions, so all reports
mean the same thing. Pure torch, no model calls, batch-first:

* ``kl_divergence(ref_logits, test_logits)``: KL(ref || test) of the next-token distribution, per
  position ``[B, S]`` (nats), and ``mean_kl`` over a mask.
* ``top1_agreement(ref_logits, test_logits)``: whether the argmax tokens agree, per position ``[B, S]``.
* ``greedy_exact_match(generated, expected)``: whether a greedy continuation reproduces the expected
  token ids, per row ``[B]``; ``answer_match`` does the same on decoded text.
* ``nll`` / ``perplexity(logits, labels)``: next-token loss of ``labels`` under ``logits``, with
  ``ignore_index`` positions left out.

Logits may be any float dtype; every metric computes in float32. ``logits[b, s]`` is the distribution of
the token at position ``s + 1`` (the Hugging Face convention), so ``perplexity`` shifts by one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _check_pair(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> None:
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    if ref_logits.dim() < 2:
        raise ValueError("logits need a vocabulary dimension: [..., V]")


def kl_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_test) in nats for each position.

    ref_logits, test_logits: [B, S, V] (any leading shape ``[...]``, vocabulary last).
    Returns: [B, S] float32, >= 0 up to rounding (clamped at 0), exactly 0 where the logits are equal
    up to a constant shift.
    """
    _check_pair(ref_logits, test_logits)
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)  # [..., V]
    test_lp = F.log_softmax(test_logits.float(), dim=-1)  # [..., V]
    kl = (ref_lp.exp() * (ref_lp - test_lp)).sum(dim=-1)  # [...]
    return kl.clamp_min(0.0)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    """values: [B, S]; mask: [B, S] bool or None -> mean over the masked positions (NaN if none)."""
    v = values.float()
    if mask is None:
        return v.mean().item() if v.numel() else float("nan")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    m = mask.bool()
    return v[m].mean().item() if m.any() else float("nan")


def mean_kl(ref_logits: torch.Tensor, test_logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean of ``kl_divergence`` over positions where ``mask`` ([B, S] bool) is true (all if None)."""
    return _masked_mean(kl_divergence(ref_logits, test_logits), mask)


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """ref_logits, test_logits: [B, S, V] -> [B, S] bool: the two argmax tokens are the same."""
    _check_pair(ref_logits, test_logits)
    return ref_logits.float().argmax(dim=-1) == test_logits.float().argmax(dim=-1)


def mean_top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor,
                        mask: torch.Tensor | None = None) -> float:
    """Share of positions (where ``mask`` [B, S] is true) whose argmax tokens agree, in [0, 1]."""
    return _masked_mean(top1_agreement(ref_logits, test_logits), mask)


def greedy_exact_match(generated: torch.Tensor, expected: torch.Tensor,
                       expected_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Whether each row's greedy continuation starts with the expected tokens.

    generated: [B, G] int token ids produced by greedy decoding (prompt excluded).
    expected: [B, E] int token ids; ``expected_mask`` [B, E] bool marks the real ones (rows of
    different lengths are right-padded), all real if None.
    Returns: [B] bool. A row whose continuation is shorter than its expected tokens does not match.
    """
    if generated.dim() != 2 or expected.dim() != 2 or generated.shape[0] != expected.shape[0]:
        raise ValueError(f"need [B, G] and [B, E]; got {tuple(generated.shape)}, {tuple(expected.shape)}")
    B, E = expected.shape
    mask = torch.ones(B, E, dtype=torch.bool) if expected_mask is None else expected_mask.bool()
    G = generated.shape[1]
    if G < E:  # pad with an id that can never equal a real token
        generated = torch.cat([generated, generated.new_full((B, E - G), -1)], dim=1)
    same = generated[:, :E] == expected  # [B, E]
    return (same | ~mask).all(dim=1)


def answer_match(generated_text: str, answer: str) -> bool:
    """Text form: the continuation, leading whitespace stripped, starts with the stripped answer."""
    return generated_text.lstrip().startswith(answer.strip()) and bool(answer.strip())


def nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean next-token negative log-likelihood (nats/token).

    logits: [B, S, V]; labels: [B, S] int, usually the input ids. Position s of ``logits`` predicts
    ``labels[:, s + 1]``; labels equal to ``ignore_index`` are left out. NaN if nothing is scored.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"need logits [B, S, V] and labels [B, S]; got {tuple(logits.shape)}, {tuple(labels.shape)}")
    lg = logits[:, :-1].float()  # [B, S-1, V]
    tgt = labels[:, 1:]  # [B, S-1]
    n = (tgt != ignore_index).sum().item()
    if n == 0:
        return float("nan")
    tot = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=ignore_index,
                          reduction="sum")
    return tot.item() / n


def perplexity(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """exp(``nll``): logits [B, S, V], labels [B, S]."""
    return math.exp(nll(logits, labels, ignore_index))
