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
