"""Run directories lose nothing silently: torn metrics, a dangling `latest`, a changed recipe on resume, pickles
in a checkpoint, killed writers' temporaries, durability of `latest`, and no NaN checkpoint ever marked latest."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from dspost.recipe import validate_recipe
from dspost.rundir import RunDir, read_metrics

SFT = {"kind": "sft", "model": {"warm_start": False}, "trainer": {"max_steps": 4, "save_every": 2}}


def recipe(root, resume=False, **sections):
    raw = {**SFT, "output_dir": str(root), "resume": resume}
    for section, fields in sections.items():
        raw[section] = {**raw.get(section, {}), **fields} if isinstance(fields, dict) else fields
    return validate_recipe(raw)


def finished_run(root, step=2, rows=4):
    """A run directory as a run that saved `step` (a stand-in checkpoint) and logged `rows` steps leaves it."""
    RunDir(root, recipe(root))
    (root / "checkpoints" / f"step_{step}").mkdir()
    (root / "checkpoints" / "latest").write_text(f"step_{step}\n")
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n"
                                                for s in range(1, rows + 1)))


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------ metrics
def test_torn_last_metrics_line_is_dropped_and_resume_rewrites_the_file(tmp_path):
    finished_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    run = RunDir(tmp_path, recipe(tmp_path, resume=True))
    assert run.resume_from == tmp_path / "checkpoints" / "step_2"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.5}\n'
    run.log_metrics(3, {"train/loss": 0.25})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_malformed_metrics_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError) as e:
        read_metrics(tmp_path)
    assert f"{tmp_path / 'metrics.jsonl'}:2: not a JSON object" in one_line_error(e)


def test_a_start_from_step_0_drops_the_rows_of_an_attempt_that_saved_nothing(tmp_path):
    RunDir(tmp_path, recipe(tmp_path)).log_metrics(1, {"train/loss": 1.0})  # killed before its first save
    run = RunDir(tmp_path, recipe(tmp_path, resume=True))
    assert run.latest_checkpoint() is None and read_metrics(tmp_path) == []


# ------------------------------------------------------------------------------------------- latest
def test_latest_naming_a_missing_directory_is_an_error(tmp_path):
    finished_run(tmp_path)
    (tmp_path / "checkpoints" / "step_2").rmdir()
    with pytest.raises(ValueError) as e:
        RunDir(tmp_path, recipe(tmp_path, resume=True))
    msg = one_line_error(e)
    assert f"{tmp_path / 'checkpoints' / 'latest'} names step_2" in msg and "does not exist" in msg
    assert "point latest at an existing step_N" in msg


def test_first_run_with_resume_starts_from_step_0(tmp_path):
    run = RunDir(tmp_path / "fresh", recipe(tmp_path / "fresh", resume=True))  # as the warm-start cache does
    assert run.latest_checkpoint() is None and (tmp_path / "fresh" / "config.yaml").is_file()


def test_a_fresh_run_into_a_directory_holding_one_is_refused(tmp_path):
    finished_run(tmp_path)
    with pytest.raises(ValueError) as e:
        RunDir(tmp_path, recipe(tmp_path))
    assert "already holds a run" in one_line_error(e) and "resume=true" in str(e.value)


# ------------------------------------------------------------------------------------------- config
def test_resume_refuses_a_changed_recipe_naming_the_field(tmp_path):
    finished_run(tmp_path)
    stored = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError) as e:
        RunDir(tmp_path, recipe(tmp_path, resume=True, trainer={"lr": 2e-3}))
    assert "trainer.lr from 0.001 to 0.002" in one_line_error(e)
    with pytest.raises(ValueError, match=r"data.difficulty.1 from 2 to 3"):
        RunDir(tmp_path, recipe(tmp_path, resume=True, data={"difficulty": [1, 3]}))
    with pytest.raises(ValueError, match=r"trainer.lora from null to \{"):
        RunDir(tmp_path, recipe(tmp_path, resume=True, trainer={"lora": {"r": 4}}))
    assert (tmp_path / "config.yaml").read_text() == stored


def test_resume_accepts_new_length_cadence_and_placement_and_stores_them(tmp_path):
    finished_run(tmp_path)
    moved = tmp_path.rename(tmp_path.with_name(tmp_path.name + "-moved"))
    changed = recipe(moved, resume=True, name="again", trainer={"max_steps": 8, "eval_every": 3, "save_every": 4,
                                                                "num_threads": 2, "num_cpus_per_worker": 1,
                                                                "resources": {"trainer": 1}},
                     ray={"address": "auto", "num_cpus": 4})
    run = RunDir(moved, changed)
    assert run.resume_from == moved / "checkpoints" / "step_2"
    stored = yaml.safe_load((moved / "config.yaml").read_text())
    assert stored["trainer"]["max_steps"] == 8 and stored["ray"]["address"] == "auto" and stored["resume"] is True


# ------------------------------------------------------------------------------------- trainer state
def _trained_optimizer():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_trainer_state_loads_optimizer_rng_and_extra_fields(tmp_path):
    from dspost.training import load_training_state

    model, opt = _trained_optimizer()
    torch.manual_seed(7)
    torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "step": 3, "opt_steps": 6},
               tmp_path / "trainer_state.pt")
    expected = torch.rand(3)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    state = load_training_state(tmp_path, fresh)
    assert state["step"] == 3 and state["opt_steps"] == 6 and torch.equal(torch.rand(3), expected)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    assert fresh.param_groups[0]["betas"] == (0.9, 0.95)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_trainer_state_whose_unpickling_runs_code_is_refused(tmp_path):
    from dspost.training import load_training_state

    model, opt = _trained_optimizer()
    marker = tmp_path / "pwned"
    torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "step": 1,
                "note": _RunsCode(str(marker))}, tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError) as e:
        load_training_state(tmp_path, torch.optim.AdamW(model.parameters()))
    msg = one_line_error(e)
    assert not marker.exists()
    assert str(tmp_path / "trainer_state.pt") in msg and "refused" in msg and "mkdir" in msg


# ---------------------------------------------------------------------------------- killed writers
WRITER = """
import sys
from pathlib import Path
from dspost.model.checkpoint import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_text("weights")
    print("writing", flush=True)
    sys.stdin.readline()
