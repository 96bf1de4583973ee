"""The recipe schema: one pydantic tree mirroring the component tree.

Importable without torch, Ray or vLLM (the CLI validates and plans with it before anything heavy
loads). Each field is documented once, by the docstring under it; recipes only override defaults.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

SEED_LIMIT = 2**32
"""Seeds lie in [0, 2**32): vLLM seeds NumPy with `trainer.seed` (`np.random.seed` takes exactly that range), and
the seeds derived from it stay far inside int64 (GRPO's `seed * 1_000_003 + step * 10_007` < 4.4e15, SFT's
`seed * 100_003 + epoch` < 4.3e14; torch generators take up to 2**64)."""
MAX_STEPS = 10**9
"""A billion optimizer steps: far beyond any run, and small enough that per-step seeds stay inside int64."""
MAX_TOKENS = 1_000_000
"""A million tokens, the longest context of any open model; the engine sizes its KV cache for
`data.max_seq_len + rollout.max_tokens`."""
VLLM_MIN_TEMPERATURE = 0.01
"""vLLM raises a temperature in (0, 0.01) to 0.01 (`vllm.sampling_params._MAX_TEMP`)."""


def _vllm_temperature(t: float) -> float:
    if 0 < t < VLLM_MIN_TEMPERATURE:
        raise ValueError(f"vLLM raises a temperature in (0, {VLLM_MIN_TEMPERATURE}) to {VLLM_MIN_TEMPERATURE}, so the "
                         f"samples would not come from the distribution asked for; use 0 (greedy) or >= "
                         f"{VLLM_MIN_TEMPERATURE} (got {t})")
    return t


Temperature = Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(_vllm_temperature)]
"""A vLLM sampling temperature: 0 (greedy) or in [0.01, 2]; vLLM refuses temperatures above 2, and above ~2 a large
vocabulary's distribution is close to uniform noise."""
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
"""An Adam moment decay: 1 would never forget (the bias correction 1 - beta**t divides by 0)."""


