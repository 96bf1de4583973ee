"""The pipeline machinery: SFT -> GRPO -> evaluate end to end (real vLLM and Ray) with its report; a finished
pipeline re-run with resume=true skips every stage; a stage killed midway resumes under the pipeline's resume; a
bad later stage stops the pipeline before its first stage starts; the report's derived numbers by hand; the
tiny-dense preset."""

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from dspost.cli import main
from dspost.rundir import read_metrics

MATH = {"name": "math", "synthetic": "math", "num_train": 64, "num_eval": 8, "difficulty": [1]}
# SFT grades its held-out answers with our model's own greedy decoding, 0.26 s a token for 8 prompts here: 2 prompts.
SFT = {"kind": "sft", "name": "sft", "model": {"preset": "tiny-dense"}, "data": {"sources": [{**MATH, "num_eval": 2}]},
       "trainer": {"max_steps": 2, "batch_size": 4, "eval_every": 100, "save_every": 2, "warmup_steps": 0}}
# Eager engines start in about half the time of compiled ones (36 s against 69 s here); their logprobs drift from the
# trainer's a little, hence the looser parity thresholds.
GRPO = {"kind": "grpo", "name": "grpo_math", "model": {"from_stage": "sft", "bias_update_speed": 0.0},
        "data": {"sources": [MATH]}, "sync": {"parity_threshold": 0.5},
        # The SFT'd model solves nothing yet: a length critic gives the groups advantages, so the weights move.
        "rewards": {"terms": [{"name": "math"}, {"name": "critic:length", "weight": 0.01}]},
        "trainer": {"max_steps": 2, "eval_every": 2, "save_every": 2, "lr": 1e-3, "num_cpus_per_worker": 1},
        "rollout": {"prompts_per_step": 4, "n": 2, "max_tokens": 16, "kv_cache_gb": 1, "num_cpus_per_worker": 1,
                    "enforce_eager": True}}
# The student distils the specialist into the SFT checkpoint (the report compares it with the specialist).
OPD = {"kind": "opd", "name": "student", "model": {"from_stage": "sft", "bias_update_speed": 0.0},
       "data": {"sources": [MATH]}, "sync": {"parity_threshold": 0.5},
       "teachers": [{"from_stage": "grpo_math", "domains": ["math"]}],
       "rewards": {"terms": [{"name": "math", "weight": 0}]},
       "trainer": {"max_steps": 2, "eval_every": 2, "save_every": 2, "lr": 1e-3, "num_cpus_per_worker": 1},
       "rollout": {"prompts_per_step": 4, "n": 2, "max_tokens": 16, "kv_cache_gb": 1, "num_cpus_per_worker": 1,
                   "enforce_eager": True}}
EVALUATE = {"kind": "evaluate", "name": "report", "data": {"sources": [{**MATH, "num_train": 1}]},
            "parity_threshold": 0.5,
            "rollout": {"max_tokens": 16, "kv_cache_gb": 1, "num_cpus_per_worker": 1, "enforce_eager": True}}


def write_pipeline(path: Path, *stages: dict, **top) -> Path:
    path.write_text(yaml.safe_dump({"kind": "pipeline", **top, "stages": list(stages)}, sort_keys=False))
    return path


