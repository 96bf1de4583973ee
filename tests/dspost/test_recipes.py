"""Malformed recipes: one stderr line naming the field or path, exit code 2, nothing started."""

from pathlib import Path

import pytest

from dspost.cli import main
from dspost.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
GOOD_SFT = "kind: sft\ntrainer:\n  max_steps: 3\n"
GOOD_GRPO = "kind: grpo\nrollout:\n  num_cpus_per_worker: 1\ntrainer:\n  num_cpus_per_worker: 1\n"


def terms(*items: str) -> str:
    """A GRPO recipe whose rewards.terms are the given YAML flow mappings."""
    return GOOD_GRPO + f"rewards:\n  terms: [{', '.join(items)}]\n"


def make_workspace(root: Path) -> None:
    """Paths the CASES name, relative to the directory the CLI runs in."""
    (root / "empty").mkdir()
    (root / "rows").mkdir()
    (root / "rows" / "train.jsonl").write_text('{"question": "1+1", "answer": "#### 2"}\n')
    (root / "dd").mkdir()
    (root / "dd" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    (root / "noconfig").mkdir()
    (root / "noconfig" / "model.safetensors").write_bytes(b"")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "config.json").write_text("{}")
    (root / "cfg_rewards_broken.py").write_text("raise RuntimeError('boom')\n")
    (root / "cfg_rewards_ok.py").write_text("NOT_FN = 3\n\n\ndef score(response, example, scale=1.0):\n"
                                            "    return scale\n")


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
    ("missing model dir", "kind: sft\nmodel:\n  path: /nonexistent/ckpt\n",
     [], "model.path: no such checkpoint directory"),
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
    ("merge scale without a merge", "kind: opd\nteachers: [{path: t}]\nopd: {merge_scale: 0.5}\n", [],
     "opd.merge_scale: applies to opd.init: task_arithmetic only"),
    ("unsupported dtype", "kind: sft\nmodel:\n  dtype: float16\n", [], "model.dtype"),
    ("greedy group", "kind: grpo\nrollout:\n  n: 4\n  temperature: 0\n",
     [], "rollout: n=4 samples per prompt need temperature > 0"),
    ("greedy eval samples", "kind: grpo\neval:\n  n: 4\n", [], "eval: n=4 samples per problem need temperature > 0"),
    ("missing reference set", "kind: eval_rm\nreference: /nonexistent/ref.jsonl\n", [], "reference: no such file"),
    ("missing critic dir", "kind: eval_rm\ncritic: /nonexistent/rm\n",
     [], "critic: /nonexistent/rm: no such checkpoint"),
    ("unknown rule critic", "kind: eval_rm\ncritic: rule:nope\n", [], "critic: unknown rule 'nope'"),
    ("non-pair data format", "kind: eval_rm\ndata:\n  format: xml\n", [], "data.format"),
    ("meta-critic without a critic term", "kind: grpo\nrewards:\n  meta_critic: {policy: gate}\n", [],
     "meta_critic: needs a critic term"),
    ("meta-critic bad policy", "kind: grpo\nrewards:\n  terms: [{name: 'critic:length'}]\n  meta_critic: {policy: drop}\n",
     [], "rewards.meta_critic.policy"),
    ("judge as a reward term", "kind: grpo\nrewards:\n  terms: [{name: 'critic:judge:/x'}]\n", [], "cannot score one"),
    ("unknown training precision", "kind: sft\ntrainer:\n  quantization: int4\n", [], "trainer.quantization"),
    ("fp8 RL on CPU engines", "kind: grpo\ntrainer:\n  quantization: fp8\n",
     [], "trainer.quantization: low-precision RL"),
    ("quantise-on-sync on CPU engines", "kind: grpo\nsync:\n  quantize: fp8\n",
     [], "sync.quantize: vLLM serves FP8 only"),
    # Paths of the wrong kind (make_workspace creates them).
    ("data path an empty directory", "kind: sft\ndata:\n  path: empty\n", [], "data.path: empty: empty directory"),
    ("data path a directory of files", "kind: sft\ndata:\n  path: rows\n", [],
     "data.path: rows: a directory that is not a saved `datasets` dataset"),
    ("eval path an empty directory", "kind: sft\ndata:\n  path: rows/train.jsonl\n  eval_path: empty\n", [],
     "data.eval_path: empty: empty directory"),
    ("saved DatasetDict without train", "kind: sft\ndata:\n  path: dd\n",
     [], "data.path: dd: the saved DatasetDict has no `train`"),
    ("pipeline data path empty", "kind: pipeline\nstages:\n  - kind: sft\n    data:\n      path: empty\n", [],
     "stages.0.data.path: empty: empty directory"),
    ("model dir without config.json", "kind: sft\nmodel:\n  path: noconfig\n",
     [], "model.path: noconfig: no config.json"),
    ("teacher named by stage outside a pipeline", "kind: opd\nteachers:\n  - from_stage: grpo\n", [],
     "teachers.0.from_stage: 'grpo' names a pipeline stage"),
    ("model named by stage outside a pipeline", "kind: sft\nmodel:\n  from_stage: a\n", [],
     "model.from_stage: 'a' names a pipeline stage"),
    ("teacher dir without config.json", "kind: opd\nteachers:\n  - path: noconfig\n",
     [], "teachers.0.path: noconfig: no config.json"),
    ("missing meta-critic reference",
     terms("{name: 'critic:length'}") + "  meta_critic: {reference: /nonexistent/r.jsonl}\n",
     [], "rewards.meta_critic.reference: no such file"),
    # Reward terms resolved before anything starts.
    ("unknown reward name", terms("{name: mth}"), [], "rewards.terms.0.name: unknown reward 'mth'"),
    ("reward module missing", terms("{name: math}", "{name: 'no_such_pkg_xyz.mod:fn'}"), [],
     "rewards.terms.1.name: cannot import reward 'no_such_pkg_xyz.mod:fn'"),
    ("reward module raises", terms("{name: 'cfg_rewards_broken:score'}"), [],
     "rewards.terms.0.name: cannot import reward 'cfg_rewards_broken:score': RuntimeError: boom"),
    ("reward function missing", terms("{name: 'cfg_rewards_ok:nope'}"),
     [], "rewards.terms.0.name: cannot import reward"),
    ("reward not a function", terms("{name: 'cfg_rewards_ok:NOT_FN'}"),
     [], "rewards.terms.0.name: 'cfg_rewards_ok:NOT_FN' is not a function"),
    ("unknown reward option", terms("{name: code, options: {partail: true}}"), [],
     "rewards.terms.0.options: got an unexpected keyword argument 'partail'"),
    ("unknown rule critic term", terms("{name: 'critic:rule:nope'}"), [], "rewards.terms.0.name: unknown rule 'nope'"),
    ("missing critic term dir", terms("{name: 'critic:/nonexistent/rm'}"),
     [], "rewards.terms.0.name: no such checkpoint directory"),
    ("critic term dir without config", terms("{name: 'critic:noconfig'}"),
     [], "rewards.terms.0.name: noconfig: no config.json"),
    ("options on a critic term", terms("{name: 'critic:length', options: {x: 1}}"), [],
     "rewards.terms.0.options: critic terms take no options"),
    ("pipeline unknown reward",
     "kind: pipeline\nstages:\n  - kind: sft\n  - kind: grpo\n    rewards:\n      terms: [{name: mth}]\n",
     [], "stages.1.rewards.terms.0.name: unknown reward 'mth'"),
    # Groups and finite, meaningful bounds.
    ("group of one", GOOD_GRPO + "rollout:\n  n: 1\n", [], "rollout.n: gspo compares the samples of a prompt's group"),
    ("pipeline group of one",
     "kind: pipeline\nstages:\n  - kind: grpo\n    algorithm: {loss: dr_grpo}\n    rollout: {n: 1}\n",
     [], "stages.0.rollout.n: dr_grpo compares"),
    ("nan in yaml", "kind: sft\ntrainer:\n  lr: .nan\n", [], "trainer.lr: Input should be a finite number"),
    ("inf in yaml", "kind: sft\nmodel:\n  mtp_loss_weight: .inf\n",
     [], "model.mtp_loss_weight: Input should be a finite number"),
    ("nan override", GOOD_GRPO,
     ["sync.parity_threshold=nan"], "sync.parity_threshold: Input should be a finite number"),
    ("inf override", GOOD_GRPO, ["algorithm.kl_beta=inf"], "algorithm.kl_beta: Input should be a finite number"),
    ("nan in a resources map", "kind: sft\ntrainer:\n  resources: {node: .nan}\n",
     [], "trainer.resources.node: Input should be a finite"),
    ("nan beta", "kind: sft\ntrainer:\n  betas: [0.9, .nan]\n", [], "trainer.betas.1: Input should be a finite"),
    ("nan reward option", terms("{name: format, options: {max_chars: .nan}}"), [],
     "rewards.terms.0.options.max_chars: must be a finite number"),
    ("inf reward weight", terms("{name: math, weight: .inf}"), [], "rewards.terms.0.weight: Input should be a finite"),
    ("huge reward weight", terms("{name: math, weight: 1.0e+6}"),
     [], "rewards.terms.0.weight: Input should be less than or equal to 1000"),
    ("zero reward timeout", GOOD_GRPO + "rewards:\n  timeout: 0\n",
     [], "rewards.timeout: Input should be greater than 0"),
    ("day-long reward timeout", GOOD_GRPO + "rewards:\n  timeout: 86400\n",
     [], "rewards.timeout: Input should be less than or equal to 600"),
    ("error fraction above one", GOOD_GRPO + "rewards:\n  max_error_fraction: 1.5\n", [],
     "rewards.max_error_fraction: Input should be less than or equal to 1"),
    ("parity threshold that checks nothing", GOOD_GRPO + "sync:\n  parity_threshold: 100\n", [],
     "sync.parity_threshold: Input should be less than or equal to 1"),
    ("temperature above vLLM's", GOOD_GRPO + "rollout:\n  temperature: 3\n",
     [], "rollout.temperature: Input should be less than or equal to 2"),
    ("temperature vLLM would raise", GOOD_GRPO + "rollout:\n  temperature: 0.005\n", [],
     "rollout.temperature: vLLM raises a temperature in (0, 0.01)"),
    ("eval temperature above vLLM's", GOOD_GRPO + "eval:\n  temperature: 5\n",
     [], "eval.temperature: Input should be less than or equal to 2"),
    ("nan eval top_p", GOOD_GRPO + "eval:\n  top_p: .nan\n", [], "eval.top_p: Input should be a finite number"),
    ("no new tokens", GOOD_GRPO + "rollout:\n  max_tokens: 0\n",
     [], "rollout.max_tokens: Input should be greater than or equal to 1"),
    ("ten million new tokens", GOOD_GRPO + "rollout:\n  max_tokens: 10000000\n", [],
     "rollout.max_tokens: Input should be less than or equal to 1000000"),
    ("overlong buffer covers every token", GOOD_GRPO + "algorithm:\n  loss: dapo\nrollout:\n  max_tokens: 16\n", [],
     "algorithm.overlong_buffer: 16 is not below rollout.max_tokens=16"),
    ("eps_low of one", GOOD_GRPO + "algorithm:\n  eps_low: 1.0\n",
     [], "algorithm.eps_low: Input should be less than 1"),
    ("eps_high of five", GOOD_GRPO + "algorithm:\n  eps_high: 5\n",
     [], "algorithm.eps_high: Input should be less than or equal to 1"),
    ("seq_eps_low of one", GOOD_GRPO + "algorithm:\n  seq_eps_low: 1\n",
     [], "algorithm.seq_eps_low: Input should be less than 1"),
    ("seq_eps_high of two", GOOD_GRPO + "algorithm:\n  seq_eps_high: 2\n",
     [], "algorithm.seq_eps_high: Input should be less than or equal to 1"),
    ("terabyte bucket", GOOD_GRPO + "sync:\n  bucket_mb: 1000000\n",
     [], "sync.bucket_mb: Input should be less than or equal to 4096"),
    ("beta of one", "kind: sft\ntrainer:\n  betas: [0.9, 1.0]\n", [], "trainer.betas.1: Input should be less than 1"),
    ("negative beta", "kind: sft\ntrainer:\n  betas: [-0.1, 0.9]\n",
     [], "trainer.betas.0: Input should be greater than or equal to 0"),
    ("negative trainer seed", GOOD_SFT,
     ["trainer.seed=-1"], "trainer.seed: Input should be greater than or equal to 0"),
    ("trainer seed past numpy's", GOOD_SFT,
     ["trainer.seed=4294967296"], "trainer.seed: Input should be less than 4294967296"),
    ("negative data seed", "kind: sft\ndata:\n  seed: -3\n",
     [], "data.seed: Input should be greater than or equal to 0"),
    ("huge data seed", "kind: sft\ndata:\n  seed: 1099511627776\n",
     [], "data.seed: Input should be less than 4294967296"),
    ("negative bootstrap seed", "kind: eval_rm\nseed: -1\n", [], "seed: Input should be greater than or equal to 0"),
    ("steps past the seed range", GOOD_SFT,
     ["trainer.max_steps=10000000000"], "trainer.max_steps: Input should be less than or equal to"),
    ("reward term of an unknown domain", "kind: grpo\ndata:\n  sources: [{name: math, synthetic: math}]\n"
     "rewards:\n  terms: [{name: math, domains: [code]}]\n", [], "rewards.terms.0.domains: 'code' is not a data source"),
    ("duplicate source names", "kind: sft\ndata:\n  sources: [{name: a, synthetic: math}, {name: a, synthetic: math}]\n",
     [], "data.sources: duplicate source names"),
    ("source with two origins", "kind: sft\ndata:\n  sources: [{name: a, synthetic: math, path: rows}]\n", [],
     "set exactly one of synthetic and path"),
    ("sources beside data.path", "kind: sft\ndata:\n  path: rows\n  sources: [{name: a, synthetic: math}]\n", [],
     "give files inside data.sources[]"),
    ("missing source file", "kind: sft\ndata:\n  sources: [{name: a, path: /nonexistent/x.jsonl}]\n", [],
     "data.sources.0.path: no such file"),
    # Options a stage would ignore are refused, not accepted and dropped.
    ("batch size of an RL step", "kind: grpo\ntrainer:\n  batch_size: 32\n", [],
     "trainer.batch_size: an RL step trains on its rollout"),
    ("rollout engine choice", "kind: grpo\nrollout:\n  engine: vllm\n", [], "rollout.engine: unknown key"),
    ("routing replay", "kind: grpo\nalgorithm:\n  routing_replay: true\n", [], "algorithm.routing_replay: unknown key"),
    ("a later stage that cannot start", "kind: pipeline\nstages:\n  - kind: sft\n    name: a\n"
     "  - kind: opd\n    name: b\n    teachers: [{path: noconfig}]\n", [], "stages.1.teachers.0.path: noconfig: no config.json"),
]


