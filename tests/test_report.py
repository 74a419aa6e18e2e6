"""Tables: the paired test of the ablation and the flag on methods that do not register."""
import numpy as np
import pytest
import pandas as pd

from ldreg.evaluate import registration_flag
from ldreg.report import ablation_table, accuracy_table, paired_test, unsupervised_counterpart


def _evals(diffs):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, len(diffs))
    rows = [{"method": "student_unsupervised", "pair_id": f"p{i}", "dice": b, "folding_fraction": 0.0, "sdlogj": 0.1}
            for i, b in enumerate(base)]
    rows += [{"method": "student_aldk", "pair_id": f"p{i}", "dice": b + d, "folding_fraction": 0.0, "sdlogj": 0.1}
             for i, (b, d) in enumerate(zip(base, diffs))]
    return pd.DataFrame(rows)


def test_paired_test_finds_a_consistent_gain_and_not_noise():
    gain = paired_test(_evals([0.02] * 12), "student_aldk", "student_unsupervised")
    assert abs(gain["dice_diff_vs_unsupervised"] - 0.02) < 1e-9
    assert gain["wilcoxon_p"] < 0.01 and gain["pairs"] == 12
    noise = paired_test(_evals(np.random.default_rng(1).normal(0, 0.01, 12)), "student_aldk", "student_unsupervised")
    assert noise["wilcoxon_p"] > 0.05


def test_methods_below_no_registration_or_folding_are_flagged():
    assert registration_flag(0.30, 0.20, 0.01) == ""
    assert "below no registration" in registration_flag(0.10, 0.20, 0.0)
    # a model that stayed at the zero field is flagged too, though not strictly below
    assert "no better than no registration" in registration_flag(0.2001, 0.20, 0.0)
    assert registration_flag(0.21, 0.20, 0.0) == ""
    assert "folding 5.00 % > 1 %" in registration_flag(0.30, 0.20, 5.0)
    evals = pd.DataFrame([{"method": m, "pair_id": "p", "dice": d, "folding_fraction": f, "sdlogj": 0.1}
                          for m, d, f in [("identity", 0.2, 0), ("good", 0.3, 0), ("broken", 0.0, 0.06)]])
    table = accuracy_table(evals, pd.DataFrame(), {}).set_index("method")
    assert table.loc["good", "flag"] == "" and table.loc["identity", "flag"] == ""
    assert "below no registration" in table.loc["broken", "flag"] and "folding" in table.loc["broken", "flag"]


