"""The pipeline report (contract): `pipeline_report.json` and `pipeline_report.md` in the pipeline's output_dir,
written by its `evaluate` stage.

    {"stages": [{"name", "kind", "checkpoint", "eval": {"<domain>": accuracy}, "trainer_tokens", "seconds",
                 "started_from", "domains", "metrics"}, ...],
     "summary": {"domains", "specialists": {"<domain>": stage}, "compared": [...], "evaluation": {...}}}

`stages`: the row `start` (kind `start`: the checkpoint the pipeline's first model stage started from; no trainer
tokens or seconds, `null`), then each evaluated stage in pipeline order. `eval[d]` is `eval/<d>/accuracy` under the
evaluate stage's decoding (`metrics` holds every number it logged, greedy accuracy beside sampled pass@1 included);
`trainer_tokens` the sum of the stage's `train/tokens` over its metrics.jsonl (SFT: the tokens of its batches;
GRPO and OPD: the response tokens trained on); `seconds` its wall seconds over all attempts, from its `stage.json`
(engine and actor start-up included); `started_from` the row it started from (`model.from_stage`, or `start`),
`domains` its data sources.

`summary.specialists`: for each domain, the first GRPO stage whose data sources are that domain alone.
`summary.compared`: every other evaluated GRPO or OPD stage (an OPD student, a mixed-RL run) against them:
`gain_kept[d] = (acc - base) / (specialist - base)`, where `base` is the accuracy of the row the domain's
specialist started from (its gain is over its own start, the SFT checkpoint in the V4 pipeline): null when the
specialist gained nothing (or was not evaluated); and `compute_vs_specialists`: its trainer tokens and seconds as a
fraction of the specialists' summed ones. `summary.evaluation`: the evaluate stage's decoding, held-out sizes and
the seconds each row took (engine started, or weights pushed into the running one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspost.config import EvaluateRecipe, StageRecipe
from dspost.rundir import StageRecord, read_metrics, write_text_atomic

if TYPE_CHECKING:
    from dspost.runner import PipelineState

START_ROW = "start"
REPORT_JSON, REPORT_MD = "pipeline_report.json", "pipeline_report.md"


def trainer_tokens(stage: StageRecipe) -> float:
    """Sum of `train/tokens` over the stage's metrics.jsonl (0 for a stage that logs none)."""
    return float(sum(r.get("train/tokens", 0.0) or 0.0 for r in read_metrics(stage.output_dir)))


def stage_seconds(stage: StageRecipe) -> float | None:
    record = StageRecord.read(stage.output_dir)
    return round(record.seconds, 1) if record is not None else None


def source_names(stage: StageRecipe) -> list[str]:
    data = getattr(stage, "data", None)
    return [s.name for s in data.sources] if data is not None else []


def started_from(name: str, pipeline: PipelineState, first_start: Path | None) -> str | None:
    """The row a stage started from: its `model.from_stage`, `start` when it started where the first model stage
    did, else its start checkpoint's path."""
    stage = pipeline.stages[name]
    model = getattr(stage, "model", None)
    if model is not None and model.from_stage:
        return model.from_stage
    start = pipeline.starts.get(name)
    if start is None:
        return None
    return START_ROW if first_start is not None and Path(start) == Path(first_start) else str(start)


def build_report(stage: EvaluateRecipe, pipeline: PipelineState, results: dict[str, dict]) -> dict[str, Any]:
    """The report of the graded rows `results` (row -> evaluation result, in row order) of this pipeline."""
    domains = [s.name for s in stage.data.sources]
    first_start = Path(results[START_ROW]["checkpoint"]) if START_ROW in results else None
    rows = []
    for name, result in results.items():
        row = {"name": name, "checkpoint": result["checkpoint"], "eval": {d: result["eval"].get(d) for d in domains}}
        if name == START_ROW:
            row.update(kind="start", trainer_tokens=None, seconds=None, started_from=None, domains=[])
        else:
            st = pipeline.stages[name]
            row.update(kind=st.kind, trainer_tokens=trainer_tokens(st), seconds=stage_seconds(st),
                       started_from=started_from(name, pipeline, first_start), domains=source_names(st))
        row["metrics"] = result["metrics"]
        rows.append(row)
    specialists = find_specialists(pipeline, domains)
    summary = {"domains": domains, "specialists": specialists,
               "compared": compare(rows, specialists, pipeline),
               "evaluation": {"decoding": stage.eval.model_dump(mode="json"),
                              "seconds_per_row": {n: r.get("seconds") for n, r in results.items()},
                              "engine_per_row": {n: r.get("engine") for n, r in results.items()}}}
    return {"stages": rows, "summary": summary}


