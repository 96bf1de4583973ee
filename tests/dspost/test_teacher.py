"""The teacher pool of on-policy distillation: teacher logprobs at the rollout temperature (the student's own
checkpoint as the teacher gives the trainer's logprobs), the true top-k of the tempered distribution, each sample
scored by its own domain's teacher (ours or a transformers model), a teacher with another tokenizer refused in one
line, and colocated teachers reserving no CPU in the resource plan."""

import numpy as np
import pytest
import torch

from dspost.config import OPDRecipe, RaySection
from dspost.teacher import TeacherError, TeacherPool, TeacherSpec

T = 0.6  # the rollout temperature of every test here


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        # "local": a cluster of our own, not one another process on this machine started
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The student (tiny-math random init + the project's tokenizer); a transformers Llama with the same tokenizer;
    another tiny-math init with a tokenizer trained on other text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dspost.model import DeepseekV3, build_tokenizer, load_tokenizer, tiny_math
    from dspost.starting_point import tiny_math_init

    student = tiny_math_init()
    tok = load_tokenizer(str(student))
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    foreign = build_tokenizer([f"the {w} of {i} and {i * 7}" for i in range(300) for w in ("sum", "cat")], 1024)
    DeepseekV3(tiny_math()).init_weights(seed=11).save_pretrained(root / "foreign", tokenizer=foreign)
    return {"student": str(student), "llama": str(root / "llama"), "foreign": str(root / "foreign")}


@pytest.fixture(scope="module")
def pool(ray_local, checkpoints):
    """math -> the student's own checkpoint, instruct -> another init (with another tokenizer), every other domain
    -> the teacher without domains (a transformers Llama). Rows of 64 tokens pack several samples into one."""
    specs = [TeacherSpec("math", checkpoints["student"], ("math",)),
             TeacherSpec("instruct", checkpoints["foreign"], ("instruct",)),
             TeacherSpec("rest", checkpoints["llama"])]
    p = TeacherPool(specs, row_len=64)
    yield p
    p.shutdown()


class S:  # what the pool reads of a rollout Sample
    def __init__(self, prompt_ids, response_ids):
        self.prompt_ids, self.response_ids = prompt_ids, response_ids


def samples(n: int, seed: int = 0) -> list[S]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 24, (n, 2), generator=g).tolist()
    return [S(torch.randint(6, 1024, (p,), generator=g).tolist(), torch.randint(6, 1024, (r,), generator=g).tolist())
            for p, r in lens]


@pytest.fixture(scope="module")
def reference_rows():
    """(checkpoint, sample) -> [R, V] log_softmax(z / T) at the response positions, from one unpacked forward."""
    from dspost.lora import load_base

    models = {}

    def rows(path: str, s: S) -> torch.Tensor:
        if path not in models:
            models[path] = load_base(path).eval()
        with torch.no_grad():
            logits = models[path](torch.tensor([s.prompt_ids + s.response_ids])).logits[0].float()
        return (logits[len(s.prompt_ids) - 1: -1] / T).log_softmax(-1)

    return rows


def test_teacher_logprobs_are_taken_at_the_rollout_temperature(pool, checkpoints):
    """The student's own checkpoint as the teacher: the pool's logprobs are the trainer's at T=0.6 (1e-5), far from
    its logprobs at T=1 (a pool scoring at T=1 would teach the teacher flattened to temperature 1/0.6)."""
    from dspost.model import from_pretrained
    from dspost.trainer_worker import RolloutBatch, pack, packed_logprobs

    batch = samples(6)
    scores = pool.score(batch, ["math"] * len(batch), T)
    x = pack(RolloutBatch([s.prompt_ids for s in batch], [s.response_ids for s in batch],
                          [[0.0] * len(s.response_ids) for s in batch], [0.0] * len(batch)), 0)
    student = from_pretrained(checkpoints["student"]).eval()
    with torch.no_grad():
        at_t, _ = packed_logprobs(student, x["ids"], x["lengths"], 256, temperature=T, at=x["mask"])
        at_1, _ = packed_logprobs(student, x["ids"], x["lengths"], 256, temperature=1.0, at=x["mask"])
    ours = np.concatenate([s.token_logprobs for s in scores])
    mask = x["mask"].bool()
    assert [len(s.token_logprobs) for s in scores] == [len(s.response_ids) for s in batch]
    np.testing.assert_allclose(ours, at_t[mask].numpy(), atol=1e-5, rtol=0)
    assert np.abs(ours - at_1[mask].numpy()).max() > 0.1
    assert all(s.support_ids is None and s.rows is None for s in scores)  # the sampled estimator's payload only
    with pytest.raises(TeacherError, match="temperature > 0"):
        pool.score(batch[:1], ["math"], 0.0)