def test_training_curves_draw_a_model_kept_at_step_0(tmp_path):
    """A variant whose every try diverged ends at step 0 with an empty loss log; the figure
    still draws (the default run's adversarial_only student did exactly this)."""
    from ldreg.report import training_curves
    good = pd.DataFrame({"step": [1, 2, 3], "loss": [0.9, 0.8, 0.7], "wasserstein": [0.1, 0.2, 0.3]})
    training_curves({"student_ok": good, "student_kept_at_0": pd.DataFrame({"seed": []})}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_run_agreement_counts_real_swaps_apart_from_ties():
    from ldreg.report import run_agreement

    first = pd.DataFrame({"method": ["identity", "teacher", "student", "peer"], "dice_mean": [0.20, 0.36, 0.28, 0.281]})
    second = pd.DataFrame({"method": ["identity", "teacher", "student", "peer", "extra"],
                           "dice_mean": [0.20, 0.27, 0.30, 0.2985, 0.9]})
    methods, agreement = run_agreement({"a": first, "b": second})
    assert list(methods.method) == ["teacher", "peer", "student", "identity"]  # first run's order; only shared methods
    assert list(methods.rank_a) == [1, 2, 3, 4] and list(methods.rank_b) == [3, 2, 1, 4]
    row = agreement.iloc[0]
    # the teacher fell below the student and the peer (gaps beyond 0.005); peer and student
    # swapped within 0.0015 of each other: a tie
    assert row.swaps_beyond_tie == 2 and row.swaps_within_tie == 1
    assert "teacher / student" in row.swapped and row.max_abs_dice_change == pytest.approx(0.09)
    assert -1 <= row.kendall_tau < 1


def test_each_taught_student_is_tested_against_the_unsupervised_student_of_its_own_steps():
    net = {"kind": "student", "cascades": 2, "width": 16, "depth": 4, "affine": True, "affine_width": 16,
           "flow_level": 2, "flow_scale": 10.0}
    variants = {"unsupervised": {**net, "steps": 600, "targets": "none"},
                "unsupervised_long": {**net, "steps": 1200, "targets": "none"},
                "aldk": {**net, "steps": 600, "targets": "refined", "adversarial": True},
                "aldk_long": {**net, "steps": 1200, "targets": "refined", "adversarial": True},
                "aldk_c1": {**net, "cascades": 1, "steps": 600, "targets": "raw", "adversarial": True}}
    assert unsupervised_counterpart("aldk", variants) == "unsupervised"
    assert unsupervised_counterpart("aldk_long", variants) == "unsupervised_long"
    assert unsupervised_counterpart("aldk_c1", variants) == "unsupervised"  # no 1-cascade one: the fallback
    assert unsupervised_counterpart("unsupervised_long", variants) == "unsupervised"
    evals = _evals([0.02] * 12)
    evals = pd.concat([evals, evals.assign(method=evals.method + "_long",
                                           dice=evals.dice + np.where(evals.method == "student_aldk", -0.05, 0.0))])
    accuracy = pd.DataFrame([{"method": f"student_{n}", "parameters": 1, "dice": "", "dice_mean": 0.3, "hd95_mm": 1.0,
                              "folding_percent": 0.0, "cpu_s_per_pair": 0.1} for n in variants])
    table = ablation_table(accuracy, variants, evals).set_index("variant")
    assert table.loc["aldk_long", "against"] == "unsupervised_long"
    assert table.loc["aldk_long", "dice_diff_vs_unsupervised"] == pytest.approx(-0.03)
    assert table.loc["aldk", "dice_diff_vs_unsupervised"] == pytest.approx(0.02)
    # `all`'s table holds the headline students only: the one paired test is ALDK against its twin
    headline = {k: variants[k] for k in ("unsupervised_long", "aldk_long")}
    table = ablation_table(accuracy, headline, evals).set_index("variant")
    assert table.loc["aldk_long", "against"] == "unsupervised_long" and table.loc["aldk_long", "pairs"] == 12
    assert pd.isna(table.loc["unsupervised_long", "against"])


def test_durations_block_shows_each_asked_for_target_by_its_latest_whole_run():
    from ldreg.docs import durations_block

    cpu = "AMD EPYC [avx2]"
    runs = pd.DataFrame([
        ("2026-12-01 10:00", "all", 57, 2, cpu, 25.0, 27.5),
        ("2026-12-01 11:00", "ablation", 30, 2, cpu, 12.0, 11.7),
        ("2026-12-02 09:00", "all", 3, 2, cpu, 1.0, 0.5),  # a partial rerun of all: fewer jobs
        ("2026-12-02 10:00", "all speed_profile", 35, 2, cpu, 10.0, 11.3),  # --forcerun speed_profile
        ("2026-12-02 11:00", "evaluate_native", 2, 2, cpu, 0.6, 0.7),  # one file asked for
        ("2026-12-03 10:00", "all", 59, 2, cpu, 25.0, 29.3),
        ("2026-12-04 10:00", "all", 59, 2, "Intel Xeon [avx2, avx512]", 29.9, 27.9),  # another CPU: a row of its own
    ], columns=["started", "targets", "jobs", "cores", "cpu", "estimate_min", "took_min"])
    rows = durations_block(runs).splitlines()[2:]
    assert len(rows) == 3
    assert rows[0].startswith("| `ablation` | 30 |") and "11.7 min" in rows[0]
    assert rows[1].startswith("| `all` | 59 |") and "29.3 min" in rows[1] and "2026-12-03 10:00" in rows[1]
    assert "Intel Xeon" in rows[2] and "27.9 min" in rows[2]
