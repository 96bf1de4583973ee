"""GRPO end to end with real vLLM engines and Ray: two nodes, rollout and trainer on different ones,
resume without losing or repeating a step, and a killed rollout worker restarted with its batch re-run."""

import json
import re

import pytest

from dspost.cli import main
from dspost.rundir import read_metrics

pytestmark = pytest.mark.vllm

SMALL = ["data.num_train=64", "data.num_eval=8", "data.difficulty=[1]", "rollout.prompts_per_step=4", "rollout.n=4",
         "rollout.max_tokens=16", "rollout.kv_cache_gb=1", "trainer.eval_every=2", "trainer.save_every=1",
         "trainer.lr=1e-3", "rollout.resources={rollout_node: 1}", "trainer.resources={trainer_node: 1}",
         # The random init solves nothing, so math rewards are all 0; a length critic as a second term gives every
         # group non-zero advantages (the weights must move for the checks below to mean anything). The
         # meta-critic watches it and, finding it biased, halves its weight.
         "rewards.terms=[{name: math}, {name: 'critic:length', weight: 0.01}]",
         "rewards.meta_critic={policy: gate, gate_weight: 0.5, every: 2}"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, policy, tmp_path_factory):
    """Three GRPO steps in one run: what a run cut after two steps and resumed must repeat. Its exit code is
    checked in the test, so that a broken run is a failing test, not an error in a fixture."""
    out = tmp_path_factory.mktemp("grpo") / "full"
    code = main(["run", "recipes/grpo_math.yaml", f"model.path={policy}", f"output_dir={out}", *SMALL,
                 "--max-steps", "3"])
    return out, code


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_grpo_moves_the_weights_the_engine_serves_them_and_resume_repeats_the_run(cluster, policy, uninterrupted,
                                                                                   tmp_path):
    full_run, code = uninterrupted
    assert code == 0
    out = tmp_path / "run"
    args = ["run", "recipes/grpo_math.yaml", f"model.path={policy}", f"output_dir={out}", *SMALL]
    assert main([*args, "--max-steps", "2"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert 0.0 <= rows[0]["eval/accuracy"] <= 1.0 and "eval/accuracy" in rows[2]
    for r in rows[1:]:
        for key in ("reward/mean", "sync/seconds", "sync/parity_mean_abs", "time/step", "train/grad_norm",
                    "reward/math/timeout", "response/length_mean", "moe/load_max_min_ratio"):
            assert key in r, key
        assert "reward/critic_length/mean" in r
    assert rows[1]["meta/flagged"] == 1.0 and rows[1]["meta/weight_scale"] == 0.5  # checked at step 0
    assert "meta/flagged" not in rows[2]  # every 2 steps
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    log = (out / "run.log").read_text()
    rollout_node, trainer_node = re.search(r"rollout\[0\]@(\w+) trainer\[0\]@(\w+)", log).groups()
    assert rollout_node != trainer_node  # placed on different nodes

    assert main([*args, "--max-steps", "3", "resume=true"]) == 0
    rows, full = read_metrics(out), read_metrics(full_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # no step lost or repeated
    cfg = json.loads((out / "checkpoints" / "step_3" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]

    # The updates moved the policy, and after every sync the engine served the moved weights: the probe's
    # logprobs changed by far more than engine and trainer differ.
    start, end = weights(policy), weights(out / "checkpoints" / "step_3")
    assert max(float((end[k] - start[k]).abs().max()) for k in start) > 1e-4  # lr 1e-3 warming up: ~6e-4
    for r in rows[1:]:
        assert r["sync/policy_change_max"] > 1e-2 > 10 * r["sync/parity_max_abs"], r

    # The resumed run repeats the uninterrupted one: same samples, rewards, updates and final weights.
    for key in ("reward/mean", "reward/std", "response/length_mean", "train/loss", "train/grad_norm",
                "sync/parity_max_abs", "sync/policy_change_max", "eval/accuracy"):
        assert [r.get(key) for r in rows] == pytest.approx([r.get(key) for r in full], abs=1e-6), key
    same = weights(full_run / "checkpoints" / "step_3")
    assert max(float((end[k] - same[k]).abs().max()) for k in end) < 1e-6


def test_a_sync_that_does_not_reach_the_engine_stops_the_run(cluster, policy, tmp_path, monkeypatch, capsys):
    from dspost.rl import RLSession

    def probe_without_pushing(self, step):  # the engine keeps the old weights
        self.parity = self.prober.check(self.pool, self.trainers[0])
        return dict(self.parity)

    monkeypatch.setattr(RLSession, "sync", probe_without_pushing)
    out = tmp_path / "run"
    assert main(["run", "recipes/grpo_math.yaml", f"model.path={policy}", f"output_dir={out}", *SMALL,
                 "--max-steps", "1"]) == 1
    assert "engine and trainer logprobs differ" in capsys.readouterr().err
    assert not (out / "checkpoints" / "latest").exists()  # nothing saved past the failed probe


def test_a_killed_rollout_worker_restarts_on_the_pushed_weights_and_reruns_its_batch(cluster, policy):
    import ray
    import torch

    from dspost.model import from_pretrained, hf_tensors
    from dspost.rollout.engine import SamplingConfig
    from dspost.rollout.pool import RolloutPool, WorkerSpec
    from dspost.rollout.sync import ObjectStoreTransport

    pool = RolloutPool(1, str(policy), WorkerSpec(1, 0, None, {"rollout_node": 1}),
                       {"kv_cache_gb": 1, "max_model_len": 128})
    try:
        transport = ObjectStoreTransport(1 << 20)
        transport.connect(pool.workers)
        pool.rejoin = transport.rejoin
        probe = [[5, 6, 7, 8, 9, 10, 11, 12]]
        served = pool.sequence_logprobs(probe)
        model = from_pretrained(policy)
        with torch.no_grad():  # weights the worker's checkpoint does not hold
            g = torch.Generator().manual_seed(0)
            for _, t in hf_tensors(model):
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
        transport.push(list(hf_tensors(model, include_mtp=False)), version=5)
        pushed = pool.sequence_logprobs(probe)
        assert max(abs(a - b) for a, b in zip(pushed[0], served[0])) > 1e-2
        sampling = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
        prompts = [[5, 6, 7], [8, 9]]
        before = pool.generate(prompts, sampling, seed=0)
        ray.kill(pool.workers[0])
        after = pool.generate(prompts, sampling, seed=0)
        assert pool.restarts == 1
        assert [s.response_ids for s in after] == [s.response_ids for s in before]
        assert pool.sequence_logprobs(probe) == pushed  # the pushed weights, not the checkpoint it started from
        assert pool.versions() == [5] and all(s.version == 5 for s in after)
    finally:
        pool.shutdown()
