"""What a user sees of a run: the curves in plots/ (each scale on its own axis, a smoothed line over the faint
per-step values) and the progress bar's numbers."""

import json

import pytest

from dspost.plots import assign_axes, families, group_series, plot_run, shown_line, smooth
from dspost.runner import Progress


def grpo_rows(steps: int = 40) -> list[dict]:
    """GRPO-like rows: verdict counts out of 128 beside means, evaluation every 10 steps, phases in seconds."""
    rows = [{"step": 0, "eval/accuracy": 0.55, "sync/parity_max_abs": 3e-5}]
    for s in range(1, steps + 1):
        correct = 60 + (s * 7) % 23
        row = {"step": s, "reward/math/correct": correct, "reward/math/wrong": 128 - correct - s % 3,
               "reward/math/unparsable": s % 3, "reward/math/error": 0, "reward/mean": correct / 128,
               "reward/std": 0.45 + 0.01 * (s % 4), "train/loss": 1e-9 * (-1) ** s, "train/lr": 1e-4 * min(1, s / 10),
               "sync/parity_max_abs": 3e-5 + 1e-6 * (s % 5), "sync/policy_change_max": 0.05 + 0.01 * (s % 3),
               "time/generate": 3.0 + 0.1 * (s % 4), "time/score": 0.05, "time/step": 12.0}
        if s % 10 == 0:
            row["eval/accuracy"] = 0.55 + s / 400
            row["time/eval"] = 20.0
        rows.append(row)
    return rows


def test_counts_and_means_of_one_group_get_different_axes():
    axes = assign_axes(group_series(grpo_rows())["reward"])
    assert axes == [["reward/math/correct", "reward/math/error", "reward/math/unparsable", "reward/math/wrong"],
                    ["reward/mean", "reward/std"]]


def test_curves_more_than_tenfold_apart_get_their_own_axis_and_seconds_share_one():
    groups = group_series(grpo_rows())
    assert assign_axes(groups["sync"]) == [["sync/policy_change_max"], ["sync/parity_max_abs"]]
    assert assign_axes(groups["train"]) == [["train/lr"], ["train/loss"]]
    # phases of a step from 0.05 s to 20 s: one axis (drawn on a log scale), to compare them
    assert assign_axes(groups["time"]) == [["time/eval", "time/generate", "time/score", "time/step"]]


def test_smoothing_is_a_debiased_exponential_average():
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # no pull towards 0 at the start
    assert smooth([0.0, 1.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75, 0.75 / 0.875])


def test_noisy_curves_are_smoothed_and_schedules_are_not():
    noisy = [0.5 + 0.2 * (-1) ** i for i in range(100)]
    line = shown_line(noisy)
    assert line is not noisy and max(line[10:]) - min(line[10:]) < 0.1  # the +-0.2 zigzag averaged out
    schedule = [min(1.0, i / 20) for i in range(100)]
    assert shown_line(schedule) is schedule  # a warm-up is drawn as it is, not delayed
    few = [0.1, 0.9, 0.2]  # evaluations: too few points to smooth
    assert shown_line(few) is few


def test_missing_steps_and_non_finite_values_are_left_out():
    rows = [{"step": 1, "train/loss": 2.0, "eval/accuracy": 0.5, "note": "text", "flag": True},
            {"step": 2, "train/loss": float("nan")},
            {"step": 3, "train/loss": float("inf"), "eval/accuracy": 0.6},
            {"step": 4, "train/loss": 1.5}]
    groups = group_series(rows)
    assert groups["train"]["train/loss"] == ([1, 4], [2.0, 1.5])
    assert groups["eval"]["eval/accuracy"] == ([1, 3], [0.5, 0.6])
    assert set(groups) == {"train", "eval"}


def test_a_family_of_many_curves_gets_one_legend_entry():
    keys = ["moe/load_max_min_ratio"] + [f"moe/layer{i}/load_max_min_ratio" for i in range(20)]
    single, big = families(keys)
    assert single == ["moe/load_max_min_ratio"]
    assert list(big) == ["moe/layer#/load_max_min_ratio"] and big["moe/layer#/load_max_min_ratio"][:3] == \
        ["moe/layer0/load_max_min_ratio", "moe/layer1/load_max_min_ratio", "moe/layer2/load_max_min_ratio"]


def test_plot_run_writes_one_png_per_group(tmp_path):
    rows = grpo_rows() + [{"step": 41, "reward/mean": float("nan"), "final/accuracy": 0.7}]
    # json writes NaN as a token read back as a float
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["eval.png", "final.png", "reward.png", "sync.png", "time.png",
                                               "train.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)  # no temporaries


def test_a_one_step_run_has_no_curves(tmp_path):
    """eval_rm logs its summary once, at step 0, and draws its own plots/eval_rm.png: left alone."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_rm/accuracy": 0.7, "perf/pairs_per_s": 3.0}))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "eval_rm.png").write_bytes(b"report")
    assert plot_run(tmp_path) == []
    assert (tmp_path / "plots" / "eval_rm.png").read_bytes() == b"report"


def postfix(rows: list[dict]) -> str:
    p = Progress("test")
    try:
        for row in rows:
            p(row["step"], 100, {k: v for k, v in row.items() if k != "step"})
        return p.bar.postfix
    finally:
        p.close()


def test_progress_shows_reward_accuracy_kl_entropy_for_rl_and_keeps_the_last_evaluation():
    row = {"reward/mean": 0.484, "reward/math/correct": 62, "accuracy": 0.484, "train/loss": 3.7e-9,
           "train/kl": 0.00213, "entropy": 1.234, "time/step": 9.0}
    shown = postfix([{"step": 10, **row, "eval/accuracy": 0.6123}, {"step": 11, **row, "reward/mean": 0.5}])
    assert shown == "reward=0.5, acc=0.484, eval_acc=0.612, kl=0.00213, entropy=1.23"


def test_progress_shows_loss_and_evaluation_for_sft():
    rows = [{"step": 1, "train/loss": 2.345, "train/lm_loss": 2.1, "train/lr": 1e-4},
            {"step": 2, "train/loss": 2.2, "eval/loss": 2.5, "eval/accuracy": 0.4}, {"step": 3, "train/loss": 2.1}]
    assert postfix(rows) == "loss=2.1, eval_loss=2.5, eval_acc=0.4"
