"""Statistics over seeds: the t quantile, t-intervals, means over seeds, paired contrasts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from drcnn.analysis import seeds

# two-sided 95% critical values of Student's t from a printed table (degrees of freedom: value)
TEXTBOOK_T = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 10: 2.228, 30: 2.042}


def t_density(t: np.ndarray, df: int) -> np.ndarray:
    """Student's t density, written out from its definition."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_norm) * (1 + t**2 / df) ** (-(df + 1) / 2)


def central_mass(q: float, df: int) -> float:
    """P(0 < T < q), by Simpson's rule on a fine grid (independent of the module's series)."""
    x = np.linspace(0.0, q, 200_001)
    y = t_density(x, df)
    h = x[1] - x[0]
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


@pytest.mark.parametrize(("df", "value"), TEXTBOOK_T.items())
def test_t_quantile_matches_the_printed_table(df: int, value: float):
    assert seeds.t_quantile_975(df) == pytest.approx(value, abs=5e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 8, 13, 29, 31, 60, 200])
def test_t_quantile_leaves_2_5_percent_in_each_tail(df: int):
    """Integrating the density numerically up to the quantile gives 0.475 (half of 95%)."""
    assert central_mass(seeds.t_quantile_975(df), df) == pytest.approx(0.475, abs=1e-7)


def test_t_quantile_tends_to_the_normal_and_refuses_bad_dof():
    values = [seeds.t_quantile_975(df) for df in (5, 50, 500, 5000)]
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(1.95996, abs=1e-3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="degrees of freedom"):
            seeds.t_quantile_975(bad)


def test_mean_interval_of_three_seeds_by_hand():
    # 1, 2, 6: mean 3, sample variance (4 + 1 + 9) / 2 = 7, t(0.975, 2) = 4.303
    half = 4.303 * math.sqrt(7) / math.sqrt(3)
    mean, lo, hi, n = seeds.mean_interval([1.0, 2.0, math.nan, 6.0])  # NaN: not measured
    assert (mean, n) == (3.0, 3)
    assert lo == pytest.approx(3 - half, abs=1e-3) and hi == pytest.approx(3 + half, abs=1e-3)


def test_mean_interval_without_spread_information():
    mean, lo, hi, n = seeds.mean_interval([2.5])
    assert (mean, n) == (2.5, 1) and math.isnan(lo) and math.isnan(hi)
    mean, lo, hi, n = seeds.mean_interval([math.nan])
    assert n == 0 and all(math.isnan(v) for v in (mean, lo, hi))
    mean, lo, hi, n = seeds.mean_interval([0.3, math.inf, 0.4])  # an infinite radius
    assert mean == math.inf and n == 3 and math.isnan(lo) and math.isnan(hi)


def test_run_names():
    assert seeds.seed_run("dec", 3) == "dec-seed3"
    assert seeds.model_of("dec-seed3") == "dec" and seeds.model_of("dec") == "dec"
    assert seeds.seed_of("a-b-seed12") == 12 and seeds.seed_of("dec") == -1


def long_frame(values: dict[str, dict[int, float]], column: str = "AP") -> pd.DataFrame:
    """One row per run ``<model>-seed<k>`` with ``column`` = values[model][k]."""
    rows = [
        {"model": seeds.seed_run(m, k), column: v}
        for m, per_seed in values.items()
        for k, v in per_seed.items()
    ]
    return pd.DataFrame(rows)