def record(root: Path) -> dict:
    return json.loads((root / "stage.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """SFT (2 steps, tiny-dense from random init) -> GRPO (2 steps) -> OPD of the GRPO stage into the SFT checkpoint
    (2 steps) -> evaluate, run once on a local Ray cluster."""
    pytest.importorskip("vllm")
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    if "DSPOST_CACHE" not in os.environ:  # module fixtures run before the autouse cache isolation
        mp.setenv("DSPOST_CACHE", str(tmp_path_factory.getbasetemp() / "dspost-cache"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # shared by the stages
    root = tmp_path_factory.mktemp("pipeline")
    recipe = write_pipeline(root / "v.yaml", SFT, GRPO, OPD, EVALUATE, output_dir=str(root / "out"))
    t = time.perf_counter()
    assert main(["run", str(recipe)]) == 0
    print(f"pipeline: {time.perf_counter() - t:.0f} s")
    yield recipe, root / "out"
    ray.shutdown()
    mp.undo()


@pytest.mark.vllm
def test_the_pipeline_runs_end_to_end_and_writes_its_report(finished):
    _, out = finished
    report = json.loads((out / "pipeline_report.json").read_text())
    rows = {r["name"]: r for r in report["stages"]}
    assert list(rows) == ["start", "sft", "grpo_math", "student"]
    for r in report["stages"]:
        assert {"name", "kind", "checkpoint", "eval", "trainer_tokens", "seconds"} <= set(r)
        assert 0.0 <= r["eval"]["math"] <= 1.0 and Path(r["checkpoint"], "config.json").is_file()
    assert rows["start"]["kind"] == "start" and Path(rows["start"]["checkpoint"]).name.startswith("tiny-dense-init")
    assert rows["sft"]["checkpoint"] == str(out / "sft" / "checkpoints" / "step_2")
    assert rows["grpo_math"]["checkpoint"] == str(out / "grpo_math" / "checkpoints" / "step_2")
    assert rows["sft"]["started_from"] == "start"
    assert rows["grpo_math"]["started_from"] == rows["student"]["started_from"] == "sft"
    for name in ("sft", "grpo_math", "student"):  # compute: the sum of the stage's own train/tokens, its recorded wall time
        assert rows[name]["trainer_tokens"] == sum(m.get("train/tokens", 0) for m in read_metrics(out / name)) > 0
        assert rows[name]["seconds"] == pytest.approx(record(out / name)["seconds"], abs=0.1)
        assert rows[name]["seconds"] > (1 if name != "sft" else 0)  # 2 tiny SFT steps take under a second
    assert report["summary"]["specialists"] == {"math": "grpo_math"}
    [student] = report["summary"]["compared"]  # the OPD student against the specialist, on gain and compute
    assert student["name"] == "student" and set(student["gain_kept"]) == {"math"}
    tokens = student["compute_vs_specialists"]["trainer_tokens"]
    assert tokens == pytest.approx(rows["student"]["trainer_tokens"] / rows["grpo_math"]["trainer_tokens"], abs=1e-4)
    assert "opd/math/reverse_kl" in read_metrics(out / "student")[1]
    # One engine served the three checkpoints (same architecture and tokenizer): the weights of the second and third
    # were pushed into it, and the engine then gave our model's logprobs on them.
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())["rows"]
    assert [evaluation[r]["engine"] for r in rows] == ["started", "pushed", "pushed", "pushed"]
    for r in ("sft", "grpo_math", "student"):  # the push moved the engine to the checkpoint: far more than engine and ours differ
        assert evaluation[r]["change_max_abs"] > 10 * evaluation[r]["parity_max_abs"], evaluation[r]
    md = (out / "pipeline_report.md").read_text()
    assert "| grpo_math | grpo |" in md and "Specialists: math: grpo_math" in md


@pytest.mark.vllm
def test_resume_on_a_finished_pipeline_skips_every_stage(finished, capsys):
    recipe, out = finished
    watched = [out / s / f for s in ("sft", "grpo_math", "student", "report") for f in ("stage.json", "metrics.jsonl",
                                                                              "evaluation.json")
               if (out / s / f).exists()] + [out / "pipeline_report.json"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    capsys.readouterr()
    t = time.perf_counter()
    assert main(["run", str(recipe), "resume=true"]) == 0
    seconds = time.perf_counter() - t
    printed = capsys.readouterr().out
    for stage in ("sft", "grpo_math", "student", "report"):
        assert f"{stage}: finished in an earlier run" in printed, printed
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched} == before  # nothing ran, nothing rewritten
    assert seconds < 20, seconds  # no engine, actor or trainer started (a GRPO stage alone starts in ~60 s)


@pytest.mark.vllm
def test_a_finished_stage_whose_recipe_changed_is_refused_not_skipped(finished, capsys):
    recipe, _ = finished
    assert main(["run", str(recipe), "resume=true", "stages.1.trainer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changed trainer.lr from 0.001 to 0.5" in err, err


@pytest.mark.vllm
def test_an_evaluation_killed_midway_grades_only_the_rows_it_had_not(finished, capsys):
    recipe, out = finished
    results = out / "report" / "evaluation.json"
    rows = json.loads(results.read_text())["rows"]
    results.write_text(json.dumps({"rows": {k: v for k, v in rows.items() if k != "grpo_math"}}))  # killed before it
    stage = json.loads((out / "report" / "stage.json").read_text())
    (out / "report" / "stage.json").write_text(json.dumps({**stage, "finished": False}))
    assert main(["run", str(recipe), "resume=true"]) == 0
    assert "report: done" in capsys.readouterr().out
    again = json.loads(results.read_text())["rows"]
    assert {k: again[k] for k in ("start", "sft")} == {k: rows[k] for k in ("start", "sft")}  # kept, not regraded
    assert again["grpo_math"]["engine"] == "started" and again["grpo_math"]["eval"] == rows["grpo_math"]["eval"]
    assert len(json.loads((out / "report" / "stage.json").read_text())["attempts"]) == 2


class Killed(BaseException):
    """Stands for a kill: nothing of the runner handles it."""


def test_a_stage_killed_midway_resumes_under_the_pipelines_resume(tmp_path, monkeypatch, capsys):
    from dspost.runner import Progress

    sft = {**SFT, "trainer": {**SFT["trainer"], "max_steps": 4}}
    recipe = write_pipeline(tmp_path / "p.yaml", sft, output_dir=str(tmp_path / "out"))
    call = Progress.__call__

    def kill_at_step_3(self, step, total, metrics):
        call(self, step, total, metrics)
        if step == 3:  # after step 3 is logged, before step 4 saves
            raise Killed

    monkeypatch.setattr(Progress, "__call__", kill_at_step_3)
    with pytest.raises(Killed):
        main(["run", str(recipe)])
    run = tmp_path / "out" / "sft"
    killed = read_metrics(run)
    assert [r["step"] for r in killed] == [1, 2, 3] and (run / "checkpoints" / "latest").read_text() == "step_2\n"
    assert not record(run)["finished"] and record(run)["attempts"][0]["seconds"] > 0
    monkeypatch.setattr(Progress, "__call__", call)
    # Without resume the run directory is refused; the pipeline's resume=true reaches the stage, which continues
    # from step 2 (step 3 of the killed attempt, unsaved, is done again).
    assert main(["run", str(recipe)]) == 2 and "set resume=true" in capsys.readouterr().err
    assert main(["run", str(recipe), "resume=true"]) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == killed[:2]  # steps 1-2 were not run again
    assert rows[2]["train/loss"] == pytest.approx(killed[2]["train/loss"], abs=1e-6)  # step 3 again, the same
    rec = record(run)
    assert rec["finished"] and len(rec["attempts"]) == 2 and rec["final"] == str(run / "checkpoints" / "step_4")
    assert rec["seconds"] == pytest.approx(sum(a["seconds"] for a in rec["attempts"]), abs=1e-2)


BAD_LATER_STAGES = [  # (id, the stage(s) after the pipeline's first, what the error line says)
    ("model without config.json", {**GRPO, "model": {"path": "noconfig"}},
     "stages.1.model.path: noconfig: no config.json"),
    ("unknown reward", {**GRPO, "rewards": {"terms": [{"name": "mth"}]}},
     "stages.1.rewards.terms.0.name: unknown reward 'mth'"),
    ("evaluates no stage", {**EVALUATE, "stages": ["report0"]},
     "stages.1.stages.0: 'report0' is not an earlier model stage"),
    ("evaluates an evaluation", [{**EVALUATE, "name": "r1"}, {**EVALUATE, "name": "r2", "stages": ["sft", "r1"]}],
     "stages.2.stages.1: 'r1' is not an earlier model stage"),
    ("starts from an evaluation", [{**EVALUATE, "name": "r1"}, {**GRPO, "model": {"from_stage": "r1"}}],
     "stages.2.model.from_stage: 'r1' is an evaluation stage"),
    ("unknown verifier", {**EVALUATE, "rewards": {"terms": [{"name": "math", "domains": ["math"]}, {"name": "mth"}]}},
     "stages.1.rewards.terms.1.name: unknown reward 'mth'"),
    ("unknown domain", {**EVALUATE, "rewards": {"terms": [{"name": "format", "domains": ["nope"]}]}},
     "stages.1.rewards.terms.0.domains: 'nope' is not a data source"),
    ("domain without verifier", {**EVALUATE, "rewards": {"terms": [{"name": "math", "domains": ["math"]}]},
                                 "data": {"sources": [MATH, {"name": "if", "synthetic": "instruct"}]}},
     "stages.1.rewards.terms: domain 'if' has no verifier"),
    ("sampling set in rollout", {**EVALUATE, "rollout": {"n": 4}},
     "stages.1.rollout.n: an evaluate stage decodes as `eval` says"),
    ("critic as verifier", {**EVALUATE, "rewards": {"terms": [{"name": "critic:length"}]}},
     "stages.1.rewards.terms.0.name: an evaluate stage grades with rule verifiers"),
]


@pytest.mark.parametrize("bad,expect", [b[1:] for b in BAD_LATER_STAGES], ids=[b[0] for b in BAD_LATER_STAGES])
def test_a_bad_later_stage_stops_the_pipeline_before_its_first_stage_starts(tmp_path, monkeypatch, capsys, bad,
                                                                            expect):
    (tmp_path / "noconfig").mkdir()
    monkeypatch.chdir(tmp_path)
    recipe = write_pipeline(tmp_path / "p.yaml", SFT, *(bad if isinstance(bad, list) else [bad]),
                            output_dir=str(tmp_path / "out"))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists()  # the SFT stage never started


def test_an_evaluate_stage_runs_inside_a_pipeline_only(tmp_path, capsys):
    recipe = tmp_path / "e.yaml"
    recipe.write_text(yaml.safe_dump(EVALUATE))
    assert main(["run", str(recipe)]) == 2
    assert "kind: an evaluate stage grades the checkpoints of earlier stages" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the report
def fake_stage(root: Path, recipe: dict, tokens: list[float], seconds: list[float]):
    """A stage's recipe and the run directory a real run would leave: metrics.jsonl and stage.json."""
    from dspost.recipe import validate_recipe

    stage = validate_recipe({**recipe, "output_dir": str(root / recipe["name"])})
    out = Path(stage.output_dir)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "train/tokens": t}) + "\n"
                                               for i, t in enumerate(tokens)))
    (out / "stage.json").write_text(json.dumps({"attempts": [{"seconds": s} for s in seconds], "finished": True}))
    return stage


