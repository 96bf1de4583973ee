"""Reward models end to end: train a tiny one (`kind: rm`), evaluate it and the length baseline with
`dspost eval-rm` on LLMBar and HH-RLHF, and check the report contract, its stability and bad input."""

import json

import pytest

from dspost.cli import main
from dspost.rundir import read_metrics

RM_ARGS = ["model.warm_start=false", "data.num_train=128", "data.num_eval=32", "data.difficulty=[1]",
           "trainer.batch_size=8", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.save_every=3",
           "trainer.warmup_steps=1", "trainer.lr=1e-3"]
REPORT_KEYS = {"n", "accuracy", "accuracy_ci", "ece", "length_bias", "failed", "ties", "per_category"}
LENGTH_KEYS = {"acc_when_chosen_longer", "acc_when_chosen_shorter", "score_length_spearman", "length_baseline_accuracy"}


@pytest.fixture(scope="module")
def rm_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "rm_test.yaml"
    path.write_text("kind: rm\n")
    return path


@pytest.fixture(scope="module")
def tiny_rm(rm_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    assert main(["run", str(rm_recipe), f"output_dir={out}", *RM_ARGS]) == 0
    return out


def test_rm_training_run(tiny_rm, rm_recipe, tmp_path):
    rows = read_metrics(tiny_rm)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all({"train/loss", "train/accuracy"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6]
    cfg = json.loads((tiny_rm / "checkpoints" / "step_6" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForSequenceClassification"] and cfg["num_labels"] == 1
    # Stopped after step 2 (the schedule's steps 1-2 do not depend on its length) and resumed: the same
    # losses as the uninterrupted run.
    out = tmp_path / "resumed"
    assert main(["run", str(rm_recipe), f"output_dir={out}", *RM_ARGS, "--max-steps", "2"]) == 0
    assert main(["run", str(rm_recipe), f"output_dir={out}", *RM_ARGS, "resume=true"]) == 0
    assert [r["train/loss"] for r in read_metrics(out)] == [r["train/loss"] for r in rows]


def test_lora_reward_model(rm_recipe, tmp_path):
    from dspost.model.reward_model import is_reward_checkpoint

    out = tmp_path / "lora"
    assert main(["run", str(rm_recipe), f"output_dir={out}", *RM_ARGS, "trainer.lora={r: 4, alpha: 8}",
                 "--max-steps", "2"]) == 0
    ckpt = out / "checkpoints" / "step_2"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert is_reward_checkpoint(out / "merged")


@pytest.mark.parametrize("dataset", ["llmbar/Natural.json", "hh_rlhf/harmless-base-test.jsonl.gz"])
def test_eval_rm_reports_for_tiny_rm_and_length_critic(tiny_rm, data_dir, dataset, tmp_path):
    data = data_dir / dataset
    reports = []
    for critic, run in [(tiny_rm / "checkpoints" / "step_6", "rm_a"), (tiny_rm / "checkpoints" / "step_6", "rm_b"),
                        ("length", "length")]:
        out = tmp_path / run
        assert main(["eval-rm", "--critic", str(critic), "--data", str(data), "--output", str(out),
                     "--limit", "24", "--max-length", "192"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert REPORT_KEYS <= set(report) and LENGTH_KEYS <= set(report["length_bias"])
        assert report["n"] == 24 and 0 <= report["accuracy"] <= 1 and report["failed"] == 0
        lo, hi = report["accuracy_ci"]
        assert lo <= report["accuracy"] <= hi
        meta = json.loads((out / "meta_critic.json").read_text())
        assert len(meta["slices"]) >= 5 and all(s["verdict"] in ("trusted", "biased", "uncertain")
                                                for s in meta["slices"].values())
        assert (out / "report.md").read_text().startswith("# Critic report")
        assert (out / "plots" / "eval_rm.png").is_file()
        reports.append((report, meta))
    assert reports[0] == reports[1]  # the same run twice gives the same numbers
    length_report, length_meta = reports[2]
    assert length_report["accuracy"] == pytest.approx(length_report["length_bias"]["length_baseline_accuracy"])
    assert length_report["ece"] is not None and length_meta["flagged"]


def test_eval_rm_on_synthetic_pairs_with_rule_critic(tmp_path):
    out = tmp_path / "rule"
    assert main(["run", "recipes/rm_eval.yaml", "critic=rule:math", f"output_dir={out}", "data.num_eval=60",
                 "limit=40", "meta_critic=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] == 1.0 and report["n"] == 40  # the verifier knows right from wrong answers
    assert set(report["per_category"]) == {"level1", "level2"}
    assert not (out / "meta_critic.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--critic", "length", "--data", "no/such.jsonl"], "data.path: no such file or directory: no/such.jsonl"),
    (["--critic", "no/such/rm"], "critic: no/such/rm: no such checkpoint directory"),
    (["--critic", "rule:nope"], "critic: unknown rule 'nope'"),
    (["--critic", "length", "--column", "prompt"], "--column 'prompt': expected OURS=THEIRS"),
    (["--critic", "length", "--format", "xml"], "data.format: Input should be"),
    (["--critic", "length", "--reference", "no/ref.jsonl"], "reference: no such file: no/ref.jsonl"),
])
def test_eval_rm_bad_input_is_one_line(args, message, capsys):
    assert main(["eval-rm", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_eval_rm_bad_rows_stop_the_run(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p", "chosen": "a" if i % 2 else "", "rejected": "b"}) + "\n"
                            for i in range(10)))
    assert main(["eval-rm", "--critic", "length", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "5/10 rows are bad" in err and "missing or empty 'chosen'" in err and "first at row 0" in err
