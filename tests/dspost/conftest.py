import pytest


@pytest.fixture(scope="module")
def sft_recipe(tmp_path_factory):
    """A bare `kind: sft` recipe: every setting from the schema's defaults and the test's overrides."""
    path = tmp_path_factory.mktemp("recipes") / "sft_test.yaml"
    path.write_text("kind: sft\n")
    return path


# ---- GRPO end to end (test_grpo.py, test_lora_rl.py): a two-node Ray cluster and the tiny-math random init
@pytest.fixture(scope="module")
def cluster(monkeypatch_module):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"rollout_node": 1}})
    c.add_node(num_cpus=1, resources={"trainer_node": 1})
    ray.init(address=c.address)
    monkeypatch_module.setenv("RAY_ADDRESS", c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def policy():
    from dspost.starting_point import tiny_math_init

    return tiny_math_init()


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A tiny transformers Llama (random init) with the project's tokenizer, which vLLM's CPU backend serves (its
    attention takes head sizes from 32): a policy or teacher that is not ours."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dspost.model import load_tokenizer
    from dspost.model.checkpoint import read_config
    from dspost.starting_point import tiny_math_init

    tok = load_tokenizer(str(tiny_math_init()))  # the project's tokenizer: a chat template with generation marks
    head = read_config(tiny_math_init())["vocab_size"]  # our head's rows, as an OPD teacher of ours needs
    cfg = LlamaConfig(vocab_size=head, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
