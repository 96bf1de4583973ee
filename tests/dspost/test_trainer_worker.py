"""The trainer pool's worker: packed logprobs at the response positions, an update moving probability towards
rewarded samples, the compiled update matching the eager one, logprobs at the rollout temperature, and losses
whose means are over the whole minibatch however it is split, and a rejoin refused after an update."""

import pytest
import torch

from dspost.config import AlgorithmSection, GRPORecipe, ModelSection, RolloutSection, TrainerSection
from dspost.starting_point import tiny_math_init
from dspost.trainer_worker import RolloutBatch, TrainerWorker, pack, packed_logprobs, token_logprobs


def recipe(loss: str = "gspo", compile: bool = False, temperature: float = 1.0, **trainer) -> GRPORecipe:
    """A GRPO recipe for one in-process trainer worker (warm-up off, router biases fixed)."""
    return GRPORecipe(kind="grpo", trainer=TrainerSection(lr=1e-3, warmup_steps=0, compile=compile, **trainer),
                      algorithm=AlgorithmSection(loss=loss), model=ModelSection(bias_update_speed=0),
                      rollout=RolloutSection(temperature=temperature))


def test_packed_logprobs_at_the_response_positions_give_the_same_values_and_gradients():
    """The update runs the head on response positions only: same logprobs there, 0 elsewhere, same gradients."""
    from dspost.model import DeepseekV3, tiny_math

    torch.manual_seed(0)
    model = DeepseekV3(tiny_math(num_hidden_layers=2)).init_weights(0).train()
    lens = [(5, 3), (7, 20), (4, 1), (6, 9)]
    rand = lambda n: torch.randint(3, 1000, (n,)).tolist()  # noqa: E731
    x = pack(RolloutBatch([rand(p) for p, _ in lens], [rand(r) for _, r in lens], [[0.0] * r for _, r in lens],
                          [0.0] * len(lens)), 0)
    m = x["mask"].bool()

    def run(**kw):
        model.zero_grad()
        lp, ent = packed_logprobs(model, x["ids"], x["lengths"], row_len=32, **kw)
        (lp * x["mask"]).sum().backward()
        return lp, ent, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (lp_all, ent_all, g_all), (lp, ent, g) = run(), run(at=x["mask"])
    torch.testing.assert_close(lp[m], lp_all[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[m], ent_all[m], atol=1e-5, rtol=0)
    assert not lp[~m].any() and lp_all[~m & (torch.arange(lp.shape[1]) < x["lengths"][:, None] - 1)].all()
    assert len(g) == len(g_all)
    for a, b in zip(g, g_all):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["gspo", "grpo"])
def test_trainer_update_moves_probability_towards_rewarded_samples(tmp_path, loss):
    worker = TrainerWorker(recipe(loss=loss), str(tiny_math_init()))
    prompt = [4, 100, 101, 102, 5]
    good, bad = [200, 201, 202, 2], [300, 301, 302, 2]
    batch = RolloutBatch([prompt] * 4, [good, bad, good, bad], [[0.0] * 4] * 4, [1.0, -1.0, 1.0, -1.0])
    x = pack(batch, 0)

    def seq_lp():
        with torch.no_grad():
            lp, _ = token_logprobs(worker.model.eval(), x["ids"])
        return (lp * x["mask"]).sum(1)

    before = seq_lp()
    batch.rollout_logprobs = [[float(v) for v in row[m.bool()]] for row, m in
                              zip(token_logprobs(worker.model, x["ids"])[0].detach(), x["mask"])]
    worker.train_step(batch, 1)
    after = seq_lp()
    assert after[0] > before[0] and after[1] < before[1]


