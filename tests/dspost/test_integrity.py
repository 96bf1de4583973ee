"""Runs that cannot go silently wrong: non-finite numbers stop a step before it is applied, synced or saved; a
NaN parity probe fails; reward errors past `rewards.max_error_fraction` stop the run; prompts too long for the
engine are counted bad rows; held-out answers are graded in the scoring pool, never in the trainer."""

import math

import pytest
import torch

from dspost.cli import main
from dspost.config import GRPORecipe, ModelSection, RewardsSection, RewardTerm, TrainerSection
from dspost.data.loading import BadRows, Example
from dspost.reward_terms import RuleTerm
from dspost.rl import ParityError, RewardError, fitting_prompts, parity, score
from dspost.rewards import ScoringPool
from dspost.rollout.engine import Sample
from dspost.rundir import read_metrics
from dspost.training import NonFiniteError


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_parity_difference_fails(bad):
    assert parity([[-1.0, -2.0]], [[-1.0, -2.0 + 1e-6]], 1e-3)["sync/parity_max_abs"] < 1e-5
    with pytest.raises(ParityError, match="differ by up to"):
        parity([[-1.0, bad]], [[-1.0, -2.0]], 1e-3)
    with pytest.raises(ParityError):
        parity([[-1.0, -2.0]], [[-1.0, -2.5]], 1e-3)


def test_reward_errors_beyond_the_limit_stop_the_run():
    samples = [Sample(0, [1], [2], [-1.0], "stop", 0, text=t) for t in ("a", "xa", "b", "xb")]
    examples = [Example([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "1")] * 4
    name = "flaky_reward:scorer_breaks_on_x"
    with ScoringPool(1) as pool:
        terms = [RuleTerm(RewardTerm(name=name), pool, timeout=60)]
        rewards, metrics = score(terms, samples, examples, RewardsSection(max_error_fraction=0.5), step=3)
        assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0] and metrics[f"reward/{name}/error"] == 2
        with pytest.raises(RewardError, match=r"step 3: reward term '.*' could not score 2/4 samples.*the scorer broke"):
            score(terms, samples, examples, RewardsSection(max_error_fraction=0.25), step=3)


def test_prompts_longer_than_the_engine_allows_are_counted_bad_rows():
    from dspost.model import load_tokenizer
    from dspost.starting_point import tiny_math_init

    tok = load_tokenizer(str(tiny_math_init()))
    ex = lambda q: Example([{"role": "user", "content": q}, {"role": "assistant", "content": "1"}], "1")  # noqa: E731
    examples = [ex("What is 1 + 1?"), ex("What is " + " + ".join(["1"] * 200) + "?"), ex("What is 2 + 2?")]
    bad = BadRows(total=3)
    kept = fitting_prompts(tok, examples, 64, bad, offset=10)
    assert [p.example for p in kept] == [examples[0], examples[2]] and all(len(p.ids) <= 64 for p in kept)
    assert bad.count == 1 and bad.first == {"prompt longer than data.max_seq_len=64 tokens": 11}


def test_a_non_finite_policy_loss_stops_the_update_before_it_is_applied():
    from dspost.starting_point import tiny_math_init
    from dspost.trainer_worker import RolloutBatch, TrainerWorker

    worker = TrainerWorker(GRPORecipe(kind="grpo", trainer=TrainerSection(lr=1e-3, warmup_steps=0),
                                      model=ModelSection(bias_update_speed=0)), str(tiny_math_init()))
    before = {k: v.clone() for k, v in worker.model.state_dict().items()}
    batch = RolloutBatch([[4, 100, 5]] * 2, [[200, 2], [300, 2]], [[-1.0, -1.0]] * 2, [math.nan, 1.0])
    with pytest.raises(NonFiniteError, match="step 7: the policy loss is not finite"):
        worker.train_step(batch, 7)
    assert all(torch.equal(v, worker.model.state_dict()[k]) for k, v in before.items())  # nothing applied


def test_non_finite_weights_after_the_optimizer_step_are_named():
    from dspost.starting_point import tiny_math_init
    from dspost.trainer_worker import RolloutBatch, TrainerWorker

    worker = TrainerWorker(GRPORecipe(kind="grpo", trainer=TrainerSection(lr=1e-3, warmup_steps=0),
                                      model=ModelSection(bias_update_speed=0)), str(tiny_math_init()))
    step = worker.optimizer.adamw.step

    def poisoned_step():  # an optimizer that overflows one weight (finite gradients, as a huge lr would)
        step()
        with torch.no_grad():
            worker.model.model.norm.weight[0] = math.inf

    worker.optimizer.adamw.step = poisoned_step
    batch = RolloutBatch([[4, 100, 5]] * 2, [[200, 2], [300, 2]], [[-1.0, -1.0]] * 2, [1.0, -1.0])
    with pytest.raises(NonFiniteError, match=r"step 2: a weight after the optimizer step is not finite \(model\.norm\.weight: inf"):
        worker.train_step(batch, 2)


def test_a_nan_sft_loss_stops_the_run_and_latest_stays_on_the_last_finite_checkpoint(sft_recipe, tmp_path,
                                                                                      monkeypatch, capsys):
    import dspost.sft

    real, calls = dspost.sft.lm_loss, []

    def nan_at_the_third_step(*args, **kwargs):
        loss, lm, mtp = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan, lm, mtp) if len(calls) > 2 * 2 else (loss, lm, mtp)  # 2 micro-batches per step

    monkeypatch.setattr(dspost.sft, "lm_loss", nan_at_the_third_step)
    out = tmp_path / "run"
    args = ["run", str(sft_recipe), f"output_dir={out}", "model.warm_start=false", "data.num_train=32",
            "data.num_eval=4", "data.max_seq_len=128", "trainer.batch_size=4", "trainer.grad_accum=2",
            "trainer.save_every=1", "trainer.eval_every=100", "--max-steps", "5"]
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert err == ["error: step 3: the training loss is not finite (nan)"]  # one line (the rest is the progress bar)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert not (out / "checkpoints" / "step_3").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_held_out_answers_are_graded_in_the_scoring_pool_not_the_trainer(monkeypatch):
    import dspost.rewards.math
    from dspost.model import load_tokenizer
    from dspost.starting_point import tiny_math_init
    from dspost.sft import eval_accuracy

    def in_this_process(*args, **kwargs):
        raise AssertionError("the trainer process parsed model output")

    monkeypatch.setattr(dspost.rewards.math, "verify_math", in_this_process)
    path = tiny_math_init()
    from dspost.model import from_pretrained

    examples = [Example([{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": "x"}],
                        str(i + 1)) for i in range(3)]
    with ScoringPool(1) as pool:
        acc = eval_accuracy(from_pretrained(path), examples, load_tokenizer(str(path)), pool, max_new_tokens=4)
    assert list(acc) == [None] and 0.0 <= acc[None] <= 1.0