def _non_finite(value: Any, where: str = "") -> str | None:
    """Dotted location of the first NaN or inf in a nested dict/list of YAML values, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        bad = _non_finite(item, f"{where}.{key}" if where else str(key))
        if bad is not None:
            return bad
    return None


class Section(BaseModel):
    # allow_inf_nan=False: no field takes NaN or inf (a YAML `.nan`/`.inf`, or `nan` on the command line).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              allow_inf_nan=False)


class ModelSection(Section):
    preset: Literal["tiny-math", "tiny-dense"] | None = "tiny-math"
    """Built-in model, created (and cached) on first use. Ignored when `path` or `from_stage` is set. `tiny-math`: the
    4-layer MoE; `tiny-dense`: the same family with every layer dense (3.28M parameters, about tiny-math's 3.39M
    activated), which vLLM serves: the dense OPD student. Both share one tokenizer."""
    path: str | None = None
    """Local checkpoint directory in Hugging Face layout (ours, transformers', or DeepSeek FP8)."""
    from_stage: str | None = None
    """In a pipeline: start from the final checkpoint of the named earlier stage."""
    warm_start: bool = True
    """For `tiny-math`: start from the project's SFT warm start (produced once and cached) instead of
    random weights. Only the warm-start recipe itself sets this to false. `tiny-dense` has no warm start and always
    starts from its random init (a pipeline SFTs it as a stage), so setting this true for it is refused."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype. fp32 on CPU: bf16 matmuls are 5-25x slower there."""
    mtp_loss_weight: float = Field(0.3, ge=0.0)
    """Weight lambda of the multi-token-prediction loss (0 turns it off)."""
    bias_update_speed: float = Field(0.001, ge=0.0)
    """Aux-loss-free balancing: gamma of the per-step router-bias update (0 turns it off)."""
    seq_balance_loss_weight: float = Field(0.0, ge=0.0)
    """Alpha of the optional sequence-wise balance loss (DeepSeek-V3 uses 1e-4)."""

    @model_validator(mode="after")
    def _warm_start_is_tiny_maths(self) -> "ModelSection":
        if self.preset == "tiny-dense" and self.warm_start and "warm_start" in self.model_fields_set:
            raise ValueError("warm_start: tiny-dense has no SFT warm start (it starts from its random init); train it "
                             "with an SFT stage")
        return self


class SourceSection(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """The source's domain: rows carry it through rollout, scoring and metrics (`eval/<name>/accuracy`); reward
    terms and teachers name it in their `domains`."""
    weight: float = Field(1.0, gt=0.0, le=1000.0)
    """Mixing weight: a step draws this source's share of its prompts (SFT: of its batch) in proportion."""
    synthetic: Literal["math", "instruct"] | None = None
    """A built-in synthetic set: `math` (sympy-checkable problems, `difficulty` levels) or `instruct` (level 1-2
    math questions with verifiable formatting constraints, IFEval-shaped); unset = the file at `path`."""
    path: str | None = None
    """JSONL/JSON/CSV/Parquet file or a local `datasets` directory (with `format`, `columns`, `eval_path`)."""
    format: Literal["auto", "gsm8k", "math", "chat", "prompt_completion", "code", "ifeval"] = "auto"
    """How the file's rows are read (as `data.format`)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Column renames for the file (as `data.columns`)."""
    eval_path: str | None = None
    """Separate held-out file (as `data.eval_path`)."""
    num_train: int = Field(4000, ge=1)
    """Synthetic set: number of training problems."""
    num_eval: int = Field(200, ge=1)
    """Held-out rows (synthetic: a fixed split; files: as `data.num_eval`)."""
    difficulty: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    """Synthetic math: difficulty levels."""

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceSection":
        if (self.synthetic is None) == (self.path is None):
            raise ValueError(f"data.sources: {self.name}: set exactly one of synthetic and path")
        return self


class DataSection(Section):
    path: str | None = None
    """JSONL/JSON/Parquet file or a local `datasets` directory; unset = the built-in synthetic math set."""
    format: Literal["auto", "gsm8k", "math", "chat", "prompt_completion", "code", "ifeval", "pairwise", "llmbar",
                    "hh_rlhf"] = "auto"
    """How rows are read: GSM8K (`question`, `answer` with `#### N`), MATH (`problem`, `answer`),
    chat (`messages`), prompt/completion pairs, HumanEval-style `code`, IFEval (`prompt`, `instruction_id_list`,
    `kwargs`: RL prompts with verifiable instructions, no target); preference pairs for reward models:
    `pairwise` (`prompt`, `chosen`, `rejected`), `llmbar` (`input`, `output_1`, `output_2`, `label`),
    `hh_rlhf` (`chosen`/`rejected` transcripts); `auto` infers it from the columns."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Map from our column names (`prompt`, `completion`, `messages`, `question`, `answer`, ...)
    to the file's own."""
    num_train: int = Field(4000, ge=1)
    """Synthetic set: number of training problems."""
    num_eval: int = Field(200, ge=1)
    """Held-out problems (synthetic: a fixed split; files: the last rows, or `eval_path`)."""
    eval_path: str | None = None
    """Separate held-out file; unset = split off `num_eval` rows of `path`."""
    difficulty: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    """Synthetic set: difficulty levels to draw from (1 = the larger of two numbers ... 7 = sums of fractions)."""
    max_seq_len: int = Field(256, ge=8, le=1_000_000)
    """Longest tokenized sample; longer rows are counted as bad and dropped."""
    pack: bool = False
    """SFT: pack samples into rows of `max_seq_len` tokens (attention and positions restart per sample, no loss
    across a boundary); `trainer.batch_size` then counts rows. Either way our model runs each micro-batch as one
    row without padding."""
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Stop with an error if more than this fraction of rows is malformed."""
    seed: Seed = 0
    """Seed of the synthetic generator and of the data order, in [0, 2**32)."""
    sources: list[SourceSection] = Field(default_factory=list)
    """Several named sources (domains) mixed by weight, each synthetic or a file with its own held-out split; unset =
    the one source the fields above describe (domain-less: metrics keep their plain names)."""

    @model_validator(mode="after")
    def _sources_or_fields(self) -> "DataSection":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: duplicate source names {names}")
        if self.sources and (self.path or self.eval_path or self.columns or self.format != "auto"):
            raise ValueError("sources: give files inside data.sources[], not data.path/eval_path/format/columns beside it")
        return self


class LoraSection(Section):
    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    )
    """Linear modules to adapt (PEFT `target_modules`); the router gate (`mlp.gate`) is never adapted unless
    named. Shared experts and dense MLPs are `shared_experts.gate_proj`, `mlp.up_proj`, ...: such adapters
    train, save and merge here, but PEFT on transformers >= 5 remaps any `*gate_proj`/`*up_proj`/`*down_proj`
    target onto the fused routed experts when loading into `DeepseekV3ForCausalLM`, so use the merged
    checkpoint there. For other transformers models, name their modules (e.g. `q_proj`, `v_proj`)."""
    routed_experts: bool = False
    """Also adapt the stacked routed-expert weights (PEFT `target_parameters`): refused for now, because
    such adapters do not reload through PEFT 0.21."""


class TrainerSection(Section):
    num_workers: int = Field(1, ge=1)
    """Trainer processes. 1 runs in-process without Ray; more run as Ray actors in one torch.distributed group."""
    num_cpus_per_worker: float = Field(2, gt=0)
    """CPUs reserved per trainer worker (Ray sets the worker's OMP threads from this)."""
    num_gpus_per_worker: float = Field(0, ge=0)
    """GPUs per trainer worker."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads per trainer worker; unset = its CPUs."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each trainer worker requires (e.g. to place the pool on particular nodes)."""
    max_steps: int = Field(200, ge=1, le=MAX_STEPS)
    """Optimizer steps (`--max-steps` caps it)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per optimizer step, over all workers and accumulation steps."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Cosine floor, as a fraction of `lr`."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW betas, each in [0, 1) (at 1 a moment never forgets and the bias correction divides by zero)."""
    clip_grad_norm: float = Field(1.0, gt=0.0)
    """Global gradient-norm clip."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision of the forward/backward."""
    quantization: Literal["none", "fp8", "fp4-qat", "fp8+fp4-qat"] = "none"
    """Low-precision training of our MoE: `fp8` runs the projection and expert GEMMs with FP8 operands (1x128
    activation tiles, 128x128 weight blocks, fp32 accumulation; master weights stay high precision);
    `fp4-qat` trains the routed experts through MXFP4 fake quantisation (straight-through gradient)."""
    compile: bool = False
    """torch.compile each block of our DeepseekV3 for training (the routed experts, whose per-expert sizes change
    every step, and no-grad forwards stay eager): 1.03-1.10x faster forward+backward on this CPU after 30-60 s
    of compilation in the first steps (cached by Inductor across runs)."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on the held-out set every this many steps (and at the end)."""
    save_every: int = Field(100, ge=1)
    """Write a checkpoint every this many steps (and at the end)."""
    seed: Seed = 0
    """Seed for initialisation and sampling, in [0, 2**32) (vLLM seeds NumPy with it); a CPU run with the same seed
    repeats exactly."""
    lora: LoraSection | None = None
    """Train LoRA adapters (PEFT format) instead of all parameters; the base, router biases included, stays frozen.
    Checkpoints hold the adapters and the stage ends with a merged full checkpoint (`merged/`). In RL each sync
    sends the engines only the merged adapted tensors (and their fused partners), a few MB instead of the model."""

    def check_batch_divides(self) -> None:
        """SFT and reward-model stages split `batch_size` over workers and accumulation steps."""
        if self.batch_size % (self.grad_accum * self.num_workers):
            raise ValueError(f"trainer.batch_size: {self.batch_size} is not divisible by grad_accum x num_workers "
                             f"({self.grad_accum} x {self.num_workers})")


class RolloutSection(Section):
    num_workers: int = Field(1, ge=1)
    """Rollout actors, one engine each."""
    num_cpus_per_worker: float = Field(1, gt=0)
    """CPUs reserved per rollout worker."""
    num_gpus_per_worker: float = Field(0, ge=0)
    """GPUs per rollout worker."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts per GRPO step."""
    n: int = Field(8, ge=1)
    """Samples per prompt (the GRPO group size; at least 2 for `kind: grpo`, whose advantages compare a group)."""
    temperature: Temperature = 1.0
    """Sampling temperature: 0 (greedy) or in [0.01, 2]. The trainer's logprobs (ratios, entropy, KL) are of the
    logits divided by it, the distribution the engine sampled from, whose logprobs it returns (vLLM would sample a
    lower temperature at 0.01, which is why those are refused)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling. The trainer's logprobs ignore the truncation; the truncated importance weight
    (`algorithm.tis_cap`) corrects for it."""
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    """New tokens per sample (at most a million, the longest context of any open model)."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings (the tokenizer's end-of-turn token always stops)."""
    enforce_eager: bool = False
    """vLLM eager mode; off by default because compiled mode matches the trainer's logprobs to ~1e-6 on CPU."""
    memory_fraction: float = Field(0.3, gt=0.0, le=0.95)
    """vLLM `gpu_memory_utilization` (on CPU: a fraction of the NUMA node's RAM)."""
    kv_cache_gb: float | None = Field(None, gt=0)
    """CPU engines: a fixed KV-cache size in GiB instead of `memory_fraction`."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each rollout worker requires (e.g. to place the pool on particular nodes)."""
    num_threads: int | None = Field(None, ge=1)
    """Threads of each worker's engine; unset = its CPUs. On one machine where generation and training
    alternate, giving each pool all cores is faster than splitting them."""

    @model_validator(mode="after")
    def _group_needs_sampling(self) -> "RolloutSection":
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} samples per prompt need temperature > 0 (greedy gives n copies)")
        return self


class AlgorithmSection(Section):
    loss: Literal["grpo", "dr_grpo", "dapo", "gspo"] = "gspo"
    """Policy loss and advantage estimator, picked by name: `grpo` (group-normalised advantages, clipped token
    ratio, per-sequence mean), `dr_grpo` (no std, no length normalisation), `dapo` (token-level mean,
    clip-higher, dynamic sampling, overlong penalty), `gspo` (sequence-level ratio; the default for MoE)."""
    kl_beta: float = Field(0.0, ge=0.0)
    """KL penalty to the reference model (0 = no reference model)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Entropy bonus: the loss subtracts this times the mean entropy of the response tokens, against the
    policy narrowing onto a few answers (pass@k falling while pass@1 rises)."""
    eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    """Lower clip range of the ratio, below 1 (the ratio is clipped at 1 - eps_low, which must stay positive)."""
    eps_high: float = Field(0.28, ge=0.0, le=1.0)
    """Upper clip range (DAPO clip-higher; equal to eps_low for symmetric clipping), at most 1: beyond a ratio of 2
    the clip no longer bounds the update (DAPO uses 0.28)."""
    seq_eps_low: float = Field(3e-4, ge=0.0, lt=1.0)
    """GSPO: lower clip range of the sequence-level ratio, below 1 like `eps_low`."""
    seq_eps_high: float = Field(4e-4, ge=0.0, le=1.0)
    """GSPO: upper clip range of the sequence-level ratio, at most 1 like `eps_high` (GSPO uses 4e-4)."""
    tis_cap: float = Field(2.0, ge=1.0)
    """Truncated importance-sampling cap on the trainer/rollout ratio."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per rollout batch (later ones are off-policy, which is where clipping acts)."""
    pack_len: int = Field(256, ge=1)
    """The update packs prompt+response sequences into rows of up to this many tokens (block-diagonal
    attention) instead of padding each to the batch's longest; a longer sequence gets a row of its own."""
    overlong_buffer: int = Field(16, ge=0)
    """DAPO: the last this-many tokens before `rollout.max_tokens` are penalised linearly down to -1."""


class EvalSection(Section):
    temperature: Temperature = 0.0
    """Held-out decoding temperature: 0 (greedy) or in [0.01, 2], like `rollout.temperature`. With sampling,
    `eval/accuracy` is the mean correctness over `n` samples per problem (DeepSeek-R1's pass@1) and greedy accuracy
    is logged beside it."""
    n: int = Field(1, ge=1)
    """Samples per held-out problem."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling for evaluation."""

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> "EvalSection":
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} samples per problem need temperature > 0 (greedy gives n copies)")
        return self


class SyncSection(Section):
    transport: Literal["object_store", "nccl"] = "object_store"
    """Trainer -> rollout weight transport: Ray's shared-memory object store (CPU, any cluster) or NCCL (GPU)."""
    bucket_mb: float = Field(64, gt=0, le=4096)
    """Size of each checksummed weight bucket, at most 4 GiB: a bucket is staged whole (in the object store or GPU
    memory, and in each engine while it is applied), so beyond that a bigger one only raises peak memory."""
    parity_every: int = Field(1, ge=1)
    """Compare the engine's logprobs with the trainer's on a fixed probe batch every this many syncs."""
    quantize: Literal["none", "fp8", "fp8+fp4-experts"] = "none"
    """Quantise on sync: the trainer keeps fp32/bf16 weights and sends the engines DeepSeek's FP8 format
    (float8_e4m3fn + `weight_scale_inv` per 128x128 block), optionally with MXFP4 routed experts, bucket by
    bucket; the engines start from the same format. Needs GPU rollout workers (vLLM's CPU FP8 kernels need AMX)."""
    parity_threshold: float = Field(1e-3, gt=0, le=1.0)
    """Stop the run when the probe's max |logprob difference| exceeds this (nats). vLLM's compiled CPU mode
    matches the trainer to ~1e-6; eager mode drifts up to ~0.1 (0.14 measured), so raise it with
    `rollout.enforce_eager`. At most 1 nat (a factor e on a token's probability), 7x the largest drift measured:
    a looser threshold would pass an engine serving other weights, and the probe would check nothing."""


class RewardTerm(Section):
    name: str
    """Registered reward name (`math`, `format`, `code`), a dotted path `pkg.module:function`, or a scalar
    critic scored in the driver: `critic:length`, `critic:rule:NAME`, `critic:DIR` (a reward-model checkpoint)."""
    weight: float = Field(1.0, ge=-1000.0, le=1000.0)
    """Weight in the summed reward; negative for a penalty. At most 1000 in size: the terms are O(1) scores, the
    sum meets DAPO's overlong penalty (in [-1, 0]) and, under `dr_grpo`, scales the gradient as is."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of the reward function (e.g. `code`: `partial: true` scores the passed fraction)."""
    domains: list[str] = Field(default_factory=list)
    """The data sources this term scores (empty = all); other samples get 0 from it. The first rule term of a domain
    is its verifier, which grades `eval/<domain>/accuracy`. A term of weight 0 only grades evaluation."""

    @field_validator("options")
    @classmethod
    def _finite_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """`Any` escapes `allow_inf_nan`; a NaN option would reach the reward function."""
        bad = _non_finite(options)
        if bad is not None:
            raise ValueError(f"{bad}: must be a finite number")
        return options


class MetaCriticSection(Section):
    term: str | None = None
    """The critic term to check (its `name`, e.g. `critic:runs/rm/merged`); unset = the first critic term."""
    every: int = Field(10, ge=1)
    """Check the critic against the reference set every this many steps (and at step 0)."""
    policy: Literal["report", "correct", "gate"] = "report"
    """`report`: metrics only; `correct`: subtract the critic's measured length slope from its rewards;
    `gate`: scale the critic's weight by `gate_weight` while the meta-critic flags it as biased."""
    gate_weight: float = Field(0.0, ge=0.0, le=1.0)
    """Weight multiplier of a flagged critic under `gate` (0 drops it)."""
    reference: str | None = None
    """Reference set (JSONL: prompt, chosen, rejected, slice[, answer]); unset = the shipped one."""


class RewardsSection(Section):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="math")], min_length=1)
    """Weighted sum of rewards."""
    meta_critic: MetaCriticSection | None = None
    """The critic-of-critics on a critic term: checks it every `every` steps and acts by `policy`."""

    @model_validator(mode="after")
    def _meta_needs_critic(self) -> "RewardsSection":
        critics = [t.name for t in self.terms if t.name.startswith("critic:")]
        for t in critics:
            if t.startswith("critic:judge:"):
                raise ValueError(f"terms: {t}: a pair judge compares two responses and cannot score one; "
                                 "use a scalar critic (length, rule:NAME, a reward-model directory)")
        if self.meta_critic is not None:
            if not critics:
                raise ValueError("meta_critic: needs a critic term (`critic:...`) among rewards.terms")
            if self.meta_critic.term is not None and self.meta_critic.term not in critics:
                raise ValueError(f"meta_critic.term: {self.meta_critic.term!r} is not a critic term (have {critics})")
        return self
    timeout: float = Field(5.0, gt=0.0, le=600.0)
    """Wall-clock limit per scored sample, seconds; at most 10 minutes, since every step waits for its slowest
    sample."""
    num_workers: int = Field(2, ge=1)
    """Scoring worker processes."""
    max_error_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Stop the run when more than this fraction of a step's scored samples comes back `error` — a reward that
    could not be computed (sandbox unavailable, scorer crash), not a wrong answer — instead of training on zeros."""


class RaySection(Section):
    address: str | None = None
    """Ray cluster to join (`auto`, or `ray://host:port`); unset = `RAY_ADDRESS` or a local cluster."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local cluster; unset = all of this machine's."""