def test_compiled_trainer_update_matches_the_eager_one():
    from torch._dynamo.utils import counters

    workers = [TrainerWorker(recipe(compile=c), str(tiny_math_init())) for c in (False, True)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (5, 9, 7, 12)]
    responses = [torch.randint(5, 300, (n,), generator=g).tolist() + [2] for n in (3, 20, 11, 6)]
    batch = RolloutBatch(prompts, responses, [[-1.0] * len(r) for r in responses], [1.0, -1.0, 0.5, -0.5])
    torch._dynamo.reset()  # graphs cached by earlier tests would let a no-op compile pass unseen
    graphs = counters["stats"]["unique_graphs"]
    eager, compiled = (w.train_step(batch, 1) for w in workers)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path really ran
    for key in ("train/loss", "train/grad_norm", "train/entropy"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    after = [w.sequence_logprobs([p + r for p, r in zip(prompts, responses)]) for w in workers]
    for got, want in zip(*after):
        assert got == pytest.approx(want, abs=1e-4)


def test_trainer_computes_logprobs_at_the_rollout_temperature():
    from dspost.model import from_pretrained

    prompts, responses = [[4, 100, 101, 5], [4, 102, 5]], [[200, 201, 2], [300, 301, 302, 303, 2]]

    model = from_pretrained(tiny_math_init()).eval()

    def batch(temperature):
        x = pack(RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], [1.0, -1.0]), 0)
        with torch.no_grad():
            lp = token_logprobs(model, x["ids"], temperature=temperature)[0]
        return RolloutBatch(prompts, responses, [row[m.bool()].tolist() for row, m in zip(lp, x["mask"])], [1.0, -1.0])

    tempered = recipe(temperature=0.7)
    assert TrainerWorker(tempered, str(tiny_math_init())).train_step(batch(0.7), 1)["train/rollout_logprob_diff"] < 1e-5
    assert TrainerWorker(tempered, str(tiny_math_init())).train_step(batch(1.0), 1)["train/rollout_logprob_diff"] > 1e-2


def _ragged_batch():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (5, 9, 7, 12)]
    responses = [torch.randint(5, 300, (n,), generator=g).tolist() + [2] for n in (2, 20, 11, 5)]
    return RolloutBatch(prompts, responses, [[-1.0] * len(r) for r in responses], [1.0, -1.0, 0.5, -0.5])


@pytest.mark.parametrize("loss", ["dapo", "dr_grpo"])
def test_gradient_accumulation_splits_the_minibatch_without_changing_its_loss(loss):
    """DAPO's token mean and Dr. GRPO's constant are over the whole minibatch: accumulating two micro-batches of
    unequal token counts must give the update of one micro-batch (weighting micro-batch means by their sequence
    share, or normalising by the padded width, does not)."""
    whole, split = (TrainerWorker(recipe(loss=loss, grad_accum=k), str(tiny_math_init())) for k in (1, 2))
    grads = [_record_gradients(w) for w in (whole, split)]
    a, b = whole.train_step(_ragged_batch(), 1), split.train_step(_ragged_batch(), 1)
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-8)
    assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    for name, g in grads[0].items():  # Adam's update of a near-zero gradient is sign-like: compare gradients
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)


def _record_gradients(worker: TrainerWorker) -> dict[str, torch.Tensor]:
    """The gradients the worker's AdamW step receives, recorded as it steps."""
    seen, step = {}, worker.optimizer.adamw.step

    def recording_step(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in worker.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    worker.optimizer.adamw.step = recording_step
    return seen


def test_dr_grpo_divides_by_the_longest_response_allowed():
    """Dr. GRPO's normaliser is sequences x rollout.max_tokens, whatever the batch's padded width."""
    worker = TrainerWorker(recipe(loss="dr_grpo"), str(tiny_math_init()))
    short = recipe(loss="dr_grpo").model_copy(update={"rollout": RolloutSection(max_tokens=32)})
    other = TrainerWorker(short, str(tiny_math_init()))
    a, b = worker.train_step(_ragged_batch(), 1)["train/loss"], other.train_step(_ragged_batch(), 1)["train/loss"]
    assert b == pytest.approx(a * 64 / 32, rel=1e-5)  # the default max_tokens is 64


def test_greedy_temperature_scores_the_untempered_distribution():
    from dspost.model import from_pretrained

    model = from_pretrained(tiny_math_init()).eval()
    ids = torch.tensor([[4, 100, 101, 5, 200, 201]])
    with torch.no_grad():
        greedy, plain = token_logprobs(model, ids, temperature=0.0)[0], token_logprobs(model, ids)[0]
    assert torch.isfinite(greedy).all() and torch.equal(greedy, plain)


def test_bf16_precision_runs_the_update_under_autocast():
    prompts, responses = [[4, 100, 101, 5], [4, 102, 5]], [[200, 201, 2], [300, 301, 302, 303, 2]]
    from dspost.model import from_pretrained

    x = pack(RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], [1.0, -1.0]), 0)
    with torch.no_grad():
        lp = token_logprobs(from_pretrained(tiny_math_init()).eval(), x["ids"])[0]
    fp32_logprobs = [row[m.bool()].tolist() for row, m in zip(lp, x["mask"])]
    diffs = [TrainerWorker(recipe(precision=p), str(tiny_math_init())).train_step(
        RolloutBatch(prompts, responses, fp32_logprobs, [1.0, -1.0]), 1)["train/rollout_logprob_diff"]
        for p in ("fp32", "bf16")]
    assert diffs[0] < 1e-5 < 1e-3 < diffs[1]


