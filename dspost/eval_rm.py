"""`kind: eval_rm` / `dspost eval-rm`: a critic on held-out preference pairs, and the meta-critic's verdicts.

Writes into the run directory: `report.json` (the contract: n, accuracy, accuracy_ci, ece, length_bias,
failed, ... ), `report.md` (the same for people), `plots/` (reliability diagram, accuracy by slice and
length, score against length) and, with a reference set (the shipped one by default), `meta_critic.json`.
Every number is a function of the critic, the data and `seed`: the same run twice gives the same report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dspost.config import EvalRMRecipe
from dspost.rundir import RunDir, write_text_atomic


def load_eval_pairs(stage: EvalRMRecipe):
    from dspost.data.pairs import load_pairs, read_pairs

    d = stage.data
    if d.path is None:  # the synthetic math pairs' held-out split
        pairs, bad = load_pairs(d)[1], None
    else:
        pairs, bad = read_pairs(d.path, d.format, d.columns)
        bad.check(d.max_bad_fraction, d.path)
    return pairs[: stage.limit] if stage.limit is not None else pairs, bad


def vllm_engine(path: str, max_model_len: int):
    """The engine a `judge:DIR` critic is served by: vLLM in this process (rewards/ does not import rollout/)."""
    from dspost.rollout.engine import VLLMEngine

    return VLLMEngine(path, max_model_len=max_model_len)


def run_eval_rm(stage: EvalRMRecipe, run: RunDir, model_path: Path | None = None, progress=None) -> Path:
    from tqdm import tqdm

    from dspost.rewards.critics import make_critic
    from dspost.rewards.judging import category_metrics, pair_metrics
    from dspost.rewards.meta_critic import assess, load_reference

    pairs, bad = load_eval_pairs(stage)
    run.log.info("eval-rm: %d pairs from %s; bad rows: %s", len(pairs), stage.data.path or "synthetic math pairs",
                 bad.summary() if bad else "none")
    t0 = time.perf_counter()
    with make_critic(stage.critic, batch_size=stage.batch_size, max_length=stage.max_length,
                     judge_engine=vllm_engine) as critic:
        with tqdm(total=len(pairs), desc=f"eval-rm {critic.name}", unit="pair", dynamic_ncols=True) as bar:
            judgments = critic.compare(pairs, progress=bar.update)
        seconds = time.perf_counter() - t0
        report = {"critic": critic.name, "data": stage.data.path or "synthetic math pairs",
                  **pair_metrics(pairs, judgments, stage.bootstrap, stage.seed),
                  "per_category": category_metrics(pairs, judgments, stage.bootstrap, stage.seed),
                  "bad_rows": dict(bad.reasons) if bad else {}, "truncated": getattr(critic, "truncated", 0)}
        meta = None
        if stage.meta_critic:
            meta = assess(critic, load_reference(stage.reference), seed=stage.seed)
    write_text_atomic(run.root / "report.json", json.dumps(report, indent=2))
    write_text_atomic(run.root / "report.md", markdown(report, meta))
    if meta is not None:
        write_text_atomic(run.root / "meta_critic.json", json.dumps(meta, indent=2))
    plot_report(run.root / "plots", pairs, judgments, report)
    run.log_metrics(0, {"eval_rm/accuracy": report["accuracy"], "eval_rm/failed": report["failed"],
                        "perf/pairs_per_s": len(pairs) / seconds})
    run.log.info("eval-rm: accuracy %.4f (95%% CI %s) over %d pairs in %.1f s", report["accuracy"],
                 report["accuracy_ci"], len(pairs), seconds)
    return run.root


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(report: dict, meta: dict | None) -> str:
    lb = report["length_bias"]
    lines = [
        f"# Critic report: {report['critic']}", "", f"Data: `{report['data']}` ({report['n']} pairs)", "",
        "| metric | value |", "|---|---|",
        f"| accuracy (ties and failures wrong) | {_fmt(report['accuracy'])} |",
        f"| 95% bootstrap interval | {_fmt(report['accuracy_ci'][0])} - {_fmt(report['accuracy_ci'][1])} |",
        f"| ties / failed | {report['ties']} / {report['failed']} |",
        f"| expected calibration error | {_fmt(report['ece'])} |",
        f"| accuracy when chosen is longer ({lb['n_chosen_longer']}) | {_fmt(lb['acc_when_chosen_longer'])} |",
        f"| accuracy when chosen is shorter ({lb['n_chosen_shorter']}) | {_fmt(lb['acc_when_chosen_shorter'])} |",
        f"| Spearman(score, length) | {_fmt(lb['score_length_spearman'])} |",
        f"| length-only baseline accuracy | {_fmt(lb['length_baseline_accuracy'])} |",
    ]
    if "position_bias" in report:
        pb = report["position_bias"]
        lines += [f"| order consistency (both orders parsed: {pb['n_both_orders']}) | {_fmt(pb['consistency'])} |",
                  f"| picks the first-shown output | {_fmt(pb['first_position_rate'])} |",
                  f"| unparsable verdicts | {pb['unparsable']} |"]
    if report["per_category"]:
        lines += ["", "| category | n | accuracy | 95% interval |", "|---|---|---|---|"]
        lines += [f"| {c} | {m['n']} | {_fmt(m['accuracy'])} | {_fmt(m['accuracy_ci'][0])} - {_fmt(m['accuracy_ci'][1])} |"
                  for c, m in report["per_category"].items()]
    if meta is not None:
        lines += ["", f"## Meta-critic ({meta['n']} reference pairs): "
                  + ("FLAGGED" if meta["flagged"] else "no bias found"), "",
                  "| slice | verdict | agreement | evidence |", "|---|---|---|---|"]
        lines += [f"| {name} | {s['verdict']} | {_fmt(s['agreement'])} | {s['evidence']} |" for name, s in meta["slices"].items()]
        gap = meta["length_bias"]
        lines += ["", f"Length: {gap['verdict']} (accuracy gold-longer minus gold-shorter {_fmt(gap['gap'])}, "
                  f"95% interval {_fmt(gap['gap_ci'][0])} - {_fmt(gap['gap_ci'][1])})."]
    return "\n".join(lines) + "\n"


def plot_report(out_dir: Path, pairs, judgments, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    bins = report["calibration_bins"]
    axes[0].plot([0.5, 1], [0.5, 1], "k--", lw=0.8, label="perfect")
    if bins:
        axes[0].plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=f"ECE {_fmt(report['ece'])}")
    axes[0].set(title="reliability", xlabel="confidence sigmoid(|s_c - s_r|)", ylabel="accuracy")
    axes[0].legend(fontsize=8)
    lb = report["length_bias"]
    names = ["all", "chosen longer", "chosen shorter", "length baseline"] + list(report["per_category"])
    values = [report["accuracy"], lb["acc_when_chosen_longer"], lb["acc_when_chosen_shorter"],
              lb["length_baseline_accuracy"]] + [m["accuracy"] for m in report["per_category"].values()]
    axes[1].barh(names, [v if v is not None else 0 for v in values])
    axes[1].set(title="accuracy", xlim=(0, 1))
    axes[1].tick_params(axis="y", labelsize=7)
    scored = [(j, p) for j, p in zip(judgments, pairs) if j.score_chosen is not None]
    if scored:
        axes[2].scatter([len(p.chosen) for _, p in scored], [j.score_chosen for j, _ in scored], s=6, label="chosen")
        axes[2].scatter([len(p.rejected) for _, p in scored], [j.score_rejected for j, _ in scored], s=6, label="rejected")
        axes[2].set_xscale("log")
        axes[2].legend(fontsize=8)
    axes[2].set(title=f"score vs length (Spearman {_fmt(lb['score_length_spearman'])})", xlabel="characters", ylabel="score")
    fig.tight_layout()
    path = out_dir / "eval_rm.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
