"""SFT through the CLI: the run-directory contract, and a resumed run repeating the uninterrupted one."""

import json

import pytest

from dspost.cli import main
from dspost.rundir import read_metrics

ARGS = ["model.warm_start=false", "data.num_train=64", "data.num_eval=8", "data.max_seq_len=128",
        "trainer.batch_size=8", "trainer.grad_accum=2", "trainer.eval_every=2", "trainer.save_every=2",
        "trainer.warmup_steps=1", "trainer.lr=1e-3"]


def run(sft_recipe, out, *extra):
    assert main(["run", str(sft_recipe), f"output_dir={out}", *ARGS, *extra]) == 0


def test_run_directory_contract(sft_recipe, tmp_path):
    out = tmp_path / "run"
    run(sft_recipe, out, "--max-steps", "4")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("train/loss" in r for r in rows)
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in rows if "eval/accuracy" in r)
    assert (out / "config.yaml").is_file() and (out / "run.log").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"train.png", "eval.png"}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    ckpt = out / "checkpoints" / "step_4"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left
    assert main(["plot", str(out)]) == 0


def test_resume_repeats_the_uninterrupted_run_exactly(sft_recipe, tmp_path):
    run(sft_recipe, tmp_path / "full", "--max-steps", "6")
    run(sft_recipe, tmp_path / "cut", "--max-steps", "2")
    run(sft_recipe, tmp_path / "cut", "--max-steps", "6", "resume=true")
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in cut] == [r["train/loss"] for r in full]
    assert [r.get("eval/loss") for r in cut] == [r.get("eval/loss") for r in full]


def test_bad_rows_are_counted_and_stop_the_run_past_the_limit(sft_recipe, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"\\boxed{{{i + 1}}}"} for i in range(30)]
    rows += [{"prompt": "empty", "completion": ""}] * 10
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["run", str(sft_recipe), f"output_dir={tmp_path / 'o'}", *ARGS, f"data.path={data}", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "10/40 rows are bad" in err and "missing or empty 'completion'" in err and "row 30" in err
    code = main(["run", str(sft_recipe), f"output_dir={tmp_path / 'o2'}", *ARGS, f"data.path={data}",
                 "data.max_bad_fraction=0.5", "--max-steps", "1"])
    assert code == 0


def test_packed_rows_train_like_separate_sequences():
    """A packed row gives each sample the loss and logits it has alone: attention, positions and targets
    restart at every boundary (MTP included)."""
    import torch

    from dspost.model import DeepseekV3
    from dspost.data.packing import Tokenized, collate, collate_packed, pack
    from tests.model.conftest import small_args

    model = DeepseekV3(small_args()).init_weights(0).eval()
    g = torch.Generator().manual_seed(0)
    samples = [Tokenized(ids := torch.randint(6, 90, (n,), generator=g).tolist(), [-100] * 2 + ids[2:])
               for n in (7, 5, 9, 4)]
    rows = pack(samples, max_len=16)
    assert rows[0].segments == [0] * 7 + [1] * 5 and rows[1].segments == [0] * 9 + [1] * 4
    ids, labels, segments, positions = collate_packed(rows, pad_id=0)
    assert positions[0].tolist()[:12] == list(range(7)) + list(range(5))
    packed_out = model(ids, labels=labels, segment_ids=segments, position_ids=positions)
    alone_ids, alone_labels = collate(samples[:2], pad_id=0)
    for k, (start, n) in enumerate([(0, 7), (7, 5)]):
        alone = model(alone_ids[k:k + 1, :n]).logits[0]
        assert torch.allclose(packed_out.logits[0, start:start + n], alone, atol=1e-5)
        assert torch.equal(labels[0, start:start + n], alone_labels[k, :n])
    # Loss over the same target tokens: the packed batch equals the samples one by one.
    total = n_tok = 0
    for s in samples:
        i, lab = collate([s], pad_id=0)
        out = model(i, labels=lab)
        k = int((lab != -100).sum())
        total, n_tok = total + out.lm_loss.item() * k, n_tok + k
    assert abs(packed_out.lm_loss.item() - total / n_tok) < 1e-4


def test_padding_free_row_gives_the_padded_batch_loss_and_gradients():
    """A micro-batch as one row without pad tokens (samples, or packed rows renumbered) trains exactly like the
    padded batch: same next-token and MTP losses, same gradients."""
    import torch

    from dspost.model import DeepseekV3
    from dspost.data.packing import Tokenized, collate, collate_packed, one_row, pack
    from tests.model.conftest import small_args

    model = DeepseekV3(small_args()).init_weights(0).train()
    g = torch.Generator().manual_seed(1)
    samples = [Tokenized(ids := torch.randint(6, 90, (n,), generator=g).tolist(), [-100] * 3 + ids[3:])
               for n in (7, 12, 5, 9, 16)]

    def loss_and_grads(ids, labels, segments=None, positions=None):
        model.zero_grad()
        out = model(ids, labels=labels, segment_ids=segments, position_ids=positions)
        out.loss.backward()
        return out.lm_loss.item(), [x.item() for x in out.mtp_losses], [p.grad.clone() for p in model.parameters()]

    padded = loss_and_grads(*collate(samples, pad_id=0))
    for row in (one_row(samples), one_row(pack(samples, max_len=20))):
        assert row.segments == sum(([k] * len(s.input_ids) for k, s in enumerate(samples)), [])
        ids, labels, segments, positions = collate_packed([row], pad_id=0)
        assert ids.shape == (1, sum(len(s.input_ids) for s in samples))
        free = loss_and_grads(ids, labels, segments, positions)
        assert free[0] == pytest.approx(padded[0], abs=1e-5) and free[1] == pytest.approx(padded[1], abs=1e-5)
        for a, b in zip(free[2], padded[2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_sft_run(sft_recipe, tmp_path):
    out = tmp_path / "packed"
    run(sft_recipe, out, "data.pack=true", "--max-steps", "2")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/loss"] > 0 for r in rows)
