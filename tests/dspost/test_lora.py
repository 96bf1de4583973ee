"""LoRA SFT: adapters in PEFT format that transformers + PEFT load, `dspost merge-lora`, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from dspost.cli import main
from dspost.rundir import read_metrics

ARGS = ["model.warm_start=false", "data.num_train=64", "data.num_eval=8", "data.max_seq_len=128",
        "trainer.batch_size=8", "trainer.eval_every=2", "trainer.save_every=2", "trainer.warmup_steps=1",
        "trainer.lr=1e-2", "trainer.lora.r=4", "trainer.lora.alpha=8"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "sft_lora_test.yaml"
    path.write_text("kind: sft\ntrainer:\n  lora: {}\n")
    return path


def run(recipe, out, *extra):
    assert main(["run", str(recipe), f"output_dir={out}", *ARGS, *extra]) == 0


def test_adapter_loads_with_peft_on_transformers_and_merges(recipe, tmp_path):
    from peft import PeftModel
    from transformers import DeepseekV3ForCausalLM

    from dspost.model import from_pretrained

    out = tmp_path / "run"
    run(recipe, out, "--max-steps", "2")
    adapter = out / "checkpoints" / "step_2"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()  # the frozen base is not copied into checkpoints
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = Path(config["base_model_name_or_path"])
    assert (base / "config.json").is_file()
    assert "gate" not in config["target_modules"]  # the router is never adapted by default

    merged = tmp_path / "merged"
    assert main(["merge-lora", str(adapter), str(merged)]) == 0
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           str(adapter)).eval()(ids).logits
        ours = from_pretrained(merged).eval()(ids).logits
        untouched = from_pretrained(base).eval()(ids).logits
        stage_output = from_pretrained(out / "merged").eval()(ids).logits
    assert (theirs - ours).abs().max() < 1e-4
    assert (ours - untouched).abs().max() > 1e-3  # the adapter moved the model
    assert torch.equal(stage_output, ours)  # the run's merged/ is what merge-lora writes


def test_lora_resume_repeats_the_uninterrupted_run_exactly(recipe, tmp_path):
    run(recipe, tmp_path / "full", "--max-steps", "4")
    run(recipe, tmp_path / "cut", "--max-steps", "2")
    run(recipe, tmp_path / "cut", "--max-steps", "4", "resume=true")
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in cut] == [r["train/loss"] for r in full]


def test_merge_lora_names_a_directory_that_is_not_an_adapter(tmp_path, capsys):
    assert main(["merge-lora", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


@pytest.mark.vllm
def test_vllm_serves_the_merged_checkpoint(recipe, tmp_path):
    pytest.importorskip("vllm")
    from dspost.model import from_pretrained
    from dspost.trainer_worker import token_logprobs
    from tests.conftest import fresh_engine_logprobs

    out = tmp_path / "run"
    run(recipe, out, "--max-steps", "2")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (9, 25)]
    served = fresh_engine_logprobs(out / "merged", seqs)
    model = from_pretrained(out / "merged").eval()
    with torch.no_grad():
        ours = [token_logprobs(model, torch.tensor([s]))[0][0] for s in seqs]
    assert max(float((torch.tensor(v) - o).abs().max()) for v, o in zip(served, ours)) < 1e-3


def test_compiled_lora_run_trains_like_the_eager_one(recipe, tmp_path):
    from torch._dynamo.utils import counters

    run(recipe, tmp_path / "eager", "--max-steps", "3")
    torch._dynamo.reset()  # graphs cached by earlier tests would let a no-op compile pass unseen
    graphs = counters["stats"]["unique_graphs"]
    run(recipe, tmp_path / "compiled", "--max-steps", "3", "trainer.compile=true")
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path really ran
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for key in ("train/loss", "eval/loss"):
        ours = [r[key] for r in compiled if key in r]
        assert ours and ours == pytest.approx([r[key] for r in eager if key in r], rel=1e-4), key
