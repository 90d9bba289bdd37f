"""Evaluation and scaling analysis of RL runs.

What a user asks after a run, answered from sampled completions and logged metrics:

- pass@k with the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021) and maj@k;
- the empirical support of a model against its base (Invisible Leash): per problem, whether a
  verified answer appears within k samples; counts P (both), E (RL only), S (base only),
  O (neither) and SRR, NDR, SDS, NSCR. A problem counted outside a model's support has, with
  confidence 1 - zeta, success probability below epsilon = -ln(zeta) / k;
- token-level entropy (mean over sequences of the mean per-step entropy) and answer-level
  entropy (over the distribution of distinct extracted answers, incomplete ones as one "NA");
- the ScaleRL sigmoid compute-performance curve R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B),
  fitted by a grid over A and C_mid with B fitted for each cell, skipping the early part of the
  run, which predicts the asymptote A from the first part of a run (with a PNG of the fit).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# pass@k and maj@k


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct ({num_correct}) must lie in [0, num_samples={num_samples}]")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k ({k}) must lie in [1, num_samples={num_samples}]; sample more")
    if num_samples - num_correct < k:
        return 1.0
    # Product form of the binomial ratio: exact in floating point for large n.
    survive = np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1))
    return float(1.0 - survive)


def mean_pass_at_k(correct_counts: Sequence[int], num_samples: int, k: int) -> float:
    """pass@k averaged over problems, each with ``num_samples`` samples."""
    if not correct_counts:
        raise ValueError("correct_counts is empty: evaluate at least one problem")
    return float(np.mean([pass_at_k(num_samples, c, k) for c in correct_counts]))


def _majority_credit(answers: Sequence[str | None], reference: str) -> float:
    """1 if the most frequent answer is right; ties split the credit evenly; None never wins."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = [a for a, c in counts.items() if c == top]
    return (reference in winners) / len(winners)


def maj_at_k(
    answers: Sequence[str | None],
    reference: str,
    k: int,
    max_subsets: int = 2000,
    seed: int = 0,
) -> float:
    """Expected majority-vote accuracy of k samples drawn without replacement from ``answers``.

    Exact (every k-subset) when there are at most ``max_subsets`` of them, otherwise a Monte
    Carlo estimate over ``max_subsets`` random subsets.
    """
    num = len(answers)
    if not 1 <= k <= num:
        raise ValueError(f"k ({k}) must lie in [1, number of answers={num}]")
    if math.comb(num, k) <= max_subsets:
        subsets = itertools.combinations(range(num), k)
        credits = [_majority_credit([answers[i] for i in s], reference) for s in subsets]
        return float(np.mean(credits))
    rng = np.random.default_rng(seed)
    credits = [
        _majority_credit([answers[i] for i in rng.choice(num, k, replace=False)], reference)
        for _ in range(max_subsets)
    ]
    return float(np.mean(credits))


# ---------------------------------------------------------------------------------------------
# Empirical support (Invisible Leash)


@dataclass
class SupportReport:
    preserved: int  # P: solved by both
    expanded: int  # E: solved by the RL model only
    shrunk: int  # S: solved by the base only
    out_of_support: int  # O: solved by neither
    srr: float  # support retention rate P / (P + S)
    ndr: float  # net discovery rate E / (P + E)
    sds: float  # harmonic mean of SRR and NDR
    nscr: float  # net support change rate (E - S) / (P + E + S)
    epsilon: float  # -ln(zeta) / k: bound on p(correct) outside the support, confidence 1-zeta

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def empirical_support(
    base_correct_counts: Sequence[int],
    model_correct_counts: Sequence[int],
    k: int,
    zeta: float = 0.05,
) -> SupportReport:
    """Classify each problem by whether a verified answer appears within k samples of each model.

    Both lists hold, per problem and in the same order, how many of the k samples were verified
    correct. An empty denominator gives a rate of 0.
    """
    if len(base_correct_counts) != len(model_correct_counts):
        raise ValueError(
            f"base has {len(base_correct_counts)} problems but the model has "
            f"{len(model_correct_counts)}; evaluate both on the same problems"
        )
    if not 0 < zeta < 1:
        raise ValueError(f"zeta ({zeta}) must lie in (0, 1)")
    base = np.asarray(base_correct_counts) > 0
    model = np.asarray(model_correct_counts) > 0
    preserved = int(np.sum(base & model))
    expanded = int(np.sum(model & ~base))
    shrunk = int(np.sum(base & ~model))
    neither = int(np.sum(~base & ~model))

    def rate(num: float, den: float) -> float:
        return float(num / den) if den else 0.0

    srr = rate(preserved, preserved + shrunk)
    ndr = rate(expanded, preserved + expanded)
    sds = rate(2 * srr * ndr, srr + ndr)
    nscr = rate(expanded - shrunk, preserved + expanded + shrunk)
    return SupportReport(
        preserved, expanded, shrunk, neither, srr, ndr, sds, nscr, -math.log(zeta) / k
    )


