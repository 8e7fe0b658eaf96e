"""Statistics over seeds: mean with a 95% t-interval, and paired differences between models.

An experiment run with ``seeds: [..]`` has one run per model and seed, named ``<model>-seed<k>``
(:func:`drcnn.analysis.tables.seed_run`). Tables here take a *long* frame with one row per run
(and per key, e.g. branch and stage) whose ``run`` column, or ``model`` column when there is no
``run`` column, holds those run names.

- :func:`mean_interval`: over the ``n`` seeds' values ``x_i`` of one model, the mean ``m`` and
  the Student-t 95% confidence interval ``m -/+ t(0.975, n - 1) * s / sqrt(n)``, with ``s`` the
  sample standard deviation (``n - 1`` in the denominator). It treats the seeds as independent
  draws of the training's randomness; NaN values (not measured) are left out, and with fewer
  than two values the interval is NaN.
- :func:`paired_contrasts`: a contrast ``{name, plus: [models], minus: [models]}`` is, for each
  seed ``k`` that every named model has, ``d_k = mean(plus models' values at seed k) -
  mean(minus models' values at seed k)`` (paired by seed: runs of the same seed share the data
  order and initialisation seed, so their noise partly cancels), then :func:`mean_interval` over
  the ``d_k``. "model - baseline" is ``plus: [model], minus: [baseline]``; in a 2 x 2 grid with
  factors A (levels a0, a1) and B, the main effect of A is ``plus: [a1b0, a1b1], minus: [a0b0,
  a0b1]`` (the effect of A averaged over B) and the interaction ``plus: [a1b1, a0b0], minus:
  [a1b0, a0b1]``, i.e. half the difference between A's effect at b1 and at b0. A difference
  *exceeds the noise* when its interval excludes 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
SEED_RUN = re.compile(r"^(?P<model>.+)-seed(?P<seed>\d+)$")  # what seed_run names
CONTRAST_COLUMNS = ["contrast", "column", "mean", "lo", "hi", "seeds", "exceeds_noise"]


def seed_run(model: str, seed: int) -> str:
    """The name of ``model``'s run with ``train.seed=seed`` (its folder under ``models/``)."""
    return f"{model}-seed{seed}"


def model_of(run: str) -> str:
    """The model a run belongs to: ``a-seed3`` -> ``a``; a run without a seed is its model."""
    match = SEED_RUN.match(run)
    return match["model"] if match else run


def seed_of(run: str) -> int:
    """A run's seed: ``a-seed3`` -> 3; -1 for a run without one (it pairs with seedless runs)."""
    match = SEED_RUN.match(run)
    return int(match["seed"]) if match else -1