"""


def _writer(path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc


def test_opening_removes_killed_writers_temporaries_and_keeps_live_ones(tmp_path):
    ckpts = tmp_path / "checkpoints"
    killed, live = _writer(ckpts / "step_2"), _writer(ckpts / "step_4")
    try:
        assert killed.stdout.readline() == "writing\n" and live.stdout.readline() == "writing\n"
        killed.kill()
        killed.wait()
        (ckpts / ".latest.tmp-999999").write_text("step_")  # a torn `latest` of a killed writer
        temporaries = sorted(p.name for p in ckpts.iterdir())
        assert len(temporaries) == 3
        RunDir(tmp_path)
        left = [p.name for p in ckpts.iterdir()]
        assert len(left) == 1 and left[0].startswith(".step_4.tmp-")  # the live writer's, untouched
        live.stdin.write("\n")
        live.stdin.close()
        assert live.wait(timeout=60) == 0
        assert [p.name for p in ckpts.iterdir()] == ["step_4"]
        assert (ckpts / "step_4" / "model.safetensors").read_text() == "weights"
    finally:
        for p in (killed, live):
            if p.poll() is None:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------------- durability
def test_latest_is_fsynced_before_and_after_its_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(a), str(b))),
                                                     real_replace(a, b))[1])
    run = RunDir(tmp_path)
    events.clear()
    run.mark_latest(4)
    ckpts = str(tmp_path / "checkpoints")
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 1 and events[renames[0]][2] == ckpts + "/latest"
    tmp = events[renames[0]][1]
    assert ("fsync", tmp) in events[:renames[0]]  # the content is on disk before the name points at it
    assert ("fsync", ckpts) in events[renames[0]:]  # and the rename itself after
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_4\n"


# ------------------------------------------------------------------------------------ finiteness
def test_a_nan_weight_is_never_saved_nor_marked_latest(tmp_path):
    from dspost.model import DeepseekV3
    from dspost.training import save_checkpoint
    from tests.model.conftest import small_args

    run = RunDir(tmp_path)
    model = DeepseekV3(small_args()).init_weights(0)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(run, model, None, opt, 2)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 3] = float("nan")
    with pytest.raises(RuntimeError) as e:
        save_checkpoint(run, model, None, opt, 4)
    assert one_line_error(e) == ("step 4: a weight to save is not finite "
                                 "(model.layers.1.self_attn.o_proj.weight: nan, 1 of 2048 values)")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2\n"


def test_check_finite_names_the_step_and_tensor_and_ignores_overflowing_sums():
    from dspost.training import NonFiniteError, check_finite

    check_finite(1, "loss", 0.5)
    check_finite(1, "a weight", [("big", torch.full((4,), 3e38)), ("bf16", torch.ones(3, dtype=torch.bfloat16))])
    with pytest.raises(NonFiniteError, match=r"^step 3: loss is not finite \(nan\)$"):
        check_finite(3, "loss", float("nan"))
    with pytest.raises(NonFiniteError, match=r"^step 5: gradient norm is not finite \(inf\)$"):
        check_finite(5, "gradient norm", torch.tensor(float("inf")))
    w = torch.zeros(2, 3, dtype=torch.bfloat16)
    w[1, 2] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"^step 7: a weight is not finite \(layer.w: -inf, 1 of 6 values\)$"):
        check_finite(7, "a weight", [("ok", torch.ones(2)), ("layer.w", w)])


# ------------------------------------------------------------------------------------------- CLI
def test_cli_resume_over_a_torn_line_and_its_one_line_refusals(sft_recipe, tmp_path, capsys):
    from dspost.cli import main

    out, data = tmp_path / "run", tmp_path / "d.jsonl"
    # Rows without a gold answer: the held-out evaluation is the loss alone (greedy decoding would take a minute).
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f"{i + 1}"}) + "\n" for i in range(40)))
    args = ["run", str(sft_recipe), f"output_dir={out}", "model.warm_start=false", f"data.path={data}",
            "data.num_eval=8", "data.max_seq_len=64", "trainer.batch_size=4", "trainer.save_every=2"]
    assert main([*args, "--max-steps", "2"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/')
    assert main([*args, "resume=true", "trainer.lr=5e-4", "--max-steps", "3"]) == 2
    assert "trainer.lr from 0.001 to 0.0005" in capsys.readouterr().err.strip()
    assert main([*args, "resume=true", "--max-steps", "3"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    (out / "checkpoints" / "latest").write_text("step_9\n")
    capsys.readouterr()
    assert main([*args, "resume=true", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latest names step_9" in err