# ---------------------------------------------------------------------------------------------
# Entropy


def token_entropy(step_entropies: Sequence[Sequence[float]]) -> float:
    """Mean over sequences of the mean per-step entropy -sum_v p_t(v) log p_t(v) (nats)."""
    per_sequence = [float(np.mean(s)) for s in step_entropies if len(s)]
    if not per_sequence:
        raise ValueError("no generated steps to measure entropy over")
    return float(np.mean(per_sequence))


def answer_entropy(answers: Sequence[str | None]) -> float:
    """-sum_j p_j log p_j over distinct extracted answers; incomplete (None) count as one 'NA'."""
    if not answers:
        raise ValueError("answers is empty")
    counts = np.array(list(Counter("NA" if a is None else a for a in answers).values()))
    probabilities = counts / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


# ---------------------------------------------------------------------------------------------
# ScaleRL sigmoid fit


def sigmoid_curve(compute, r0: float, a: float, b: float, c_mid: float) -> np.ndarray:
    """R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B)."""
    compute = np.asarray(compute, dtype=np.float64)
    return r0 + (a - r0) / (1.0 + (c_mid / compute) ** b)


@dataclass
class SigmoidFit:
    a: float  # asymptotic performance
    b: float  # steepness (compute efficiency)
    c_mid: float  # compute at half of the total gain
    r0: float  # starting performance
    sse: float
    num_points: int  # points used in the fit (after skipping the early part)
    fit_range: tuple[float, float]  # compute range fitted

    def predict(self, compute) -> np.ndarray:
        return sigmoid_curve(compute, self.r0, self.a, self.b, self.c_mid)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_sigmoid(
    compute: Sequence[float],
    performance: Sequence[float],
    r0: float | None = None,
    skip_compute: float = 0.0,
    a_grid: Sequence[float] | None = None,
    c_mid_grid: Sequence[float] | None = None,
    b_bounds: tuple[float, float] = (0.05, 10.0),
) -> SigmoidFit:
    """Fit the ScaleRL curve as the paper does: grid over A and C_mid, best B for each cell.

    ``skip_compute`` drops points below that compute (the early near-linear rise). ``r0``
    defaults to the first observed performance. The default A grid runs from just above r0 to
    1.0 in steps of 0.005; the default C_mid grid has 100 log-spaced values from the smallest
    fitted compute to 100x the largest (the midpoint may lie beyond the data). For each cell
    the SSE-optimal B is taken from a 120-point log grid; the cell with the smallest SSE wins
    and its B is refined with SciPy's bounded scalar search.
    """
    from scipy.optimize import minimize_scalar

    compute = np.asarray(compute, dtype=np.float64)
    performance = np.asarray(performance, dtype=np.float64)
    if compute.shape != performance.shape or compute.ndim != 1:
        raise ValueError("compute and performance must be 1-D sequences of the same length")
    if np.any(compute <= 0):
        raise ValueError("compute values must be > 0 (the curve has (C_mid / C)^B)")
    if r0 is None:
        r0 = float(performance[np.argmin(compute)])
    keep = compute >= skip_compute
    x, y = compute[keep], performance[keep]
    if x.size < 4:
        raise ValueError(
            f"only {x.size} points remain after skip_compute={skip_compute}; "
            "lower skip_compute or log more evaluations"
        )
    if a_grid is None:
        a_grid = np.arange(math.ceil((r0 + 0.005) / 0.005) * 0.005, 1.0 + 1e-9, 0.005)
    if c_mid_grid is None:
        c_mid_grid = np.geomspace(x.min(), 100.0 * x.max(), 100)
    a_grid = np.asarray(a_grid, dtype=np.float64)
    c_mid_grid = np.asarray(c_mid_grid, dtype=np.float64)
    b_grid = np.geomspace(b_bounds[0], b_bounds[1], 120)

    # [C_mid, B, point]: (C_mid / C)^B evaluated once, reused for every A.
    log_ratio = np.log(c_mid_grid[:, None, None] / x[None, None, :])
    shape = 1.0 / (1.0 + np.exp(np.clip(b_grid[None, :, None] * log_ratio, -700, 700)))
    best = (np.inf, None, None)
    for a in a_grid:
        sse = (((r0 + (a - r0) * shape) - y) ** 2).sum(-1)
        c_index, b_index = np.unravel_index(np.argmin(sse), sse.shape)
        if sse[c_index, b_index] < best[0]:
            best = (float(sse[c_index, b_index]), float(a), float(c_mid_grid[c_index]))
    _, a, c_mid = best

    def sse_of_b(b: float) -> float:
        return float(((sigmoid_curve(x, r0, a, b, c_mid) - y) ** 2).sum())

    grid_b = b_grid[np.argmin([sse_of_b(b) for b in b_grid])]
    low = max(b_bounds[0], grid_b / 1.2)
    high = min(b_bounds[1], grid_b * 1.2)
    refined = minimize_scalar(sse_of_b, bounds=(low, high), method="bounded")
    b = float(refined.x) if refined.fun <= sse_of_b(grid_b) else float(grid_b)
    return SigmoidFit(
        a=a,
        b=b,
        c_mid=c_mid,
        r0=float(r0),
        sse=sse_of_b(b),
        num_points=int(x.size),
        fit_range=(float(x.min()), float(x.max())),
    )