def test_top_k_is_the_true_top_k_of_the_tempered_distribution(pool, checkpoints, reference_rows):
    """The support's first k columns are the tempered distribution's top-k in order; then the extra ids (the
    student's top-k) and the sampled token, each id once; logprobs and full rows are the tempered ones."""
    k, batch = 8, samples(4, seed=1)
    refs = [reference_rows(checkpoints["student"], s) for s in batch]
    # the student's "top-k": two of the teacher's top ids (repeats to drop) and two others
    extra = [torch.cat([r.topk(2, -1).indices, torch.randint(0, 1024, (len(r), 2))], 1).numpy() for r in refs]
    scores = pool.score(batch, ["math"] * len(batch), T, k=k, full=True, student_topk=extra)
    for s, ref, e, sc in zip(batch, refs, extra, scores):
        top = ref.topk(k, -1)
        ids = torch.tensor(sc.support_ids).long()
        assert sc.support_ids.shape == (len(s.response_ids), k + 4 + 1)
        assert torch.equal(ids[:, :k], top.indices)
        torch.testing.assert_close(torch.tensor(sc.support_logprobs[:, :k]), top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(sc.rows), ref, atol=1e-5, rtol=0)
        valid = ids >= 0
        torch.testing.assert_close(torch.tensor(sc.support_logprobs)[valid], ref.gather(1, ids.clamp(min=0))[valid],
                                   atol=1e-5, rtol=0)
        assert np.isneginf(sc.support_logprobs[~valid.numpy()]).all()
        for t, row in enumerate(ids.tolist()):
            kept = [i for i in row if i >= 0]
            assert len(kept) == len(set(kept))  # each id once: the tail mass 1 - sum(p) is right
            assert set(kept) == set(top.indices[t].tolist()) | set(e[t].tolist()) | {s.response_ids[t]}


@pytest.mark.parametrize("full", [False, True])
def test_each_sample_is_scored_by_its_domains_teacher(pool, checkpoints, reference_rows, full):
    """A mixed batch: math by the student's checkpoint, instruct by another init, any other domain by the teacher
    without domains (a transformers Llama, its packed rows included); sample order kept."""
    batch = samples(8, seed=2)
    domains = ["math", "instruct", "code", "instruct", "other", "math", "code", "math"]
    owner = {"math": "student", "instruct": "foreign", "code": "llama", "other": "llama"}
    assert pool.route(domains) == [0, 1, 2, 1, 2, 0, 2, 0]
    scores = pool.score(batch, domains, T, full=full)
    tokens = lambda rows, s: rows.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]  # noqa: E731
    for s, d, sc in zip(batch, domains, scores):
        ref = reference_rows(checkpoints[owner[d]], s)
        torch.testing.assert_close(torch.tensor(sc.token_logprobs), tokens(ref, s), atol=1e-5, rtol=0)
        if full:
            torch.testing.assert_close(torch.tensor(sc.rows), ref, atol=1e-5, rtol=0)
        for other in set(owner.values()) - {owner[d]}:  # the teachers really differ on this sample
            assert (tokens(reference_rows(checkpoints[other], s), s) - tokens(ref, s)).abs().max() > 0.05


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(pool, checkpoints):
    with pytest.raises(TeacherError) as e:
        pool.check_tokenizer(checkpoints["student"])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"teachers[1].path: {checkpoints['foreign']}: tokenizer differs from the student's")


