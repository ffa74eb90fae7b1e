"""Exact one-sided binomial tests for watermark bits.

Under the null hypothesis (an image that does not carry the key) each extracted bit matches the key with probability
1/2 independently, so the number of matches K of n bits is Bin(n, 1/2). The p-value is P(Bin(n, 1/2) ≥ K); an image
is flagged when K reaches the smallest count whose p-value is at most the chosen false-positive rate. Independence is
what the extractor's whitening aims for; the benchmark checks the flag rate on clean images against the nominal one.
"""
from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import binom

from core.errors import UserError


def p_value(matched: int, n: int) -> float:
    """P(Bin(n, 1/2) ≥ matched)."""
    if not 0 <= matched <= n:
        raise ValueError(f"matched bits {matched} outside 0..{n}")
    return float(binom.sf(matched - 1, n, 0.5))


def threshold(n: int, fpr: float) -> int:
    """The smallest K with P(Bin(n, 1/2) ≥ K) ≤ ``fpr``; n + 1 when even all n matching is not that rare."""
    if not 0 < fpr < 1:
        raise UserError(f"the false-positive rate must be between 0 and 1 (got {fpr:g})")
    k = int(binom.isf(fpr, n, 0.5)) + 1  # a first guess from the inverse survival function, then made exact
    while k > 0 and p_value(k - 1, n) <= fpr:
        k -= 1
    while k <= n and p_value(k, n) > fpr:
        k += 1
    return k


@dataclass(frozen=True)
class Verdict:
    matched: int
    bits: int
    p_value: float
    threshold: int  # matches needed at the chosen false-positive rate
    fpr: float

    @property
    def bit_accuracy(self) -> float:
        return self.matched / self.bits

    @property
    def watermarked(self) -> bool:
        return self.matched >= self.threshold

    def as_dict(self) -> dict:
        return {"matched": self.matched, "bits": self.bits, "bit_accuracy": round(self.bit_accuracy, 4),
                "p_value": self.p_value, "threshold": self.threshold, "fpr": self.fpr,
                "watermarked": self.watermarked}


def verdict(matched: int, bits: int, fpr: float) -> Verdict:
    return Verdict(matched=int(matched), bits=int(bits), p_value=p_value(int(matched), int(bits)),
                   threshold=threshold(int(bits), fpr), fpr=fpr)


def pooled(matches: list[int], bits_per_image: int, fpr: float) -> Verdict:
    """One test over all m images' n·m bits (stronger than any single image when each carries the key weakly)."""
    return verdict(sum(matches), bits_per_image * len(matches), fpr)


@dataclass(frozen=True)
class KeyMatch:
    index: int  # of the best key in the list
    verdict: Verdict  # at the per-key level fpr / L
    adjusted_p: float  # Bonferroni: min(1, L·p)
    keys: int


def best_key(matches_per_key: list[int], bits: int, fpr: float) -> KeyMatch:
    """Which of L registered keys an image carries: the key with the most matched bits, tested at ``fpr / L``
    (Bonferroni) so that the chance of naming *any* key for a clean image stays at most ``fpr``."""
    if not matches_per_key:
        raise UserError("no keys to match against")
    count = len(matches_per_key)
    index = max(range(count), key=lambda i: matches_per_key[i])
    v = verdict(matches_per_key[index], bits, fpr / count)
    return KeyMatch(index=index, verdict=v, adjusted_p=min(1.0, count * v.p_value), keys=count)
