"""Malformed recipes: one stderr line naming the field or path, exit code 2, nothing started."""

import textwrap
from pathlib import Path

import pytest

from dspost.cli import main
from dspost.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
GOOD_SFT = "kind: sft\ntrainer:\n  max_steps: 3\n"

# (name, recipe text, extra CLI args, text the error line must contain)
CASES = [
    ("unknown top-level key", "kind: sft\ntrainr: {}\n", [], "trainr: unknown key"),
    ("unknown nested key", "kind: sft\ntrainer:\n  lrr: 1\n", [], "trainer.lrr: unknown key"),
    ("wrong type", "kind: sft\ntrainer:\n  max_steps: many\n", [], "trainer.max_steps"),
    ("negative lr", "kind: sft\ntrainer:\n  lr: -1\n", [], "trainer.lr"),
    ("missing kind", "trainer: {}\n", [], "kind: must be one of"),
    ("unknown kind", "kind: ppo2\n", [], "kind: must be one of"),
    ("bad literal", "kind: grpo\nalgorithm:\n  loss: ppo\n", [], "algorithm.loss"),
    ("out of bounds", "kind: grpo\nrollout:\n  top_p: 1.5\n", [], "rollout.top_p"),
    ("missing data file", "kind: sft\ndata:\n  path: /nonexistent/train.jsonl\n", [], "data.path: no such file"),
    ("missing model dir", "kind: sft\nmodel:\n  path: /nonexistent/ckpt\n", [], "model.path: no such checkpoint directory"),
    ("indivisible batch", "kind: sft\ntrainer:\n  batch_size: 10\n  grad_accum: 3\n", [], "not divisible"),
    ("not a mapping", "- kind: sft\n", [], "a recipe is a mapping"),
    ("invalid yaml", "kind: sft\ntrainer: [1, 2\n", [], "not valid YAML"),
    ("bad override syntax", GOOD_SFT, ["trainer.lr"], "expected dotted.key=value"),
    ("override into a value", GOOD_SFT, ["trainer.max_steps.x=1"], "trainer.max_steps is a value"),
    ("override unknown key", GOOD_SFT, ["trainer.nope=1"], "trainer.nope: unknown key"),
    ("override bad type", GOOD_SFT, ["trainer.max_steps=abc"], "trainer.max_steps"),
    ("too many CPUs", "kind: sft\ntrainer:\n  num_cpus_per_worker: 4096\n", [], "resources: the plan needs 4096 CPUs"),
    ("GPU on a CPU machine", "kind: grpo\nrollout:\n  num_cpus_per_worker: 1\n  num_gpus_per_worker: 1\ntrainer:\n  num_cpus_per_worker: 1\n",
     [], "GPUs but this machine has"),
    ("pipeline unknown stage ref", "kind: pipeline\nstages:\n  - kind: sft\n    name: a\n  - kind: sft\n    model:\n      from_stage: b\n",
     [], "stages.1.model.from_stage: 'b' is not an earlier stage"),
    ("pipeline duplicate names", "kind: pipeline\nstages:\n  - kind: sft\n    name: a\n  - kind: sft\n    name: a\n",
     [], "duplicate stage name"),
    ("pipeline nested unknown key", "kind: pipeline\nstages:\n  - kind: sft\n    trainer:\n      xx: 1\n",
     [], "stages.0.trainer.xx: unknown key"),
    ("empty reward terms", "kind: grpo\nrewards:\n  terms: []\n", [], "rewards.terms"),
    ("bad fraction", "kind: sft\ndata:\n  max_bad_fraction: 2\n", [], "data.max_bad_fraction"),
    ("max steps zero", GOOD_SFT, ["--max-steps", "0"], "--max-steps: must be at least 1"),
    ("opd without teachers", "kind: opd\n", [], "teachers"),
    ("unsupported dtype", "kind: sft\nmodel:\n  dtype: float16\n", [], "model.dtype"),
    ("greedy group", "kind: grpo\nrollout:\n  n: 4\n  temperature: 0\n", [], "rollout: n=4 samples per prompt need temperature > 0"),
    ("greedy eval samples", "kind: grpo\neval:\n  n: 4\n", [], "eval: n=4 samples per problem need temperature > 0"),
    ("missing reference set", "kind: eval_rm\nreference: /nonexistent/ref.jsonl\n", [], "reference: no such file"),
    ("missing critic dir", "kind: eval_rm\ncritic: /nonexistent/rm\n", [], "critic: /nonexistent/rm: no such checkpoint"),
    ("unknown rule critic", "kind: eval_rm\ncritic: rule:nope\n", [], "critic: unknown rule 'nope'"),
    ("non-pair data format", "kind: eval_rm\ndata:\n  format: xml\n", [], "data.format"),
    ("meta-critic without a critic term", "kind: grpo\nrewards:\n  meta_critic: {policy: gate}\n", [],
     "meta_critic: needs a critic term"),
    ("meta-critic bad policy", "kind: grpo\nrewards:\n  terms: [{name: 'critic:length'}]\n  meta_critic: {policy: drop}\n",
     [], "rewards.meta_critic.policy"),
    ("judge as a reward term", "kind: grpo\nrewards:\n  terms: [{name: 'critic:judge:/x'}]\n", [], "cannot score one"),
    ("unknown training precision", "kind: sft\ntrainer:\n  quantization: int4\n", [], "trainer.quantization"),
    ("fp8 RL on CPU engines", "kind: grpo\ntrainer:\n  quantization: fp8\n", [], "trainer.quantization: low-precision RL"),
    ("quantise-on-sync on CPU engines", "kind: grpo\nsync:\n  quantize: fp8\n", [], "sync.quantize: vLLM serves FP8 only"),
]


