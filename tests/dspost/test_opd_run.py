"""On-policy distillation end to end with real vLLM engines and Ray: two domains, each sample scored by its own
domain's teacher at the rollout temperature, the student's weights synced into the engine under the parity probe,
and per-domain evaluation. (Resuming is the RL session's, tested with GRPO; the pipeline test runs an OPD stage too.)"""

import pytest

from dspost.cli import main
from dspost.rundir import read_metrics

pytestmark = pytest.mark.vllm

RECIPE = """\
kind: opd
data:
  sources:
    - {{name: math, synthetic: math, num_train: 64, num_eval: 4, difficulty: [1]}}
    - {{name: instruct, synthetic: instruct, num_train: 64, num_eval: 4}}
trainer: {{eval_every: 2, save_every: 1, lr: 1.0e-3, num_cpus_per_worker: 1, num_threads: 2}}
rollout: {{prompts_per_step: 4, n: 2, temperature: 0.7, max_tokens: 16, kv_cache_gb: 1, num_cpus_per_worker: 1,
          num_threads: 2}}
rewards:
  terms:
    - {{name: math, weight: 0, domains: [math]}}
    - {{name: instruct, weight: 0, domains: [instruct]}}
teachers:
  - {{path: {student}, domains: [math]}}
  - {{path: {other}, domains: [instruct], weight: 0.5}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The math teacher is the student's own starting checkpoint, the instruct teacher another init (same
    tokenizer)."""
    from dspost.model import DeepseekV3, load_tokenizer, tiny_math
    from dspost.starting_point import tiny_math_init

    root = tmp_path_factory.mktemp("opd")
    student = tiny_math_init()
    DeepseekV3(tiny_math()).init_weights(seed=5).save_pretrained(root / "other",
                                                                 tokenizer=load_tokenizer(str(student)))
    path = root / "opd.yaml"
    path.write_text(RECIPE.format(student=student, other=root / "other"))
    return path, student


def test_opd_distills_each_domain_from_its_own_teacher(recipe, tmp_path):
    path, student = recipe
    out = tmp_path / "run"
    args = ["run", str(path), f"model.path={student}", f"output_dir={out}"]
    assert main([*args, "--max-steps", "2"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("eval/math/accuracy", "eval/instruct/accuracy", "eval/accuracy"):
        assert 0.0 <= rows[0][key] <= 1.0 and key in rows[2], key
    first = rows[1]
    for key in ("opd/reverse_kl", "opd/math/reverse_kl", "opd/instruct/reverse_kl", "opd/math/tokens",
                "opd/instruct/tokens", "time/teacher", "sync/parity_max_abs", "sync/bytes", "train/tokens"):
        assert key in first, key
    # Step 1 samples from the starting weights: the math teacher IS the student, so scored at the rollout
    # temperature its KL is ~0 (at T=1 instead: ~0.2 nats); the other teacher's is not.
    assert first["opd/math/reverse_kl"] < 1e-3 < 0.05 < first["opd/instruct/reverse_kl"], first
    assert first["opd/math/tokens"] + first["opd/instruct/tokens"] == first["train/tokens"]
    assert first["opd/math/tokens"] > 0 and first["opd/instruct/tokens"] > 0
    # The update moved the student, and the engine serves the moved weights (the probe saw the change).
    for r in rows[1:]:
        assert r["sync/policy_change_max"] > 1e-3 > 10 * r["sync/parity_max_abs"], r
    assert rows[2]["opd/math/reverse_kl"] > first["opd/math/reverse_kl"]  # the student left the math teacher


def test_a_student_started_from_the_teachers_task_arithmetic(recipe, tmp_path):
    """`opd.init: task_arithmetic`: the student starts at student + (student - student) + (other - student), which
    is the instruct teacher `other`: at step 1 its KL to that teacher is ~0 and to the math teacher (the checkpoint
    named as the student) it is not, the reverse of the plain start."""
    path, student = recipe
    out = tmp_path / "run"
    args = ["run", str(path), f"model.path={student}", f"output_dir={out}", "opd.init=task_arithmetic"]
    assert main([*args, "--max-steps", "1"]) == 0
    first = read_metrics(out)[1]
    assert first["opd/instruct/reverse_kl"] < 1e-3 < 0.05 < first["opd/math/reverse_kl"], first
    assert (out / "init" / "config.json").is_file()


def test_a_transformers_student_is_distilled_served_and_synced(recipe, llama, tmp_path):
    """The student is a transformers Llama (the teachers' tokenizer, not their architecture): vLLM serves it, its
    updates reach the engine exactly (the parity probe), and its checkpoints stay transformers checkpoints. The
    instruct teacher is the student's own start, so its KL at step 1 is ~0 only if the trainer's forward of the
    Llama matches the teacher's at the rollout temperature."""
    from transformers import AutoModelForCausalLM

    path, student = recipe
    text = path.read_text().replace(f"path: {student}, domains: [math]", f"path: {student}, domains: [instruct]")
    text = text.replace(f"path: {path.parent / 'other'}, domains: [instruct]", f"path: {llama}, domains: [math]")
    (tmp_path / "opd.yaml").write_text(text)
    out = tmp_path / "run"
    args = ["run", str(tmp_path / "opd.yaml"), f"model.path={llama}", f"output_dir={out}", "--max-steps", "2"]
    assert main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    first = rows[1]
    assert first["opd/math/reverse_kl"] < 1e-3 < 0.05 < first["opd/instruct/reverse_kl"], first
    for r in rows[1:]:
        assert r["sync/policy_change_max"] > 1e-3 > 10 * r["sync/parity_max_abs"], r
        assert "moe/load_max_min_ratio" not in r
    ckpt = out / "checkpoints" / "step_2"
    assert AutoModelForCausalLM.from_pretrained(str(ckpt)).config.architectures == ["LlamaForCausalLM"]