class StageBase(Section):
    name: str | None = None
    """Run name; defaults to the recipe file's stem (or the stage's position in a pipeline)."""
    output_dir: str | None = None
    """Run directory; unset = `runs/<name>-<timestamp>`."""
    resume: bool = False
    """Continue from `output_dir/checkpoints/latest` with the same data order."""
    ray: RaySection = Field(default_factory=RaySection)
    """Ray cluster."""


class SFTRecipe(StageBase):
    kind: Literal["sft"]
    """Supervised fine-tuning (full or LoRA)."""
    model: ModelSection = Field(default_factory=ModelSection)
    """Model to train."""
    data: DataSection = Field(default_factory=DataSection)
    """Training and held-out data."""
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    """Optimisation."""

    @model_validator(mode="after")
    def _batch_divides(self) -> "SFTRecipe":
        self.trainer.check_batch_divides()
        return self


class GRPORecipe(StageBase):
    kind: Literal["grpo"]
    """GRPO-family RL with rule-based rewards."""
    model: ModelSection = Field(default_factory=ModelSection)
    """Policy to train."""
    data: DataSection = Field(default_factory=DataSection)
    """Prompts and held-out set."""
    trainer: TrainerSection = Field(default_factory=lambda: TrainerSection(lr=1e-5, eval_every=10, save_every=50))
    """Optimisation."""
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    """Rollout pool."""
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    """Loss and estimators."""
    rewards: RewardsSection = Field(default_factory=RewardsSection)
    """Reward terms."""
    sync: SyncSection = Field(default_factory=SyncSection)
    """Weight sync and the parity probe."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Held-out evaluation every `trainer.eval_every` steps."""

    @model_validator(mode="after")
    def _groups_compare_samples(self) -> "GRPORecipe":
        # Every estimator of the GRPO family compares a prompt's samples with each other: with one sample the group
        # std is NaN (grpo, dapo, gspo) or every advantage is 0 (dr_grpo). OPD's reverse KL needs no group.
        if self.kind == "grpo" and self.rollout.n < 2:
            raise ValueError(f"rollout.n: {self.algorithm.loss} compares the samples of a prompt's group, so it needs "
                             f"n >= 2 (got {self.rollout.n})")
        if self.algorithm.loss == "dapo" and self.algorithm.overlong_buffer >= self.rollout.max_tokens:
            raise ValueError(f"algorithm.overlong_buffer: {self.algorithm.overlong_buffer} is not below "
                             f"rollout.max_tokens={self.rollout.max_tokens}, so DAPO would penalise every response "
                             "from its first token")
        return self

    @model_validator(mode="after")
    def _domains_exist(self) -> "GRPORecipe":
        sources = [src.name for src in self.data.sources]
        for i, term in enumerate(self.rewards.terms):
            unknown = [d for d in term.domains if d not in sources]
            if unknown:
                raise ValueError(f"rewards.terms.{i}.domains: {unknown[0]!r} is not a data source "
                                 f"(data.sources: {sources or 'none'})")
        return self

    @model_validator(mode="after")
    def _batch_is_the_rollout(self) -> "GRPORecipe":
        if "batch_size" in self.trainer.model_fields_set:
            raise ValueError("trainer.batch_size: an RL step trains on its rollout, rollout.prompts_per_step x "
                             "rollout.n sequences; set those instead")
        return self

    @model_validator(mode="after")
    def _engine_serves_trainer_precision(self) -> "GRPORecipe":
        if self.trainer.quantization != "none":
            raise ValueError("trainer.quantization: low-precision RL training needs an engine serving the same "
                             "FP8/FP4 weights, and vLLM cannot serve FP8 on CPU; use it in sft or rm stages")
        if self.sync.quantize != "none" and self.trainer.lora is not None:
            raise ValueError("sync.quantize: LoRA syncs (the merged adapted tensors only) are implemented for "
                             "unquantised engines; a partial FP8 update of those tensors and their block scales "
                             "through vLLM's reload_weights is untested (no GPU vLLM here); use sync.quantize=none "
                             "with trainer.lora")
        if self.sync.quantize != "none" and self.rollout.num_gpus_per_worker == 0:
            raise ValueError("sync.quantize: vLLM serves FP8 only on GPU rollout workers (its CPU FP8 kernels need "
                             "AMX); set rollout.num_gpus_per_worker or sync.quantize=none")
        return self