def test_over_seeds_groups_runs_by_model_and_keys():
    frame = pd.DataFrame(
        {
            "run": ["b-seed0", "b-seed1", "b-seed2", "a-seed0", "a-seed1", "b-seed0"],
            "branch": ["reg", "reg", "reg", "reg", "reg", "cls"],
            "x": [1.0, 2.0, 6.0, 5.0, 7.0, 0.5],
        }
    )
    out = seeds.over_seeds(frame, ["branch"], ["x"])
    assert list(out.columns) == ["model", "branch", "seeds", "x", "x_lo", "x_hi"]
    assert out[["model", "branch", "seeds"]].values.tolist() == [
        ["b", "reg", 3],
        ["a", "reg", 2],
        ["b", "cls", 1],
    ]
    b, a, single = (out.iloc[i] for i in range(3))
    half = 4.303 * math.sqrt(7 / 3)
    assert b["x"] == 3 and b["x_hi"] == pytest.approx(3 + half, abs=1e-3)
    # 5, 7: mean 6, s = sqrt(2), t(0.975, 1) = 12.706
    assert a["x_lo"] == pytest.approx(6 - 12.706 * math.sqrt(2) / math.sqrt(2), abs=1e-3)
    assert single["x"] == 0.5 and math.isnan(single["x_lo"])


def test_a_contrast_uses_only_the_seeds_every_model_has():
    frame = long_frame({"a": {0: 10.0, 1: 12.0, 2: 50.0}, "b": {0: 8.0, 1: 11.0}})
    out = seeds.paired_contrasts(frame, [{"name": "a - b", "plus": ["a"], "minus": ["b"]}], ["AP"])
    assert list(out.columns) == seeds.CONTRAST_COLUMNS
    row = out.iloc[0]
    # seeds 0 and 1 only: differences 2 and 1 -> mean 1.5, s = sqrt(0.5), t(0.975, 1) = 12.706
    half = 12.706 * math.sqrt(0.5) / math.sqrt(2)
    assert row["seeds"] == 2 and row["mean"] == 1.5
    assert row["lo"] == pytest.approx(1.5 - half, abs=1e-3)
    assert row["hi"] == pytest.approx(1.5 + half, abs=1e-3)
    assert not row["exceeds_noise"]


def test_infinite_on_both_sides_is_left_out_of_a_contrast():
    """Radius inf - inf is undefined: that seed is not counted; inf - finite stays infinite."""
    frame = long_frame(
        {"a": {0: math.inf, 1: 0.4, 2: 0.5}, "b": {0: math.inf, 1: 0.3, 2: 0.3}}, "radius"
    )
    contrast = {"name": "a - b", "plus": ["a"], "minus": ["b"]}
    row = seeds.paired_contrasts(frame, [contrast], ["radius"]).iloc[0]
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(0.15)
    frame.loc[frame["model"] == "b-seed0", "radius"] = 0.3
    row = seeds.paired_contrasts(frame, [contrast], ["radius"]).iloc[0]
    assert row["seeds"] == 3 and row["mean"] == math.inf and not row["exceeds_noise"]


def test_exceeds_noise_when_the_interval_excludes_zero():
    frame = long_frame(
        {
            "base": {0: 30.0, 1: 20.0, 2: 40.0},  # large differences between seeds ...
            "up": {0: 31.0, 1: 21.1, 2: 40.9},  # ... but always about 1 above the baseline
            "same": {0: 31.0, 1: 19.0, 2: 40.2},  # +1, -1, +0.2: around 0
        }
    )
    contrasts = seeds.default_contrasts(["base", "up", "same"], "base")
    assert [c["name"] for c in contrasts] == ["up - base", "same - base"]
    out = seeds.paired_contrasts(frame, contrasts, ["AP"]).set_index("contrast")
    up, same = out.loc["up - base"], out.loc["same - base"]
    half = 4.303 * np.std([1.0, 1.1, 0.9], ddof=1) / math.sqrt(3)
    assert up["mean"] == pytest.approx(1.0) and up["lo"] == pytest.approx(1 - half, abs=1e-3)
    assert up["exceeds_noise"] and up["lo"] > 0
    assert not same["exceeds_noise"] and same["lo"] < 0 < same["hi"]