def find_specialists(pipeline: PipelineState, domains: list[str]) -> dict[str, str]:
    """Domain -> the first GRPO stage trained on that domain's source alone."""
    out: dict[str, str] = {}
    for name, st in pipeline.stages.items():
        names = source_names(st)
        if st.kind == "grpo" and len(names) == 1 and names[0] in domains:
            out.setdefault(names[0], name)
    return out


def compare(rows: list[dict], specialists: dict[str, str], pipeline: PipelineState) -> list[dict]:
    """Each evaluated GRPO/OPD stage that is not a specialist, against the specialists: the share of each one's gain
    it keeps, and its compute as a fraction of theirs."""
    by_name = {r["name"]: r for r in rows}
    chosen = set(specialists.values())
    spec_stages = [pipeline.stages[n] for n in chosen]
    spec_tokens = sum(trainer_tokens(s) for s in spec_stages)
    spec_seconds = sum(stage_seconds(s) or 0.0 for s in spec_stages)
    out = []
    for row in rows:
        if row["kind"] not in ("grpo", "opd") or row["name"] in chosen:
            continue
        gains, kept = {}, {}
        for d, spec in specialists.items():
            s_row = by_name.get(spec)
            base_row = by_name.get(s_row["started_from"]) if s_row is not None else None
            acc, s_acc = row["eval"].get(d), s_row["eval"].get(d) if s_row else None
            base = base_row["eval"].get(d) if base_row else None
            gains[d] = {"base_row": base_row["name"] if base_row else None, "base": base, "specialist": s_acc,
                        "acc": acc}
            ok = None not in (acc, s_acc, base) and s_acc > base
            kept[d] = round((acc - base) / (s_acc - base), 4) if ok else None
        compute = {"trainer_tokens": _fraction(row["trainer_tokens"], spec_tokens),
                   "seconds": _fraction(row["seconds"], spec_seconds)}
        out.append({"name": row["name"], "kind": row["kind"], "gain_kept": kept, "gains": gains,
                    "compute_vs_specialists": compute})
    return out


def _fraction(x: float | None, total: float) -> float | None:
    return round(x / total, 4) if x is not None and total else None


def write_report(report: dict[str, Any], root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    written = [root / REPORT_JSON, root / REPORT_MD]
    write_text_atomic(written[0], json.dumps(report, indent=1) + "\n")
    write_text_atomic(written[1], markdown(report))
    return written


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table per stage, then the comparisons against the specialists."""
    summary = report["summary"]
    domains = summary["domains"]
    lines = ["# Pipeline report", "", "Held-out accuracy per domain (`eval/<domain>/accuracy`), trainer tokens and wall "
             "seconds per stage.", "",
             "| stage | kind | " + " | ".join(domains) + " | trainer tokens | seconds | started from | checkpoint |",
             "|---|---|" + "---|" * len(domains) + "---|---|---|---|"]
    for r in report["stages"]:
        accs = " | ".join(_num(r["eval"].get(d)) for d in domains)
        lines.append(f"| {r['name']} | {r['kind']} | {accs} | {_num(r['trainer_tokens'], '{:,.0f}')} | "
                     f"{_num(r['seconds'], '{:.0f}')} | {r['started_from'] or ''} | `{r['checkpoint']}` |")
    lines += ["", "Specialists: " + (", ".join(f"{d}: {s}" for d, s in summary["specialists"].items()) or "none"), ""]
    for c in summary["compared"]:
        parts = []
        for d, g in c["gains"].items():
            kept = c["gain_kept"][d]
            parts.append(f"{d} {_num(kept, '{:.0%}')} of {summary['specialists'][d]}'s gain "
                         f"({g['base_row']} {_num(g['base'])} -> specialist {_num(g['specialist'])}, "
                         f"{c['name']} {_num(g['acc'])})")
        comp = c["compute_vs_specialists"]
        lines.append(f"- **{c['name']}** ({c['kind']}) keeps " + ("; ".join(parts) or "nothing to compare") +
                     f". Compute: {_num(comp['trainer_tokens'], '{:.0%}')} of the specialists' trainer tokens, "
                     f"{_num(comp['seconds'], '{:.0%}')} of their seconds.")
    ev = summary["evaluation"]
    lines += ["", "Evaluation seconds per row: " + ", ".join(f"{n} {_num(s, '{:.1f}')} ({ev['engine_per_row'][n]})"
                                                            for n, s in ev["seconds_per_row"].items()), ""]
    return "\n".join(lines)