@pytest.mark.parametrize("name,text,extra,expect", CASES, ids=[c[0] for c in CASES])
def test_malformed_recipe(tmp_path, capsys, monkeypatch, name, text, extra, expect):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    code = main(["run", str(recipe), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert expect in err, err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_missing_recipe_file(capsys):
    assert main(["run", "/nonexistent/recipe.yaml"]) == 2
    assert "no such recipe file" in capsys.readouterr().err


def test_at_least_twenty_malformed_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_plan(recipe, capsys):
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "resource plan:" in out and "kind:" in out


def test_overrides_and_max_steps(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: grpo\ntrainer:\n  max_steps: 50\n")
    r = load_recipe(recipe, ["trainer.lr=3e-4", 'rollout.stop=["\\n\\n"]', "output_dir=out/x"], max_steps=7)
    assert r.trainer.lr == 3e-4 and r.rollout.stop == ["\n\n"] and r.output_dir == "out/x"
    assert r.trainer.max_steps == 7 and r.trainer.eval_every <= 7
    assert r.name == "r"


def test_recipe_schema_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, dspost.config, dspost.recipe, dspost.plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_dry_run_shows_actor_plan(capsys):
    assert main(["run", str(REPO / "recipes" / "grpo_math.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rollout[0]" in out and "trainer[0]" in out and "vLLM engine" in out


def test_every_field_is_documented():
    from dspost.config import RECIPE_KINDS

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            ann = field.annotation
            for sub in getattr(ann, "__args__", ()) + (ann,):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub, f"{prefix}{name}.")

    for kind, cls in RECIPE_KINDS.items():
        walk(cls, f"{kind}:")


def test_help_for_each_command(capsys):
    for cmd in (["--help"], ["run", "--help"], ["doctor", "--help"], ["plot", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert "dry-run" in capsys.readouterr().out


def test_a_partly_overridden_section_keeps_the_kinds_defaults(tmp_path):
    recipe = tmp_path / "g.yaml"
    recipe.write_text("kind: grpo\ntrainer:\n  num_cpus_per_worker: 1\n")
    loaded = load_recipe(recipe, ["trainer.max_steps=5"])
    assert loaded.trainer.lr == 1e-5 and loaded.trainer.eval_every == 10  # GRPO's defaults
    assert loaded.trainer.max_steps == 5 and loaded.trainer.num_cpus_per_worker == 1
    assert load_recipe(recipe, ["trainer.lr=0.1"]).trainer.lr == 0.1  # the recipe's own value wins
