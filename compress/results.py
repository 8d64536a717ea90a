"""A dataset sweep's results file: its row schema, reading it, and summarising it.

One row per image x strategy x budget (``COLUMNS``): the image's path as
given, the strategy, the budget asked for, the count M it gave, fidelity,
attention mass kept, the downstream head's agreement (``cc``, ``kl``,
``sim``, ``top_iou``; NaN when the model has no trained head), the time the
strategy took at that budget and the image's encode time. Adaptive
strategies (PruMerge) pick their own M, so they give one row per image with
``budget = ADAPTIVE_BUDGET`` (0). An image that could not be read gives one
row with ``strategy = ERROR_STRATEGY`` ("-"), ``budget = 0`` and its message
in ``error`` ("" on every other row).

``compress.sweep`` writes these files; this module only reads them, so the
app can open one without Ray.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd

from ._checks import check_choice, check_int, check_real

ADAPTIVE_BUDGET = 0
ERROR_STRATEGY = "-"
COLUMNS = ("image", "strategy", "budget", "M", "N", "fidelity", "attention_kept", "cc", "kl", "sim",
           "top_iou", "strategy_ms", "encode_ms", "error", "size", "model")
KEY = ("image", "strategy", "budget")
INT_COLUMNS = ("budget", "M", "N", "size")
STR_COLUMNS = ("image", "strategy", "error", "model")
METRICS = ("M", "fidelity", "attention_kept", "cc", "kl", "sim", "top_iou", "strategy_ms")
LOWER_IS_BETTER = frozenset({"kl", "strategy_ms"})
# what each metric can take: a confidence interval is cut to it (a t-interval over five images
# reached 1.004 for a mean cosine, whose largest value is 1)
RANGES = {"M": (1.0, math.inf), "fidelity": (-1.0, 1.0), "attention_kept": (0.0, 1.0),
          "cc": (-1.0, 1.0), "kl": (0.0, math.inf), "sim": (0.0, 1.0), "top_iou": (0.0, 1.0),
          "strategy_ms": (0.0, math.inf)}
METADATA_KEY = b"tce_sweep"  # Parquet key-value metadata: {"format": 1, "size": ..., "model": ...}
FORMAT = 1


def empty_results() -> pd.DataFrame:
    """A results frame with no rows and the columns' dtypes."""
    return as_results(pd.DataFrame({c: [] for c in COLUMNS}))


def as_results(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with exactly ``COLUMNS`` in order and their dtypes (int64, float64, str)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"not a sweep results table: missing columns {', '.join(missing)}")
    out = df.loc[:, list(COLUMNS)].copy()
    for c in COLUMNS:
        if c in INT_COLUMNS:
            out[c] = out[c].astype("int64")
        elif c in STR_COLUMNS:
            out[c] = out[c].astype(object).fillna("").astype(str)
        else:
            out[c] = out[c].astype("float64")
    return out.reset_index(drop=True)


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of a sweep results file (Parquet) as a DataFrame with ``COLUMNS``.

    ``ValueError`` with a clear message for a missing file, a file that is
    not Parquet, and a Parquet file that is not a sweep's results.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no results file at {path!r}: make one with "
                         f"`python -m compress sweep DIR --out {path}`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path!r} is not a Parquet file ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path!r} is not a sweep results file: it has no column(s) {', '.join(missing)}")
    return as_results(table.to_pandas())