def plot_sigmoid_fit(
    compute: Sequence[float],
    performance: Sequence[float],
    fit: SigmoidFit,
    path: str | Path,
    extrapolate_to: float | None = None,
    xlabel: str = "compute",
    ylabel: str = "held-out pass@1",
    title: str | None = None,
) -> Path:
    """Write a PNG: observed points, the fit over the fitted range, its extrapolation, and A."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute = np.asarray(compute, dtype=np.float64)
    performance = np.asarray(performance, dtype=np.float64)
    end = extrapolate_to or 4.0 * float(compute.max())
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    fitted = (compute >= fit.fit_range[0]) & (compute <= fit.fit_range[1])
    axes.scatter(compute[fitted], performance[fitted], s=14, label="fitted points")
    if (~fitted).any():
        axes.scatter(compute[~fitted], performance[~fitted], s=14, marker="x", label="held out")
    inside = np.geomspace(max(compute.min(), 1e-12), fit.fit_range[1], 200)
    beyond = np.geomspace(fit.fit_range[1], end, 200)
    axes.plot(inside, fit.predict(inside), label="sigmoid fit")
    axes.plot(beyond, fit.predict(beyond), linestyle="--", label="extrapolation")
    axes.axhline(fit.a, color="grey", linewidth=0.8, linestyle=":", label=f"A = {fit.a:.3f}")
    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title or f"A={fit.a:.3f}  B={fit.b:.2f}  C_mid={fit.c_mid:.3g}")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------
# CLI: stalwart rl analyze | stalwart rl fit (over the rl_evals.jsonl a run writes)


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("evals", help="rl_evals.jsonl of a run")
    parser.add_argument("--base-version", type=int, default=None, help="default: the first")
    parser.add_argument("--version", type=int, default=None, help="default: the last")
    parser.add_argument("--zeta", type=float, default=0.05)


def run_analyze(args: argparse.Namespace) -> int:
    results = [json.loads(line) for line in Path(args.evals).read_text().splitlines() if line]
    if not results:
        raise ValueError(f"{args.evals} holds no evaluations")
    by_version = {r["version"]: r for r in results}
    base = by_version[args.base_version if args.base_version is not None else results[0]["version"]]
    model = by_version[args.version if args.version is not None else results[-1]["version"]]
    num_samples = model["num_samples"]
    print(f"{'version':>8} {'pass@1':>8} {f'pass@{num_samples}':>8} {'tok H':>7} {'ans H':>7}")
    for result in (base, model):
        print(
            f"{result['version']:>8} {mean_pass_at_k(result['correct_counts'], num_samples, 1):>8.3f} "
            f"{mean_pass_at_k(result['correct_counts'], num_samples, num_samples):>8.3f} "
            f"{result['token_entropy']:>7.3f} {result['answer_entropy']:>7.3f}"
        )
    report = empirical_support(
        base["correct_counts"], model["correct_counts"], num_samples, args.zeta
    )
    print(json.dumps(report.to_dict()))
    return 0


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("evals", help="rl_evals.jsonl of a run (x = version, y = pass1)")
    parser.add_argument("--x", default="version", help="compute field (default learner steps)")
    parser.add_argument("--y", default="pass1")
    parser.add_argument("--skip", type=float, default=0.0, help="drop points with x below this")
    parser.add_argument("--fit-upto", type=float, default=None, help="fit only points up to x")
    parser.add_argument("--png", default=None, help="write the curve and its extrapolation")


def run_fit(args: argparse.Namespace) -> int:
    results = [json.loads(line) for line in Path(args.evals).read_text().splitlines() if line]
    r0 = next(r[args.y] for r in results if r[args.x] == min(q[args.x] for q in results))
    points = [(r[args.x], r[args.y]) for r in results if r[args.x] > 0]
    compute = np.array([x for x, _ in points], dtype=float)
    performance = np.array([y for _, y in points], dtype=float)
    used = compute <= (args.fit_upto if args.fit_upto is not None else np.inf)
    fit = fit_sigmoid(compute[used], performance[used], r0=r0, skip_compute=args.skip)
    print(json.dumps(fit.to_dict()))
    if args.png:
        plot_sigmoid_fit(compute, performance, fit, args.png, xlabel=args.x, ylabel=args.y)
        print(f"wrote {args.png}")
    return 0
