"""Same weights, same logits: our model vs transformers' DeepseekV3ForCausalLM, both load directions.

The weights are drawn 2.5x wider than the default init (std 0.05): attention scores then reach order 1, so the
softmax is far from uniform and an attention-scale error shows in the logits (a 1% softmax-scale error moves
them by ~2e-3, while the two implementations agree to ~7e-7 in fp32; at std 0.02 the same error moves them by
only ~6e-5)."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from dspost.model import from_pretrained
from tests.model.conftest import random_model, small_args

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}
CONFIGS = {
    "v3": {},
    "yarn-mscale": {"rope_scaling": YARN},
    "no-q-lora-one-group": {"q_lora_rank": None, "n_group": 1, "topk_group": 1},
    # transformers' V3 router is always sigmoid + bias, so the scoring variants are tested in test_router.py.
    "dense2-unnormalised-scaled": {"first_k_dense_replace": 2, "norm_topk_prob": False, "routed_scaling_factor": 2.5},
}
TOL = 1e-5
INIT_STD = 0.05


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_transformers(tmp_path, name):
    ours = random_model(small_args(initializer_range=INIT_STD, **CONFIGS[name]), seed=1)
    ours.save_pretrained(tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL, f"{name}: max |logit diff| {diff}"


@pytest.mark.parametrize("name", ["v3", "yarn-mscale"])
def test_transformers_to_ours(tmp_path, name):
    src = random_model(small_args(initializer_range=INIT_STD, **CONFIGS[name]), seed=2)
    src.save_pretrained(tmp_path / "src")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")  # written by transformers: its own layout, no MTP layers
    with pytest.warns(UserWarning, match="MTP"):
        ours = from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, src.args.vocab_size, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL, f"{name}: max |logit diff| {diff}"
    assert ours.args.num_nextn_predict_layers == 0