def file_settings(path: str | os.PathLike) -> dict:
    """The settings a results file was written with ({"size": ..., "model": ...}); {} if unknown."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(os.fspath(path)).metadata or {}
    try:
        return json.loads(meta[METADATA_KEY])
    except (KeyError, ValueError):
        return {}


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom.

    For t >= 0 it is 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2), I the
    regularised incomplete beta function (Abramowitz and Stegun 26.7.1, 26.5.27).
    """
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``)."""
    p = check_real("p", p, 0.0, 1.0)
    df = check_real("df", df, 1e-9)
    if p in (0.0, 1.0):
        return math.copysign(math.inf, p - 0.5)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values, level: float = 0.95,
            bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[int, float, float, float]:
    """(n, mean, low, high): the mean of the finite ``values`` and its Student t confidence interval.

    The interval is mean +- t_{(1 + level) / 2, n - 1} * s / sqrt(n), s the
    sample standard deviation (n - 1 in the denominator): the textbook
    t-interval on the per-image values; mean and interval are cut to
    ``bounds`` (the values the metric can take). NaNs are left out (an image without a head value);
    with one value the interval is NaN, with none all are NaN.
    """
    level = check_real("level", level, 0.0, 1.0)
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n == 1:
        return 1, mean, math.nan, math.nan
    half = t_quantile((1.0 + level) / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    # the mean too: rounding leaves a KL of identical maps at -1e-7, which no KL can be
    inside = min(max(mean, bounds[0]), bounds[1])
    return n, inside, min(max(mean - half, bounds[0]), inside), max(min(mean + half, bounds[1]), inside)


def summarise(results: str | os.PathLike | pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per strategy and budget: n images, then mean, low and high of the ``level`` CI of each metric.

    ``results``: a results file or frame. Columns: ``strategy``, ``budget``
    (``ADAPTIVE_BUDGET`` for adaptive strategies), ``n`` (images with a
    result there), and for each of ``METRICS`` ``{metric}_mean``,
    ``{metric}_lo``, ``{metric}_hi`` (``mean_ci``: a t-interval on the
    per-image values, cut to the metric's ``RANGES``; a metric's own n can be smaller when some images have
    no value, e.g. no head). Error rows are left out. Rows follow the
    strategies' order in the file's first appearance, then the budget.
    """
    df = results if isinstance(results, pd.DataFrame) else load_results(results)
    df = df[df["error"] == ""]
    rows = []
    order = list(dict.fromkeys(df["strategy"]))
    for (strategy, budget), group in df.groupby(["strategy", "budget"], sort=False):
        row = {"strategy": strategy, "budget": int(budget), "n": int(len(group))}
        for metric in METRICS:
            _, mean, lo, hi = mean_ci(group[metric].to_numpy(), level, RANGES[metric])
            row.update({f"{metric}_mean": mean, f"{metric}_lo": lo, f"{metric}_hi": hi})
        rows.append(row)
    columns = ["strategy", "budget", "n"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "lo", "hi")]
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    out["_rank"] = out["strategy"].map({s: i for i, s in enumerate(order)})
    return out.sort_values(["_rank", "budget"]).drop(columns="_rank").reset_index(drop=True)


def format_summary(summary: pd.DataFrame, metrics: tuple[str, ...] = ("M", "fidelity", "cc")) -> str:
    """The summary as a fixed-width text table: mean [low, high] of each of ``metrics``."""
    head = f"{'strategy':18}{'budget':>8}{'n':>6}" + "".join(f"{m + ' mean [95% CI]':>28}" for m in metrics)
    lines = [head, "-" * len(head)]
    for _, r in summary.iterrows():
        budget = "own" if r["budget"] == ADAPTIVE_BUDGET else str(r["budget"])
        cells = []
        for m in metrics:
            mean, lo, hi = r[f"{m}_mean"], r[f"{m}_lo"], r[f"{m}_hi"]
            if math.isnan(mean):
                cells.append(f"{'-':>28}")
            elif math.isnan(lo):
                cells.append(f"{mean:>10.3f}{'':18}")
            else:
                cells.append(f"{mean:>10.3f} [{lo:>7.3f}, {hi:>7.3f}]")
        lines.append(f"{r['strategy']:18}{budget:>8}{r['n']:>6}" + "".join(cells))
    return "\n".join(lines)


def worst_images(results: pd.DataFrame, strategy: str, metric: str = "cc", k: int = 6,
                 budget: int | None = None) -> list[tuple[str, float]]:
    """The ``k`` images where ``strategy`` did worst on ``metric``: [(image path, value)], worst first.

    Worst is the lowest value, or the highest for ``LOWER_IS_BETTER``
    metrics (KL, time). ``budget``: that budget's rows only; None: each
    image's mean over the strategy's budgets. Images without a value (no
    head, error rows) are left out.
    """
    check_choice("metric", metric, METRICS)
    k = check_int("k", k, 1)
    strategies = sorted(set(results["strategy"]) - {ERROR_STRATEGY})
    check_choice("strategy", strategy, strategies)
    rows = results[(results["strategy"] == strategy) & (results["error"] == "")]
    if budget is not None:
        check_choice("budget", int(budget), sorted(set(rows["budget"].astype(int))))
        rows = rows[rows["budget"] == int(budget)]
    per_image = rows.groupby("image", sort=False)[metric].mean().dropna()
    ranked = per_image.sort_values(ascending=metric not in LOWER_IS_BETTER, kind="stable")
    return [(str(path), float(v)) for path, v in ranked.head(k).items()]