class TeacherSection(Section):
    path: str | None = None
    """Teacher checkpoint directory."""
    from_stage: str | None = None
    """In a pipeline: the named earlier stage's final checkpoint."""
    weight: float = Field(1.0, gt=0.0)
    """Weight w_i of this teacher's reverse KL."""
    domains: list[str] = Field(default_factory=list)
    """Data sources routed to this teacher (empty = all)."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Name in metrics and the resource plan (`opd/<name>/reverse_kl`, `teacher[<name>]`); unset = its only
    domain, else `teacher<i>`."""
    num_cpus: float = Field(0, ge=0)
    """CPUs reserved for the teacher's actor. 0 colocates it: it shares the rollout and trainer workers' cores,
    which it alternates with (generate, then score, then update), and uses all of them while it scores."""
    num_gpus: float = Field(0, ge=0)
    """GPUs reserved for the teacher's actor (a fraction shares one); 0 = it scores on CPU."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads of the teacher's forward; unset = its CPUs, or every core of its node when colocated."""
    backend: Literal["torch", "vllm"] = "torch"
    """How the teacher scores: `torch`, a plain forward (exact at any temperature, every estimator, starts in
    seconds), or `vllm`, prompt logprobs with the head scaled by 1/T (checked against the plain forward at start;
    sampled and top-k without the student's top-k; ~2x faster per step on CPU, after a 12-20 s engine start)."""