def test_the_report_compares_each_student_with_the_specialists_by_hand(tmp_path):
    from dspost.config import EvaluateRecipe
    from dspost.report import build_report, markdown
    from dspost.runner import PipelineState

    src = lambda name: {"name": name, "synthetic": "math" if name == "math" else "instruct"}  # noqa: E731
    both = {"sources": [src("math"), src("if")]}
    stages = {
        "sft": fake_stage(tmp_path, {"kind": "sft", "name": "sft", "data": both}, [100.0], [10.0]),
        "rl_math": fake_stage(tmp_path, {"kind": "grpo", "name": "rl_math", "model": {"from_stage": "sft"},
                                         "data": {"sources": [src("math")]}}, [300.0, 300.0], [50.0, 10.0]),
        "rl_if": fake_stage(tmp_path, {"kind": "grpo", "name": "rl_if", "model": {"from_stage": "sft"},
                                       "data": {"sources": [src("if")]}}, [200.0, 200.0], [40.0]),
        "opd": fake_stage(tmp_path, {"kind": "opd", "name": "opd", "model": {"from_stage": "sft"}, "data": both,
                                     "teachers": [{"from_stage": "rl_math"}]}, [100.0, 100.0], [20.0]),
        "mixed": fake_stage(tmp_path, {"kind": "grpo", "name": "mixed", "model": {"from_stage": "sft"}, "data": both},
                            [1000.0], [100.0]),
    }
    pipeline = PipelineState(tmp_path, stages, {n: tmp_path / n / "ckpt" for n in stages},
                             {"sft": tmp_path / "init", **{n: tmp_path / "sft" / "ckpt" for n in stages if n != "sft"}})
    acc = {"start": (0.0, 0.0), "sft": (0.5, 0.2), "rl_math": (0.7, 0.25), "rl_if": (0.45, 0.6), "opd": (0.68, 0.5),
           "mixed": (0.6, 0.2)}
    results = {n: {"checkpoint": str(tmp_path / ("init" if n == "start" else n)), "metrics": {"eval/math/accuracy": m},
                   "eval": {"math": m, "if": i}, "seconds": 1.0, "engine": "pushed"} for n, (m, i) in acc.items()}
    ev = EvaluateRecipe(kind="evaluate", data=both, rewards={"terms": [{"name": "math", "domains": ["math"]},
                                                                       {"name": "instruct", "domains": ["if"]}]})
    report = build_report(ev, pipeline, results)
    rows = {r["name"]: r for r in report["stages"]}
    assert rows["start"]["trainer_tokens"] is None and rows["rl_math"]["trainer_tokens"] == 600.0
    assert rows["rl_math"]["seconds"] == 60.0 and rows["sft"]["started_from"] == "start"
    summary = report["summary"]
    assert summary["specialists"] == {"math": "rl_math", "if": "rl_if"}
    compared = {c["name"]: c for c in summary["compared"]}
    assert set(compared) == {"opd", "mixed"}
    # (student - sft) / (specialist - sft), per domain: the specialists' gains are over their start, the SFT row.
    assert compared["opd"]["gain_kept"] == {"math": pytest.approx((0.68 - 0.5) / (0.7 - 0.5)),
                                            "if": pytest.approx((0.5 - 0.2) / (0.6 - 0.2))}
    assert compared["mixed"]["gain_kept"] == {"math": pytest.approx(0.5), "if": pytest.approx(0.0)}
    assert compared["opd"]["compute_vs_specialists"] == {"trainer_tokens": pytest.approx(200 / 1000),
                                                         "seconds": pytest.approx(20 / 100)}
    assert compared["mixed"]["compute_vs_specialists"]["trainer_tokens"] == pytest.approx(1.0)
    md = markdown(report)
    assert "**opd** (opd) keeps math 90% of rl_math's gain" in md and "20% of the specialists' trainer tokens" in md
    # A specialist that gained nothing leaves the share undefined rather than dividing by zero.
    results["rl_if"]["eval"]["if"] = 0.2
    assert build_report(ev, pipeline, results)["summary"]["compared"][0]["gain_kept"]["if"] is None