def _two_sided_t_cdf(theta: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` (integer) degrees of freedom, ``theta =
    arctan(t / sqrt(df))``: the finite series of Abramowitz & Stegun 26.7.3 (exact)."""
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df/2 terms
        term = total = 1.0
        for j in range(1, df // 2):
            term *= cos2 * (2 * j - 1) / (2 * j)
            total += term
        return sin * total
    # odd: 2/pi * (theta + sin(theta) * (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...)), (df-1)/2 terms
    term = math.cos(theta)
    total = term if df > 1 else 0.0
    for j in range(1, (df - 1) // 2):
        term *= cos2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + sin * total)


def t_quantile_975(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom (the 0.975
    quantile; 4.303 for df = 2, 1.96 as df grows), by bisection of the exact distribution
    function in ``theta = arctan(t / sqrt(df))``, so no table and no scipy are needed."""
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"degrees of freedom: expected an integer >= 1, got {df!r}")
    df = int(df)
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):  # the cdf rises monotonically with theta on [0, pi/2)
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _two_sided_t_cdf(mid, df) < CONFIDENCE else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_interval(values: Iterable[float]) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)``: the mean of the non-NaN values and its 95% t-interval over them
    (``mean -/+ t(0.975, n-1) * s / sqrt(n)``, ``s`` the sample standard deviation with n - 1
    degrees of freedom); NaN bounds when ``n < 2`` or a value is infinite (e.g. an invariance
    radius of ``inf``: the mean is then infinite too)."""
    array = np.asarray(list(values), dtype=np.float64)
    array = array[~np.isnan(array)]
    n = len(array)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(array.mean())
    if n < 2 or not np.isfinite(array).all():
        return mean, math.nan, math.nan, n
    half = t_quantile_975(n - 1) * float(array.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def run_column(frame: pd.DataFrame) -> str:
    """The column of ``frame`` that names the runs: ``run`` if present, else ``model``."""
    return "run" if "run" in frame.columns else "model"


def over_seeds(frame: pd.DataFrame, keys: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """One row per model (``<model>-seed<k>`` runs grouped by ``model``) and ``keys``: for each
    of ``columns`` its mean over the seeds and 95% t-interval (``<column>_lo``, ``<column>_hi``;
    :func:`mean_interval`), and ``seeds``, the number of runs. Models in order of appearance."""
    base = frame[run_column(frame)].map(model_of).rename("model")
    rows = []
    for group, part in frame.groupby([base, *(frame[k] for k in keys)], sort=False):
        row = dict(zip(["model", *keys], group, strict=True))
        row["seeds"] = part[run_column(frame)].nunique()
        for column in columns:
            mean, lo, hi, _ = mean_interval(part[column])
            row.update({column: mean, f"{column}_lo": lo, f"{column}_hi": hi})
        rows.append(row)
    names = ["model", *keys, "seeds", *(f"{c}{s}" for c in columns for s in ("", "_lo", "_hi"))]
    return pd.DataFrame(rows, columns=names)


def has_seeds(frame: pd.DataFrame) -> bool:
    """Whether some model of ``frame`` has more than one run (something to average)."""
    if frame.empty:
        return False
    runs = frame[run_column(frame)].drop_duplicates()  # a run may have several rows
    return bool(runs.map(model_of).value_counts().max() > 1)


def _contrast_row(
    values: pd.DataFrame, contrast: Mapping[str, Any], column: str
) -> dict[str, Any] | None:
    """One contrast on one column of a ``seed x model`` table ``values``: the mean of the
    paired per-seed differences and its t-interval; None when a named model has no run here or
    no seed has a value for every named model."""
    plus, minus = list(contrast["plus"]), list(contrast["minus"])
    if not set(plus + minus) <= set(values.columns):
        return None
    common = values[plus + minus].dropna()  # only seeds that every named model has
    if common.empty:
        return None
    diffs = common[plus].mean(axis=1) - common[minus].mean(axis=1)
    mean, lo, hi, n = mean_interval(diffs)
    exceeds = bool(lo > 0 or hi < 0)  # False for a NaN interval
    return {
        "column": column,
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "seeds": n,
        "exceeds_noise": exceeds,
    }


def paired_contrasts(
    frame: pd.DataFrame,
    contrasts: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    keys: Sequence[str] = (),
) -> pd.DataFrame:
    """Paired-by-seed differences between models (module docstring), one row per contrast, key
    group and column: ``contrast, <keys...>, column, mean, lo, hi, seeds, exceeds_noise``.

    ``seeds`` is the number of seeds the difference was taken over: those where every model of
    the contrast has a (non-NaN) value, less those where the difference is undefined (infinite
    on both sides, e.g. an invariance radius of ``inf``; then ``seeds`` may be 0). No row where
    no seed has a value for every model, e.g. a regression stage that one of the models lacks,
    or a column that is undefined for the key group.
    """
    runs = frame[run_column(frame)]
    data = frame.assign(_model=runs.map(model_of), _seed=runs.map(seed_of))
    groups = list(data.groupby(list(keys), sort=False)) if keys else [((), data)]
    rows = []
    for contrast in contrasts:
        for group, part in groups:
            labels = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
            for column in columns:
                values = part.groupby(["_seed", "_model"])[column].mean().unstack("_model")
                row = _contrast_row(values, contrast, column)
                if row is not None:
                    rows.append({"contrast": contrast["name"], **labels, **row})
    return pd.DataFrame(rows, columns=[CONTRAST_COLUMNS[0], *keys, *CONTRAST_COLUMNS[1:]])


def default_contrasts(
    models: Sequence[str], baseline: str | None, extra: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Every model minus ``baseline`` (``"<model> - <baseline>"``; none when ``baseline`` is
    None), then the ``extra`` contrasts (e.g. a spec's 2 x 2 main effects and interaction)."""
    out = [
        {"name": f"{m} - {baseline}", "plus": [m], "minus": [baseline]}
        for m in models
        if baseline is not None and m != baseline
    ]
    return out + [
        {"name": c["name"], "plus": list(c["plus"]), "minus": list(c["minus"])} for c in extra
    ]


# The translation-sensitivity summary's figures aggregated over seeds, per branch and stage
# (drcnn.analysis.sensitivity.summarize: one row per run, branch and stage).
SENSITIVITY_FIGURES = [
    "sensitivity",
    "ratio",
    "gain_dx",
    "gain_dy",
    "prob_change",
    "radius",
    "iou_gain",
]
SENSITIVITY_KEYS = ["branch", "stage"]


def sensitivity_over_seeds(summary: pd.DataFrame) -> pd.DataFrame | None:
    """Per model (its ``<model>-seed<k>`` runs), branch and stage of a sensitivity summary: the
    mean of each of :data:`SENSITIVITY_FIGURES` over the seeds with its 95% t-interval
    (``<figure>_lo``, ``<figure>_hi``; :func:`mean_interval`) and ``seeds``, the number of runs.

    This interval is over seeds (training randomness), unlike the summary's per-run bootstrap
    intervals over objects. None when no model has more than one run.
    """
    if not has_seeds(summary):
        return None
    return over_seeds(summary, SENSITIVITY_KEYS, SENSITIVITY_FIGURES)


def sensitivity_contrasts(
    summary: pd.DataFrame,
    contrasts: Sequence[Mapping[str, Any]] = (),
    baseline: str | None = None,
) -> pd.DataFrame:
    """Differences of :data:`SENSITIVITY_FIGURES` between models per branch and stage, paired by
    seed, with their 95% t-interval (:func:`paired_contrasts`): every model minus ``baseline``
    (none when None), then ``contrasts``. A stage is compared only where every model of the
    contrast has it (stage 0 is the first regression stage of every model)."""
    models = list(dict.fromkeys(summary[run_column(summary)].map(model_of)))
    every = default_contrasts(models, baseline, contrasts)
    return paired_contrasts(summary, every, SENSITIVITY_FIGURES, SENSITIVITY_KEYS)