@pytest.mark.parametrize("name,text,extra,expect", CASES, ids=[c[0] for c in CASES])
def test_malformed_recipe(tmp_path, capsys, monkeypatch, name, text, extra, expect):
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the cfg_rewards_* modules
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    for dry in (["--dry-run"], []):  # the dry run first: on a schema that accepts the recipe, nothing runs
        code = main(["run", str(recipe), *extra, *dry])
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1, err
        assert expect in err, err
        assert not captured.out  # a dry run prints no plan for a recipe it refuses
        assert not (tmp_path / "runs").exists()  # nothing started


def test_recipe_that_is_not_utf8(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("kind: sft\nname: café\n".encode("latin-1"))
    for dry in (["--dry-run"], []):
        assert main(["run", str(recipe), *dry]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [f"error: {recipe}: not UTF-8 text (invalid continuation byte at byte 19)"]


def test_files_and_saved_datasets_still_load(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_list([{"question": f"{i}+1", "answer": f"#### {i + 1}"} for i in range(4)])
    rows.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "dd"))
    rows.to_json(str(tmp_path / "rows.jsonl"))
    monkeypatch.chdir(tmp_path)
    for path in ("ds", "dd", "rows.jsonl"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"kind: sft\ndata:\n  path: {path}\n  eval_path: {path}\n")
        assert main(["run", str(recipe), "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()


def test_valid_rewards_and_bounds_are_accepted(tmp_path, monkeypatch):
    make_workspace(tmp_path)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(terms("{name: math}", "{name: code, options: {partial: true}}",
                            "{name: 'cfg_rewards_ok:score', options: {scale: 2}}", "{name: format, weight: -0.5}",
                            "{name: 'critic:rm'}", "{name: 'critic:rule:math'}"))
    r = load_recipe(recipe, ["rollout.temperature=0.01", "trainer.seed=4294967295", "trainer.betas=[0, 0.999]"])
    assert [t.weight for t in r.rewards.terms][3] == -0.5  # a penalty
    assert r.rewards.max_error_fraction == 0.05 and r.rollout.temperature == 0.01
    again = load_recipe(recipe, ["rewards.max_error_fraction=0.2", "algorithm.loss=dapo"])
    assert again.rewards.max_error_fraction == 0.2


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

    # Loading a GRPO recipe resolves its reward terms; that must not pull in torch, sympy or vLLM either.
    code = ("import sys, dspost.config, dspost.recipe, dspost.plan; "
            f"dspost.recipe.load_recipe({str(REPO / 'recipes' / 'grpo_math.yaml')!r}); "
            "sys.exit(bool({'torch', 'sympy', 'vllm'} & set(sys.modules)))")
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


@pytest.mark.parametrize("check,text,field", [
    ("sandbox_unavailable", "kind: grpo\nrewards:\n  terms: [{name: code}]\n", "rewards.terms.0.name"),
    ("pool_unavailable", "kind: grpo\n", "kind: grpo"),
    ("pool_unavailable", "kind: sft\n", "kind: sft"),
])
def test_a_run_that_needs_an_unavailable_sandbox_is_refused_before_it_starts(tmp_path, capsys, monkeypatch, check,
                                                                              text, field):
    """Code rewards need the bubblewrap sandbox and every grading stage the network-isolated scoring pool: where
    they cannot be set up the run is refused in one line, not trained on `error` verdicts."""
    from dspost.rewards import pool, sandbox

    monkeypatch.setattr(pool if check == "pool_unavailable" else sandbox, check,
                        lambda: "bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    for dry in (["--dry-run"], []):
        assert main(["run", str(recipe), *dry]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {field}: bubblewrap (bwrap) is not installed: apt-get install bubblewrap"


def test_rl_options_built_for_our_checkpoints_are_refused_for_a_transformers_policy_before_anything_starts(
        llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"kind: grpo\nmodel: {{path: {llama}}}\ntrainer:\n  lora: {{}}\n")
    for dry in (["--dry-run"], []):
        assert main(["run", str(recipe), *dry]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "trainer.lora: implemented for deepseek_v3 checkpoints in RL; the " \
            "policy is a LlamaForCausalLM" in err, err
        assert not (tmp_path / "runs").exists()
