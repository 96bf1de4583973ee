"""SFT of a transformers causal LM that is not ours (a tiny Llama built here): full and LoRA, packed rows
seen by transformers as separate samples, adapters that PEFT loads and `dspost merge-lora` folds."""

import json

import pytest
import torch

from dspost.cli import main
from dspost.data.packing import Tokenized, collate, collate_packed, pack
from dspost.rundir import read_metrics
from dspost.sft import lm_loss

ARGS = ["data.num_train=64", "data.num_eval=8", "data.max_seq_len=128", "trainer.batch_size=8",
        "trainer.eval_every=3", "trainer.save_every=3", "trainer.warmup_steps=1", "--max-steps", "6"]


def test_packed_rows_train_like_separate_sequences_in_transformers(llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    samples = [Tokenized(ids := torch.randint(5, 200, (n,), generator=g).tolist(), [-100] * 3 + ids[3:])
               for n in (9, 14, 6)]
    ids, labels, segments, positions = collate_packed(pack(samples, 64), 0)
    with torch.no_grad():
        packed_loss = lm_loss(model, ids, labels, segments, positions)[0]
        alone = [lm_loss(model, *collate([s], 0))[0] for s in samples]
    counts = torch.tensor([sum(x != -100 for x in s.labels[1:]) for s in samples], dtype=torch.float32)
    # one packed row = the token-weighted mean of the samples' own losses (each sample's last label is dropped)
    assert float(packed_loss) == pytest.approx(float((torch.stack(alone) * counts).sum() / counts.sum()), abs=1e-5)


def test_full_sft_of_a_transformers_model(sft_recipe, llama, tmp_path):
    out = tmp_path / "full"
    assert main(["run", str(sft_recipe), f"output_dir={out}", f"model.path={llama}", "trainer.lr=3e-3", "data.pack=true",
                 *ARGS]) == 0
    rows = read_metrics(out)
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in rows if "eval/accuracy" in r)
    ckpt = out / "checkpoints" / "step_6"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "train/mtp_loss" not in rows[0] and "moe/load_max_min_ratio" not in rows[0]


def test_lora_sft_of_a_transformers_model_merges(sft_recipe, llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert main(["run", str(sft_recipe), f"output_dir={out}", f"model.path={llama}", "trainer.lr=1e-2",
                 "trainer.lora.target_modules=[q_proj,v_proj,down_proj]", "trainer.lora.r=4", *ARGS]) == 0
    adapter = out / "checkpoints" / "step_6"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    ids = torch.randint(5, 200, (2, 17), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()(ids).logits
    assert (adapted - merged).abs().max() < 1e-4


def test_low_precision_training_is_refused_for_a_transformers_model(sft_recipe, llama, tmp_path, capsys):
    code = main(["run", str(sft_recipe), f"output_dir={tmp_path / 'q'}", f"model.path={llama}",
                 "trainer.quantization=fp8", *ARGS])
    assert code == 2
    assert "trainer.quantization=fp8" in capsys.readouterr().err


def test_resume_of_a_transformers_model_repeats_the_uninterrupted_run(sft_recipe, llama, tmp_path):
    common = ["run", str(sft_recipe), f"model.path={llama}", "trainer.lr=3e-3", *ARGS[:-2], "trainer.save_every=2"]
    assert main([*common, f"output_dir={tmp_path / 'full'}", "--max-steps", "4"]) == 0
    assert main([*common, f"output_dir={tmp_path / 'cut'}", "--max-steps", "2"]) == 0
    assert main([*common, f"output_dir={tmp_path / 'cut'}", "--max-steps", "4", "resume=true"]) == 0
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in cut] == [r["train/loss"] for r in full]


def test_compile_names_a_model_it_cannot_compile(llama, tmp_path, capsys):
    # trainer.compile covers our DeepseekV3 only: on another model the run stops with the reason, not silently eager.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: sft\n")
    code = main(["run", str(recipe), f"output_dir={tmp_path / 'o'}", f"model.path={llama}", *ARGS[:-2],
                 "trainer.compile=true", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert code == 2 and err.startswith("error: trainer.compile") and "LlamaForCausalLM" in err