def test_tiny_dense_is_tiny_math_with_every_layer_dense_and_its_tokenizer():
    from dspost.config import ModelSection
    from dspost.model import DeepseekV3, load_tokenizer, tiny_dense, tiny_math
    from dspost.starting_point import starting_point, tiny_math_init

    args = tiny_dense()
    assert args.first_k_dense_replace == args.num_hidden_layers and args.num_nextn_predict_layers == 0
    assert args.kv_lora_rank + args.qk_rope_head_dim == 576  # vLLM's CPU MLA kernel
    model = DeepseekV3(args)
    assert not model.moe_layers()
    dense = sum(p.numel() for p in model.parameters())
    moe = DeepseekV3(tiny_math())
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".mlp.experts." in n and "mtp" not in n)
    activated = sum(p.numel() for n, p in moe.named_parameters() if "mtp" not in n) - experts * 6 // 8
    assert abs(dense - activated) / activated < 0.05, (dense, activated)  # 3.28M against 3.39M
    assert not DeepseekV3(tiny_dense(num_hidden_layers=6)).moe_layers()

    path = starting_point(ModelSection(preset="tiny-dense"))  # the random init: no warm start
    assert path.name.startswith("tiny-dense-init") and json.loads((path / "config.json").read_text())[
        "first_k_dense_replace"] == 4
    ours, theirs = load_tokenizer(str(path)), load_tokenizer(str(tiny_math_init()))
    assert ours.get_vocab() == theirs.get_vocab()
    text = "Which is larger, 60 or 73? \\boxed{73}"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    with pytest.raises(ValueError, match="warm_start: tiny-dense has no SFT warm start"):
        ModelSection(preset="tiny-dense", warm_start=True)
