"""Our MoE with a scalar head: transformers' DeepseekV3ForSequenceClassification reads what we save."""

import pytest
import torch

from dspost.model import CheckpointError, DeepseekV3
from dspost.model.reward_model import DeepseekV3RewardModel, is_reward_checkpoint, load_reward_model

from tests.model.conftest import random_model, small_args


@pytest.fixture
def reward_model():
    rm = DeepseekV3RewardModel(random_model(small_args(num_nextn_predict_layers=0)))
    torch.nn.init.normal_(rm.score.weight, std=0.2, generator=torch.Generator().manual_seed(1))
    return rm.eval()


def padded_batch(vocab: int, pad: int):
    ids = torch.randint(6, vocab, (4, 19), generator=torch.Generator().manual_seed(2))
    for row, length in enumerate([19, 12, 7, 1]):
        ids[row, length:] = pad
    return ids


def test_transformers_reads_our_reward_checkpoint(reward_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    reward_model.save_pretrained(tmp_path)
    assert is_reward_checkpoint(tmp_path)
    ids = padded_batch(reward_model.args.vocab_size, reward_model.args.pad_token_id)
    ours = load_reward_model(tmp_path)(ids, reward_model.args.pad_token_id)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != reward_model.args.pad_token_id).long()).logits[:, 0]
    assert type(hf).__name__ == "DeepseekV3ForSequenceClassification"
    assert (ours - theirs).abs().max() < 1e-5
    assert torch.allclose(ours, reward_model(ids, reward_model.args.pad_token_id), atol=1e-6)


def test_score_reads_the_last_real_token(reward_model):
    pad = reward_model.args.pad_token_id
    ids = padded_batch(reward_model.args.vocab_size, pad)
    batch = reward_model(ids, pad)
    alone = torch.stack([reward_model(ids[i:i + 1, :n], pad)[0] for i, n in enumerate([19, 12, 7, 1])])
    assert torch.allclose(batch, alone, atol=1e-5)  # padding changes nothing


def test_causal_lm_checkpoint_is_not_a_reward_model(tmp_path):
    model = random_model(small_args())
    model.save_pretrained(tmp_path)
    assert not is_reward_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path)
    fresh = load_reward_model(tmp_path, init_head_seed=0)
    assert fresh.score.weight.abs().sum() > 0
    # ...and a reward checkpoint still loads as a causal LM (its head is skipped).
    fresh.save_pretrained(tmp_path / "rm")
    from dspost.model import from_pretrained

    assert isinstance(from_pretrained(tmp_path / "rm"), DeepseekV3)