class OPDSection(Section):
    estimator: Literal["sampled", "topk", "full"] = "sampled"
    """Reverse-KL estimator: `sampled`, the per-token `log pi_s - log pi_t` of the sampled token as a negative
    advantage in the clipped, importance-weighted token policy gradient (Tinker, verl); `topk`, the exact reverse KL
    over the teacher's top-k plus the sampled token with the tail's mass as one bucket; `full`, the exact reverse KL
    over the vocabulary (the teacher's whole rows travel to the trainer: small vocabularies only)."""
    top_k: int = Field(32, ge=1, le=1024)
    """`topk`: the teacher's top-k ids per position (the sampled token is added to them)."""
    discount: float = Field(0.0, ge=0.0, le=1.0)
    """`sampled`: the advantage of token t adds the discounted later per-token KLs (0: each token's own, Tinker's
    default; 1: the sequence's remaining reverse KL)."""
    init: Literal["student", "task_arithmetic"] = "student"
    """Where the student starts: `student`, the `model` checkpoint; `task_arithmetic`, that checkpoint plus the
    teachers' task vectors, `model + merge_scale * sum_i (teacher_i - model)` (Ilharco et al., 2023), written to the
    run's `init/` before the first step (the teachers must be fine-tunes of `model`: same tensors, checked at
    start). Distillation then removes what the merged updates do to each other. On the V4 pipeline the merge alone
    kept 77%/79% of the specialists' math/instruct gains, and 8 full-estimator steps from it 97%/92% (README)."""
    merge_scale: float = Field(1.0, gt=0.0, le=10.0)
    """`task_arithmetic`: the scale lambda of the summed task vectors (1: their plain sum; 1/n: the teachers'
    average)."""

    @model_validator(mode="after")
    def _merge_scale_needs_a_merge(self) -> "OPDSection":
        if "merge_scale" in self.model_fields_set and self.init != "task_arithmetic":
            raise ValueError(f"opd.merge_scale: applies to opd.init: task_arithmetic only, not {self.init!r}")
        return self