def test_grid_main_effects_and_interaction_pair_out_the_seed():
    """2 x 2 cells built as seed offset + 2 (cls at 0.85) + 3 (reg at 0.85) + 4 (both): the
    seed offset cancels in every paired difference, so the intervals have zero width."""
    offsets = {0: 0.0, 1: 10.0, 2: -7.0}
    cells = {}
    for cls in (0, 1):
        for reg in (0, 1):
            name = f"c{cls}_r{reg}"
            cells[name] = {k: o + 2 * cls + 3 * reg + 4 * cls * reg for k, o in offsets.items()}
    contrasts = [
        {"name": "reg", "plus": ["c0_r1", "c1_r1"], "minus": ["c0_r0", "c1_r0"]},
        {"name": "cls", "plus": ["c1_r0", "c1_r1"], "minus": ["c0_r0", "c0_r1"]},
        {"name": "interaction", "plus": ["c1_r1", "c0_r0"], "minus": ["c1_r0", "c0_r1"]},
    ]
    out = seeds.paired_contrasts(long_frame(cells), contrasts, ["AP"]).set_index("contrast")
    # reg: 3 + 4/2 averaged over cls; cls: 2 + 4/2; interaction: (7 - 3) / 2 = half of 4
    for name, value in {"reg": 5.0, "cls": 4.0, "interaction": 2.0}.items():
        row = out.loc[name]
        assert row["mean"] == pytest.approx(value) and row["seeds"] == 3
        assert row["lo"] == pytest.approx(value) and row["hi"] == pytest.approx(value)
        assert row["exceeds_noise"]


def sensitivity_summary() -> pd.DataFrame:
    """A summary as ``sensitivity.summarize`` writes it: ``one`` has 1 regression stage, ``three``
    has 3; three seeds each; the regression sensitivity of ``three`` is 0.01 above ``one``'s."""
    rows = []
    for seed, noise in enumerate([0.0, 0.02, -0.01]):
        for model, stages in (("one", 1), ("three", 3)):
            run = seeds.seed_run(model, seed)
            cls = {"sensitivity": 0.05, "prob_change": -0.05, "radius": 0.4 + noise}
            rows.append({"model": run, "branch": "classification", "stage": 0, **cls})
            for stage in range(stages):
                sens = 0.1 + noise + (0.01 if model == "three" else 0.0)
                reg = {"sensitivity": sens, "ratio": 2.0, "gain_dx": 0.5, "gain_dy": 0.6}
                rows.append(
                    {"model": run, "branch": "regression", "stage": stage, **reg, "iou_gain": 0.1}
                )
    return pd.DataFrame(rows).reindex(
        columns=["model", "branch", "stage", *seeds.SENSITIVITY_FIGURES]
    )


def test_sensitivity_over_seeds_per_branch_and_stage():
    summary = sensitivity_summary()
    out = seeds.sensitivity_over_seeds(summary)
    assert len(out) == 1 + 1 + 1 + 3  # (model, branch, stage) groups
    row = out[(out["model"] == "one") & (out["branch"] == "regression")].iloc[0]
    half = 4.303 * np.std([0.1, 0.12, 0.09], ddof=1) / math.sqrt(3)
    assert row["seeds"] == 3 and row["sensitivity"] == pytest.approx(np.mean([0.1, 0.12, 0.09]))
    assert row["sensitivity_hi"] - row["sensitivity"] == pytest.approx(half, abs=1e-4)
    assert seeds.sensitivity_over_seeds(summary[summary["model"].str.endswith("seed0")]) is None


def test_sensitivity_contrasts_compare_the_stages_both_models_have():
    out = seeds.sensitivity_contrasts(sensitivity_summary(), baseline="one")
    assert set(out["contrast"]) == {"three - one"}
    assert list(out.columns) == ["contrast", "branch", "stage", *seeds.CONTRAST_COLUMNS[1:]]
    regression = out[out["branch"] == "regression"]
    assert set(regression["stage"]) == {0}  # "one" has no stage 1 or 2
    assert set(regression["column"]) == {"sensitivity", "ratio", "gain_dx", "gain_dy", "iou_gain"}
    sens = regression.set_index("column").loc["sensitivity"]
    assert sens["mean"] == pytest.approx(0.01) and sens["exceeds_noise"]  # the noise pairs out
    # the classifier's rows hold only its own figures (regression ones are NaN there)
    assert set(out[out["branch"] == "classification"]["column"]) == {
        "sensitivity",
        "prob_change",
        "radius",
    }
