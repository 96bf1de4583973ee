"""LoRA GRPO: PEFT adapters on a frozen base, syncs that send the engines only the merged adapted tensors (and the
partners vLLM fuses them with), the parity probe after every sync, adapter checkpoints that resume exactly."""

import copy
import json

import pytest
import torch

from dspost.cli import main
from dspost.config import LoraSection
from dspost.rundir import read_metrics

# q_a_proj without its fused partner kv_a_proj_with_mqa, shared_experts.up_proj without gate_proj: the engine keeps
# no unpacked copy of either pair, so a sync that left out the unadapted partner would fail there.
TARGETS = ["q_a_proj", "kv_b_proj", "o_proj", "shared_experts.up_proj"]
ARGS = ["data.num_train=64", "data.num_eval=8", "data.difficulty=[1]", "rollout.prompts_per_step=4", "rollout.n=4",
        "rollout.max_tokens=16", "rollout.kv_cache_gb=1", "trainer.eval_every=2", "trainer.save_every=1",
        "trainer.lr=1e-2", "trainer.warmup_steps=1", "rollout.resources={rollout_node: 1}",
        "trainer.resources={trainer_node: 1}", f"trainer.lora={{r: 8, alpha: 16, target_modules: {TARGETS}}}",
        "model.bias_update_speed=0.01",  # on, so that the frozen-base check covers the router biases
        # the random init solves nothing: a length critic gives the groups non-zero advantages (see test_grpo.py)
        "rewards.terms=[{name: math}, {name: 'critic:length', weight: 0.01}]"]


def sent_names(num_layers: int, first_dense: int) -> list[str]:
    """What a sync under TARGETS sends, in order: each fused pair whole, in shard order."""
    names = []
    for i in range(num_layers):
        a = f"model.layers.{i}.self_attn"
        names += [f"{a}.{p}.weight" for p in ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        if i >= first_dense:
            names += [f"model.layers.{i}.mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj")]
    return names


def test_lora_grpo_validates_and_combinations_that_cannot_work_are_named(tmp_path):
    from dspost.recipe import load_recipe

    recipe = "recipes/grpo_math.yaml"
    assert load_recipe(recipe, ["trainer.lora={r: 4}"]).trainer.lora.r == 4
    with pytest.raises(ValueError, match=r"sync\.quantize: LoRA syncs"):
        load_recipe(recipe, ["trainer.lora={}", "sync.quantize=fp8", "rollout.num_gpus_per_worker=1"])
    with pytest.raises(ValueError, match=r"trainer\.quantization"):
        load_recipe(recipe, ["trainer.lora={}", "trainer.quantization=fp8"])


def test_a_lora_sync_sends_the_merged_adapted_tensors_and_their_fused_partners():
    from dspost.lora import adapted_tensors, add_adapters
    from dspost.model import DeepseekV3, hf_tensors, tiny_math

    args = tiny_math()
    model = add_adapters(DeepseekV3(args).init_weights(0), LoraSection(r=4, alpha=8, target_modules=TARGETS), "base")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sent = adapted_tensors(model)
    assert [n for n, _ in sent] == sent_names(args.num_hidden_layers, args.first_k_dense_replace)
    merged = dict(hf_tensors(copy.deepcopy(model).merge_and_unload(), include_mtp=False))
    base = dict(hf_tensors(DeepseekV3(args).init_weights(0), include_mtp=False))
    for name, t in sent:
        assert torch.equal(t, merged[name]), name  # W + scale * B @ A, as PEFT merges it
        if "kv_a_proj_with_mqa" in name or "gate_proj" in name:  # the unadapted partners: the base weight
            assert torch.equal(t, base[name]), name
        else:
            assert (t - base[name]).abs().max() > 1e-3, name  # the adapter is in
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing trained was touched
    # tiny-math is attention-heavy: these are 30% of its main stack (MLA is 11.4B, 1.7%, of DeepSeek-V3's 671B)
    assert sum(t.numel() for _, t in sent) < sum(t.numel() for t in merged.values()) / 3


def adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def full_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.vllm
def test_lora_grpo_syncs_the_adapted_tensors_and_resume_repeats_the_run(cluster, policy, tmp_path):
    from dspost.model import from_pretrained, hf_tensors

    args = ["run", "recipes/grpo_math.yaml", f"model.path={policy}", *ARGS]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*args, f"output_dir={full}", "--max-steps", "2"]) == 0
    assert main([*args, f"output_dir={cut}", "--max-steps", "1"]) == 0
    assert main([*args, f"output_dir={cut}", "--max-steps", "2", "resume=true"]) == 0

    base = dict(hf_tensors(from_pretrained(policy), include_mtp=False))
    sent = sent_names(4, 1)
    lora_bytes = sum(base[n].numel() * base[n].element_size() for n in sent)
    model_bytes = sum(t.numel() * t.element_size() for t in base.values())
    rows, again = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in rows] == [r["step"] for r in again] == [0, 1, 2]
    for r in rows[1:]:
        assert r["sync/bytes"] == lora_bytes < model_bytes / 3, r  # the adapted tensors and partners, nothing else
        assert "sync/seconds" in r and "sync/push_seconds" in r
        # after every sync the engine served the moved policy: the probe moved far more than engine and trainer differ
        assert r["sync/policy_change_max"] > 1e-2 > 10 * r["sync/parity_max_abs"], r

    # Checkpoints hold the adapter (PEFT format), not the model; the run ends with the merged model.
    step = full / "checkpoints" / "step_2"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= {p.name for p in step.iterdir()}
    assert not (step / "model.safetensors").exists()
    assert json.loads((step / "adapter_config.json").read_text())["base_model_name_or_path"] == str(policy)
    assert max(float(t.abs().max()) for k, t in adapter(step).items() if "lora_B" in k) > 1e-3  # the adapter moved
    merged = full_weights(full / "merged")
    for name, t in base.items():  # the base, router biases included, is frozen: only adapted tensors changed
        changed = not torch.equal(merged[name], t)
        assert changed == (name in sent and "kv_a_proj" not in name and "gate_proj" not in name), name

    # The resumed run repeats the uninterrupted one: same samples, rewards, updates, probe and weights.
    for key in ("reward/mean", "reward/std", "response/length_mean", "train/loss", "train/grad_norm",
                "sync/bytes", "sync/parity_max_abs", "sync/policy_change_max"):
        assert [r.get(key) for r in again] == [r.get(key) for r in rows], key
    assert again[-1]["eval/accuracy"] == rows[-1]["eval/accuracy"]  # the cut run also evaluated its last step
    resumed = adapter(cut / "checkpoints" / "step_2")
    assert all(torch.equal(t, resumed[k]) for k, t in adapter(step).items())
    assert all(torch.equal(t, full_weights(cut / "merged")[k]) for k, t in merged.items())
