"""Multi-worker SFT: two Ray actors in one gloo group train like one worker accumulating their micro-batches."""

import pytest
import torch
from safetensors.torch import load_file

from dspost.cli import main
from dspost.rundir import read_metrics

ARGS = ["model.warm_start=false", "data.num_train=64", "data.num_eval=8", "data.max_seq_len=128",
        "trainer.batch_size=8", "trainer.eval_every=2", "trainer.save_every=4", "trainer.warmup_steps=1",
        "trainer.lr=1e-3", "--max-steps", "4"]


def test_two_workers_train_like_one_accumulating_worker(sft_recipe, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(sft_recipe), f"output_dir={one}", *ARGS, "trainer.grad_accum=2"]) == 0
    assert main(["run", str(sft_recipe), f"output_dir={two}", *ARGS, "trainer.num_workers=2",
                 "trainer.num_cpus_per_worker=1", "trainer.num_threads=1", "ray.num_cpus=2"]) == 0
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in b] == pytest.approx([r["train/loss"] for r in a], abs=1e-4)
    assert [r.get("eval/loss") for r in b] == pytest.approx([r.get("eval/loss") for r in a], abs=1e-4)
    assert a[0]["train/loss"] != a[3]["train/loss"]  # the weights moved
    wa = load_file(one / "checkpoints" / "step_4" / "model.safetensors")
    wb = load_file(two / "checkpoints" / "step_4" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    # the router bias update saw the load of both workers' tokens
    bias = [k for k in wa if k.endswith("e_score_correction_bias")]
    assert bias and all(torch.equal(wa[k], wb[k]) for k in bias) and any(wa[k].abs().sum() > 0 for k in bias)


def test_bad_data_on_ray_workers_is_a_one_line_error(sft_recipe, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?", "completion": ""}\n' * 20)
    code = main(["run", str(sft_recipe), f"output_dir={tmp_path / 'o'}", *ARGS, f"data.path={data}",
                 "trainer.num_workers=2", "trainer.num_cpus_per_worker=1", "ray.num_cpus=2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "20/20 rows are bad" in err[-1] and "row 0" in err[-1]