class OPDRecipe(GRPORecipe):
    kind: Literal["opd"]  # type: ignore[assignment]
    """On-policy distillation (reverse KL) of one or more teachers into the student."""
    teachers: list[TeacherSection] = Field(min_length=1)
    """Specialist teachers."""
    opd: OPDSection = Field(default_factory=OPDSection)
    """The distillation loss."""
    rewards: RewardsSection = Field(default_factory=lambda: RewardsSection(terms=[RewardTerm(name="math", weight=0)]))
    """Reward terms. Of weight 0 (the default) they only grade held-out evaluation; a term with a weight mixes a
    group-normalised outcome advantage into the distillation (then `rollout.n` >= 2)."""

    @property
    def outcome_reward(self) -> bool:
        """A reward term with a weight mixes its group-normalised advantage into the distillation."""
        return any(t.weight != 0 for t in self.rewards.terms)

    @model_validator(mode="after")
    def _distillation_options(self) -> "OPDRecipe":
        if self.rollout.temperature == 0:
            raise ValueError("rollout.temperature: OPD scores the student's samples under the teacher at the rollout "
                             "temperature; greedy decoding (0) has no distribution to match, use > 0")
        for name in ("loss", "kl_beta", "entropy_coef"):
            if name in self.algorithm.model_fields_set:
                raise ValueError(f"algorithm.{name}: OPD's loss is the reverse KL to the teachers (opd.estimator); "
                                 f"algorithm.{name} applies to kind: grpo only")
        if self.outcome_reward and self.rollout.n < 2:
            raise ValueError(f"rollout.n: an outcome reward (a rewards.terms weight != 0) is group-normalised, so it "
                             f"needs n >= 2 (got {self.rollout.n})")
        if self.opd.discount and self.opd.estimator != "sampled":
            raise ValueError(f"opd.discount: applies to the sampled estimator only, not {self.opd.estimator!r}")
        sources = [src.name for src in self.data.sources]
        for i, t in enumerate(self.teachers):
            unknown = [d for d in t.domains if d not in sources]
            if unknown:
                raise ValueError(f"teachers.{i}.domains: {unknown[0]!r} is not a data source "
                                 f"(data.sources: {sources or 'none'})")
            if t.backend == "vllm" and self.opd.estimator == "full":
                raise ValueError(f"teachers.{i}.backend: vllm returns top-k prompt logprobs, not whole rows; the full "
                                 "estimator needs backend: torch")
            if t.path is None and t.from_stage is None:
                raise ValueError(f"teachers.{i}: set path or from_stage")
        return self