def test_routing_is_refused_when_a_domain_has_two_teachers_or_none(ray_local, checkpoints):
    with pytest.raises(TeacherError, match=r"teachers\[1\]\.domains: domain 'math' is already served by teachers\[0\]"):
        TeacherPool([TeacherSpec("a", checkpoints["student"], ("math",)),
                     TeacherSpec("b", checkpoints["llama"], ("math",))])
    with pytest.raises(TeacherError, match="already served"):
        TeacherPool([TeacherSpec("a", checkpoints["student"]), TeacherSpec("b", checkpoints["llama"])])


def test_a_teacher_that_cannot_load_is_refused_in_one_line(ray_local, tmp_path, checkpoints):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["student"], broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(TeacherError) as e:
        TeacherPool([TeacherSpec("a", checkpoints["student"], ("a",)), TeacherSpec("b", str(broken), ("b",))])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"teachers[1].path: {broken}: cannot load the teacher: ")
    assert "no *.safetensors" in msg, msg


def opd(*teachers: dict) -> OPDRecipe:
    return OPDRecipe(kind="opd", teachers=list(teachers), ray=RaySection(num_cpus=2),
                     data={"sources": [{"name": "math", "synthetic": "math"},
                                       {"name": "instruct", "synthetic": "instruct"}]},
                     rollout={"num_cpus_per_worker": 1}, trainer={"num_cpus_per_worker": 1})


def test_colocated_teachers_reserve_no_cpu_in_the_plan():
    """Two colocated teachers fit a 2-core plan beside one rollout and one trainer CPU, and the dry run says so;
    a teacher given its own CPU is counted."""
    from dspost.plan import check_plan, format_plans
    from dspost.recipe import RecipeError

    two = opd({"path": "/ckpt/math", "domains": ["math"]}, {"from_stage": "grpo_if", "domains": ["instruct"]})
    text = format_plans(check_plan(two))
    assert "stage run [opd]: 2 CPUs" in text
    assert "teacher[math] cpus=0    gpus=0    colocated  holds teacher (/ckpt/math)" in text
    assert ("teacher[instruct] cpus=0    gpus=0    colocated  holds teacher (final checkpoint of stage 'grpo_if')"
            in text)
    own = opd({"path": "/ckpt/math", "domains": ["math"], "num_cpus": 1, "name": "m"})
    with pytest.raises(RecipeError, match="needs 3 CPUs .*teacher\\[m\\] 1"):
        check_plan(own)


@pytest.mark.vllm
def test_vllm_backend_scores_the_tempered_teacher(ray_local, checkpoints, reference_rows):
    """The vllm backend (prompt logprobs, the head scaled by 1/T) gives the tempered teacher's sampled-token and
    top-k logprobs; full rows and extra ids are refused in one line."""
    pytest.importorskip("vllm")
    pool = TeacherPool([TeacherSpec("math", checkpoints["student"], ("math",), backend="vllm")],
                       engine={"max_model_len": 256, "kv_cache_gb": 1})
    try:
        k, batch = 8, samples(4, seed=3)
        for sc, s in zip(pool.score(batch, ["math"] * len(batch), T, k=k), batch):
            ref = reference_rows(checkpoints["student"], s)
            tokens = ref.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(sc.token_logprobs), tokens, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(sc.support_logprobs[:, :k]), ref.topk(k, -1).values, atol=1e-4,
                                       rtol=0)
            assert sc.support_ids.shape == (len(s.response_ids), k + 1)
        with pytest.raises(TeacherError, match="use the torch backend") as e:
            pool.score(batch, ["math"] * len(batch), T, full=True)
        assert len(str(e.value).splitlines()) == 1
    finally:
        pool.shutdown()
