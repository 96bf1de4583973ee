"""Numbers about a critic's judgments of preference pairs: accuracy with a bootstrap interval, calibration,
length bias, position bias. Shared by `dspost eval-rm` and the meta-critic; deterministic for a given seed.

Conventions (RewardBench's): a pair is right only when the critic prefers the gold `chosen`; ties are wrong;
a failed judgment (unparsable, timed out) is wrong too and also counted under `failed`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dspost.rewards.critics import Judgment, Pair


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of the mean of `values` (resampling pairs with replacement)."""
    if len(values) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def wilson_ci(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [math.nan, math.nan]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def sign_test_p(k: int, n: int) -> float:
    """One-sided P(X >= k) for X ~ Binomial(n, 1/2)."""
    return float(sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n) if n else 1.0


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return math.nan
    rx, ry = rank(x), rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def calibration(judgments: Sequence[Judgment], bins: int = 10) -> tuple[float | None, list[dict]]:
    """Expected calibration error of p = sigmoid(score_chosen - score_rejected) as the critic's confidence in
    its own pick (max(p, 1-p), in [0.5, 1]), over equal-width bins; and the reliability-diagram bins."""
    scored = [j for j in judgments if j.score_chosen is not None and j.score_rejected is not None]
    if not scored:
        return None, []
    diff = np.array([j.score_chosen - j.score_rejected for j in scored], dtype=float)
    p = 1 / (1 + np.exp(-np.clip(diff, -60, 60)))
    conf, right = np.maximum(p, 1 - p), (diff > 0).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(right[sel].mean() - conf[sel].mean())
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(sel.sum()),
                          "confidence": float(conf[sel].mean()), "accuracy": float(right[sel].mean())})
    return float(ece), table


def pair_metrics(pairs: Sequence[Pair], judgments: Sequence[Judgment], n_boot: int = 1000, seed: int = 0) -> dict:
    right = np.array([j.preference == 1 for j in judgments], dtype=float)
    n = len(pairs)
    longer = np.array([len(p.chosen) > len(p.rejected) for p in pairs])
    shorter = np.array([len(p.chosen) < len(p.rejected) for p in pairs])
    out = {
        "n": n,
        "accuracy": float(right.mean()) if n else math.nan,
        "accuracy_ci": bootstrap_ci(right, n_boot, seed),
        "ties": sum(j.preference == 0 for j in judgments),
        "failed": sum(j.preference is None for j in judgments),
    }
    out["ece"], out["calibration_bins"] = calibration(judgments)
    scored = [(j, p) for j, p in zip(judgments, pairs) if j.score_chosen is not None and j.score_rejected is not None]
    out["length_bias"] = {
        "acc_when_chosen_longer": float(right[longer].mean()) if longer.any() else None,
        "acc_when_chosen_shorter": float(right[shorter].mean()) if shorter.any() else None,
        "n_chosen_longer": int(longer.sum()), "n_chosen_shorter": int(shorter.sum()),
        "score_length_spearman": _nan_to_none(spearman(
            [s for j, _ in scored for s in (j.score_chosen, j.score_rejected)],
            [len(r) for _, p in scored for r in (p.chosen, p.rejected)])) if scored else None,
        # The length-only critic on the same pairs: what a critic must beat to show it reads content.
        "length_baseline_accuracy": float(longer.mean()) if n else None,
    }
    orders = [j.orders for j in judgments if j.orders is not None]
    if orders:
        both = [(a, b) for a, b in orders if a is not None and b is not None]
        # Order 1 shows chosen first (+1 = picked the first); order 2 shows it second (+1 = picked the second).
        firsts = [a == 1 for a, _ in orders if a is not None] + [b == -1 for _, b in orders if b is not None]
        out["position_bias"] = {
            "consistency": sum(a == b for a, b in both) / len(both) if both else None,
            "first_position_rate": sum(firsts) / len(firsts) if firsts else None,
            "n_both_orders": len(both),
            "unparsable": sum((a is None) + (b is None) for a, b in orders),
        }
    return out


def category_metrics(pairs: Sequence[Pair], judgments: Sequence[Judgment], n_boot: int = 1000,
                     seed: int = 0) -> dict[str, dict]:
    out = {}
    for cat in sorted({p.category for p in pairs if p.category is not None}):
        idx = [i for i, p in enumerate(pairs) if p.category == cat]
        right = np.array([judgments[i].preference == 1 for i in idx], dtype=float)
        out[cat] = {"n": len(idx), "accuracy": float(right.mean()), "accuracy_ci": bootstrap_ci(right, n_boot, seed)}
    return out


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x