class RMRecipe(StageBase):
    kind: Literal["rm"]
    """Reward-model training: pairwise Bradley-Terry loss on chosen/rejected pairs, full or LoRA."""
    model: ModelSection = Field(default_factory=ModelSection)
    """Starting checkpoint (a causal LM gets a fresh scalar head; a reward checkpoint keeps its own)."""
    data: DataSection = Field(default_factory=lambda: DataSection(num_train=2000, num_eval=200))
    """Preference pairs (`pairwise`, `llmbar`, `hh_rlhf`); unset `path` = synthetic math pairs (a worked
    solution against the same one ending in a wrong answer)."""
    trainer: TrainerSection = Field(default_factory=lambda: TrainerSection(lr=2e-4, max_steps=100, eval_every=25,
                                                                           save_every=100))
    """Optimisation (`batch_size` counts pairs)."""

    @model_validator(mode="after")
    def _batch_divides(self) -> "RMRecipe":
        self.trainer.check_batch_divides()
        return self


class EvalRMRecipe(StageBase):
    kind: Literal["eval_rm"]
    """Evaluate a critic (reward model, judge or rule) on held-out preference pairs."""
    critic: str = "length"
    """`length` (the length-only baseline), `rule:NAME` (a registered reward: math, format, code), `judge:DIR`
    (a generative judge served by vLLM, asked in both orders), or a reward-model checkpoint directory (ours,
    or any transformers sequence classifier with one label)."""
    data: DataSection = Field(default_factory=DataSection)
    """Pairs: `pairwise`, `llmbar`, `hh_rlhf` files (every row is evaluated); unset `path` = the synthetic
    math pairs' held-out split."""
    reference: str | None = None
    """Critic-of-critics reference set (JSONL: prompt, chosen, rejected, slice[, answer]); unset = the shipped one."""
    meta_critic: bool = True
    """Also run the meta-critic on the reference set and write `meta_critic.json`."""
    batch_size: int = Field(16, ge=1)
    """Pairs per critic call."""
    max_length: int = Field(1024, ge=8)
    """Tokens per (prompt, response) for model critics; longer ones keep their end."""
    bootstrap: int = Field(1000, ge=10)
    """Bootstrap resamples for the accuracy interval."""
    seed: Seed = 0
    """Seed of the bootstrap, in [0, 2**32) (the report is a function of critic, data and seed)."""
    limit: int | None = Field(None, ge=1)
    """Evaluate only the first this-many pairs."""


MODEL_STAGE_KINDS = ("sft", "grpo", "opd")
"""Stage kinds whose output is a policy checkpoint that later stages start from and `evaluate` grades."""
_EVAL_UNUSED_ROLLOUT = ("prompts_per_step", "n", "temperature", "top_p")