def test_a_restarted_rollout_worker_rejoins_only_the_weights_last_pushed():
    """With the parameters hosted, a rejoin hands out the trainer's weights as they are: between a push and the next
    update that is the pushed version, after an update it is not, and the trainer refuses in one line."""
    from dspost.rollout.sync import PushStats, SyncError

    class Recording:  # the transport's interface, recording what the trainer asks of it
        def __init__(self):
            self.rejoined = []

        def push(self, named, version):
            return PushStats(sum(t.numel() * t.element_size() for _, t in named), 0.0, 0)

        def rejoin(self, index, worker):
            self.rejoined.append(index)

    worker = TrainerWorker(recipe(), str(tiny_math_init()))
    worker.transport = transport = Recording()
    worker.rejoin_weight_transfer(0, None)  # nothing pushed yet: the engines serve the start checkpoint
    batch = RolloutBatch([[4, 100, 5]] * 2, [[200, 2], [300, 2]], [[-1.0, -1.0]] * 2, [1.0, -1.0])
    worker.train_step(batch, 1)
    worker.publish_weights(2)
    worker.rejoin_weight_transfer(1, None)
    worker.train_step(batch, 2)
    with pytest.raises(SyncError, match="restarted after an optimizer step and before the next sync") as e:
        worker.rejoin_weight_transfer(0, None)
    assert "\n" not in str(e.value) and transport.rejoined == [0, 1]


def test_a_transformers_policy_trains_through_its_own_packed_forward(llama):
    """A transformers causal LM as the RL policy: the update's packed rows score each sequence as the model's own
    plain forward does (no cross-sequence attention), an update moves probability towards the rewarded samples, and
    a sync sends the model's own state dict (its names are the checkpoint's)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    prompt, good, bad = [4, 100, 101, 102, 5], [200, 201, 202, 2], [300, 301, 302, 303, 304, 2]

    def plain_lp(response):
        seq = torch.tensor([prompt + response])
        with torch.no_grad():
            lp = plain(seq).logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
        return lp[len(prompt) - 1:].tolist()

    worker = TrainerWorker(recipe(), str(llama))
    assert not worker.ours
    batch = RolloutBatch([prompt] * 4, [good, bad, good, bad], [plain_lp(r) for r in (good, bad, good, bad)],
                         [1.0, -1.0, 1.0, -1.0])
    seq_lp = lambda r: sum(worker.sequence_logprobs([prompt + r])[0][len(prompt) - 1:])  # noqa: E731
    assert seq_lp(good) == pytest.approx(sum(plain_lp(good)), abs=1e-4)
    before = seq_lp(good), seq_lp(bad)
    metrics = worker.train_step(batch, 1)
    # The four sequences share one packed row: the engine-side logprobs given are the plain forward's.
    assert metrics["train/rollout_logprob_diff"] < 1e-5, metrics
    assert seq_lp(good) > before[0] and seq_lp(bad) < before[1]
    assert [n for n, _ in worker._checkpoint_tensors()] == list(plain.state_dict())


def test_what_rl_implements_for_our_checkpoints_only_is_refused_for_a_transformers_policy(llama):
    from dspost.config import LoraSection

    with pytest.raises(ValueError, match=r"^trainer.lora: implemented for deepseek_v3 checkpoints in RL; the policy "
                                         r"is a LlamaForCausalLM") as e:
        TrainerWorker(recipe(lora=LoraSection()), str(llama))
    assert "\n" not in str(e.value)
