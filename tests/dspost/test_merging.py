"""Task arithmetic (`dspost/merging.py`, OPD's `opd.init: task_arithmetic`): the merged checkpoint holds
base + scale * sum of the task vectors, a tensor held under two names counts once, and checkpoints that are not
fine-tunes of the base are refused in one line naming them."""

import pytest
import torch

from dspost.merging import MergeError, task_arithmetic


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """Three 2-layer tiny-math inits (other seeds), with the project's tokenizer."""
    from dspost.model import DeepseekV3, load_tokenizer, tiny_math
    from dspost.starting_point import tiny_math_init

    tok = load_tokenizer(str(tiny_math_init()))
    root = tmp_path_factory.mktemp("merge")
    for seed in (1, 2, 3):
        DeepseekV3(tiny_math(num_hidden_layers=2)).init_weights(seed=seed).save_pretrained(root / f"m{seed}",
                                                                                             tokenizer=tok)
    return [root / f"m{seed}" for seed in (1, 2, 3)]


def test_the_merge_is_the_base_plus_the_scaled_task_vectors(inits, tmp_path):
    from dspost.model import from_pretrained

    base, a, b = (from_pretrained(str(p)).state_dict() for p in inits)
    out = task_arithmetic(inits[0], inits[1:], 0.5, tmp_path / "merged")
    merged = from_pretrained(str(out)).state_dict()
    assert merged.keys() == base.keys() and (out / "tokenizer_config.json").is_file()
    for name, t in merged.items():
        want = base[name] + 0.5 * ((a[name] - base[name]) + (b[name] - base[name]))
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6, msg=name)


def test_a_tied_tensor_is_merged_once(llama, tmp_path):
    """A transformers model with tied embeddings holds one tensor under two names: its task vector is added once."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    from dspost.model import load_tokenizer

    cfg = AutoConfig.from_pretrained(str(llama))
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = LlamaForCausalLM(cfg)
    tok = load_tokenizer(str(llama))
    tied.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        tied.model.embed_tokens.weight.add_(1.0)
    tied.save_pretrained(tmp_path / "tuned")
    for d in ("base", "tuned"):
        tok.save_pretrained(tmp_path / d)
    out = task_arithmetic(tmp_path / "base", [tmp_path / "tuned"], 1.0, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).model.embed_tokens.weight
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(merged.model.embed_tokens.weight, base + 1.0)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_a_checkpoint_of_another_model_is_refused(inits, tmp_path):
    from dspost.starting_point import preset_init

    dense = preset_init("tiny-dense")
    with pytest.raises(MergeError, match=f"^{dense}: not a fine-tune of {inits[0]} \\(config.json differs in") as e:
        task_arithmetic(inits[0], [inits[1], dense], 1.0, tmp_path / "merged")
    assert "\n" not in str(e.value) and not (tmp_path / "merged").exists()


def test_a_merge_that_is_not_finite_is_refused_before_anything_is_written(inits, tmp_path):
    from dspost.model import from_pretrained
    from dspost.training import NonFiniteError

    broken = from_pretrained(str(inits[1]))
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    broken.save_pretrained(tmp_path / "nan")
    with pytest.raises(NonFiniteError, match="a merged weight is not finite"):
        task_arithmetic(inits[0], [tmp_path / "nan"], 1.0, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