class EvaluateRecipe(StageBase):
    kind: Literal["evaluate"]
    """Held-out accuracy per domain of earlier pipeline stages' final checkpoints on vLLM, and the pipeline report
    (`pipeline_report.json` / `.md` in the pipeline's output_dir): accuracy, trainer tokens and wall seconds per
    stage, and what an OPD student keeps of the specialists' gains at what share of their compute."""
    stages: list[str] = Field(default_factory=list)
    """Earlier model stages (sft, grpo, opd) whose final checkpoints to evaluate; empty = all of them. The checkpoint
    the pipeline's first model stage started from is evaluated too, as the row `start`."""
    data: DataSection = Field(default_factory=lambda: DataSection(sources=[SourceSection(name="math", synthetic="math")]))
    """The held-out sets, one per domain in `data.sources` (each source's held-out split; the training rows are not
    used): the same sources as the stages' give the same held-out rows."""
    rewards: RewardsSection = Field(default_factory=RewardsSection)
    """Rule terms that grade each domain: a domain's verifier is the first rule term scoring it (`domains` empty or
    naming it). Every domain needs one; weights are not used, and critic terms are refused."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """How the held-out prompts are decoded: greedy (the default), or `n` samples at `temperature` (pass@1, with
    greedy beside it), as in GRPO's evaluation."""
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    """The vLLM engines: workers, CPUs/GPUs, threads, `max_tokens`, `stop`, memory, eager mode. Its sampling
    fields (`prompts_per_step`, `n`, `temperature`, `top_p`) are refused: `eval` says how to decode."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The engines' parameter dtype (fp32 on CPU, as the stages' `model.dtype`)."""
    seed: Seed = 0
    """Seed of sampled evaluation (`eval.temperature > 0`), in [0, 2**32)."""
    parity_threshold: float = Field(1e-3, gt=0, le=1.0)
    """Checkpoints of one architecture and tokenizer share an engine: each after the first has its weights pushed in
    (a second, against a new engine's 12-20 s start), and the engine's logprobs on a probe must then match our
    model's on that checkpoint within this many nats, else the stage stops (as `sync.parity_threshold`)."""

    @model_validator(mode="after")
    def _grades_every_domain(self) -> "EvaluateRecipe":
        if not self.data.sources:
            raise ValueError("data.sources: an evaluate stage reports accuracy per domain; name each held-out set "
                             "in data.sources")
        unused = [f for f in _EVAL_UNUSED_ROLLOUT if f in self.rollout.model_fields_set]
        if unused:
            raise ValueError(f"rollout.{unused[0]}: an evaluate stage decodes as `eval` says (eval.temperature, "
                             "eval.n, eval.top_p); rollout only sets up the engines")
        sources = [src.name for src in self.data.sources]
        for i, term in enumerate(self.rewards.terms):
            if term.name.startswith("critic:"):
                raise ValueError(f"rewards.terms.{i}.name: an evaluate stage grades with rule verifiers; "
                                 f"{term.name!r} is a critic")
            unknown = [d for d in term.domains if d not in sources]
            if unknown:
                raise ValueError(f"rewards.terms.{i}.domains: {unknown[0]!r} is not a data source (data.sources: "
                                 f"{sources})")
        for d in sources:
            if not any(not t.domains or d in t.domains for t in self.rewards.terms):
                raise ValueError(f"rewards.terms: domain {d!r} has no verifier (a rule term with `domains` empty or "
                                 "naming it)")
        return self


Stage = Annotated[Union[SFTRecipe, GRPORecipe, OPDRecipe, RMRecipe, EvalRMRecipe, EvaluateRecipe],
                  Field(discriminator="kind")]


class PipelineRecipe(StageBase):
    kind: Literal["pipeline"]
    """Stages run in order; a stage names an earlier one in `model.from_stage` / `teachers[].from_stage`."""
    stages: list[Stage] = Field(min_length=1)
    """The stages."""

    @model_validator(mode="after")
    def _stage_refs(self) -> "PipelineRecipe":
        seen: list[str] = []
        for i, stage in enumerate(self.stages):
            name = stage.name or f"stage{i}"
            refs = []
            if getattr(stage, "model", None) is not None and stage.model.from_stage:
                refs.append(("model.from_stage", stage.model.from_stage))
            for j, t in enumerate(getattr(stage, "teachers", []) or []):
                if t.from_stage:
                    refs.append((f"teachers.{j}.from_stage", t.from_stage))
            evaluations = [s.name or f"stage{k}" for k, s in enumerate(self.stages[:i]) if s.kind in ("eval_rm",
                                                                                                   "evaluate")]
            for field, ref in refs:
                if ref not in seen:
                    raise ValueError(f"stages.{i}.{field}: {ref!r} is not an earlier stage (earlier: {seen or 'none'})")
                if ref in evaluations:
                    raise ValueError(f"stages.{i}.{field}: {ref!r} is an evaluation stage; it writes no checkpoint")
            models = [s.name or f"stage{k}" for k, s in enumerate(self.stages[:i]) if s.kind in MODEL_STAGE_KINDS]
            for j, ref in enumerate(getattr(stage, "stages", []) if stage.kind == "evaluate" else []):
                if ref not in models:
                    raise ValueError(f"stages.{i}.stages.{j}: {ref!r} is not an earlier model stage (sft, grpo, opd; "
                                     f"earlier: {models or 'none'})")
            if name in seen:
                raise ValueError(f"stages.{i}.name: duplicate stage name {name!r}")
            seen.append(name)
        return self


StageRecipe = Union[SFTRecipe, GRPORecipe, OPDRecipe, RMRecipe, EvalRMRecipe, EvaluateRecipe]
Recipe = Union[SFTRecipe, GRPORecipe, OPDRecipe, RMRecipe, EvalRMRecipe, EvaluateRecipe, PipelineRecipe]
RECIPE_KINDS: dict[str, type[BaseModel]] = {
    "sft": SFTRecipe,
    "grpo": GRPORecipe,
    "opd": OPDRecipe,
    "rm": RMRecipe,
    "eval_rm": EvalRMRecipe,
    "evaluate": EvaluateRecipe,
    "pipeline": PipelineRecipe,
}
