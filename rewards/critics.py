"""Critics: a scalar critic scores (prompt, response); a pair judge says which of two responses is better.

Both answer `compare(pairs)` with one `Judgment` per pair, so reward-model evaluation and the meta-critic
treat every kind alike. Kinds: `LengthCritic` (the length-only baseline), `RuleCritic` (a rule-based reward
from this package), `SequenceClassifierCritic` (a local reward model: ours with a scalar head, or any
transformers `AutoModelForSequenceClassification`), `VLLMJudge` (a generative judge served by vLLM, asked
in both orders). `make_critic(spec)` builds one from a command-line or recipe string; a judge's engine comes
from the caller (`judge_engine`): rewards sits beside rollout and does not start engines itself."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Progress = Callable[[int], None]  # called with the number of pairs just finished


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str  # the gold-preferred response
    rejected: str
    category: str | None = None
    answer: str | None = None  # gold final answer of a verifiable pair (rule critics grade against it)
    row: int | None = None  # the data row it came from, numbered as in the loader's `BadRows` (None: not from data)


@dataclass(frozen=True)
class Judgment:
    preference: int | None  # +1 chosen preferred, -1 rejected preferred, 0 tie, None no judgment
    score_chosen: float | None = None  # scalar critics
    score_rejected: float | None = None
    orders: tuple[int | None, int | None] | None = None  # pair judges: preference with chosen shown first, second
    detail: str = ""


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _prefer(c: float, r: float) -> int:
    """+1 / -1 / 0 (tie); scores equal up to float noise tie (a corrected critic's residuals are noise)."""
    return 0 if abs(c - r) <= 1e-9 * max(1.0, abs(c), abs(r)) else _sign(c - r)


class Critic:
    """Scalar critic: higher score = better response. Subclasses implement `score`."""

    name = "critic"
    pairwise = False
    batch_size = 32

    def score(self, prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None]) -> list[float | None]:
        raise NotImplementedError

    def compare(self, pairs: Sequence[Pair], progress: Progress | None = None) -> list[Judgment]:
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i: i + self.batch_size]
            prompts = [p.prompt for p in chunk] * 2
            scores = self.score(prompts, [p.chosen for p in chunk] + [p.rejected for p in chunk],
                                [p.answer for p in chunk] * 2)
            for j, _ in enumerate(chunk):
                c, r = scores[j], scores[len(chunk) + j]
                failed = c is None or r is None
                out.append(Judgment(None if failed else _prefer(c, r), c, r, detail="critic failed" if failed else ""))
            if progress:
                progress(len(chunk))
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LengthCritic(Critic):
    """Prefers the longer response (characters): the length-only baseline, and a planted length bias."""

    name = "length"

    def score(self, prompts, responses, answers):
        return [float(len(r)) for r in responses]


class LengthCorrected(Critic):
    """Another critic's score minus its measured dependence on length (`slope` per character)."""

    def __init__(self, inner: Critic, slope: float):
        self.inner, self.slope = inner, slope
        self.name = f"{inner.name}-length-corrected"
        self.batch_size = inner.batch_size

    def score(self, prompts, responses, answers):
        raw = self.inner.score(prompts, responses, answers)
        return [None if s is None else s - self.slope * len(r) for s, r in zip(raw, responses)]


class RuleCritic(Critic):
    """A rule-based reward of this package (`math`, `format`, `code`) as a critic, run in its scoring pool
    (time- and memory-limited). A verdict that could not be checked (`error`, `timeout`) is no judgment."""

    def __init__(self, reward: str, options: dict | None = None, timeout: float = 5.0, workers: int = 2):
        from dspost.rewards.pool import ScoringPool
        from dspost.rewards.registry import resolve

        self.name, self.target, self.options, self.timeout = f"rule:{reward}", resolve(reward), options or {}, timeout
        self.pool = ScoringPool(workers)

    def score(self, prompts, responses, answers):
        verdicts = self.pool.map(self.target, [(r, {"answer": a, "prompt": p}) for p, r, a in zip(prompts, responses, answers)],
                                 self.timeout, self.options)
        return [None if v.status in ("error", "timeout") else v.score for v in verdicts]

    def close(self) -> None:
        self.pool.close()


def render(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of a (prompt, response) exchange: the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response}], tokenize=True, return_dict=True)
        return list(enc["input_ids"])
    return list(tokenizer(prompt + "\n\n" + response)["input_ids"])


class SequenceClassifierCritic(Critic):
    """A local reward model: our DeepSeek MoE with a scalar head (`kind: rm` recipes write one), or any
    transformers `AutoModelForSequenceClassification` checkpoint with one label. Sequences longer than
    `max_length` keep their last tokens (where the response ends); batches are sorted by length."""

    def __init__(self, path: str | Path, batch_size: int = 16, max_length: int = 1024, device: str = "cpu"):
        import torch

        from dspost.model import load_tokenizer
        from dspost.model.reward_model import is_reward_checkpoint, load_reward_model

        self.name, self.batch_size, self.max_length, self.device = str(path), batch_size, max_length, device
        self.tokenizer = load_tokenizer(str(path))
        if is_reward_checkpoint(path):
            self.model, self.ours = load_reward_model(path).to(device), True
            self.pad_id = self.model.args.pad_token_id
        else:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
            if self.model.config.num_labels != 1:
                raise ValueError(f"{path}: a reward model has one output label, this one has {self.model.config.num_labels}")
            self.ours = False
            self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            if not self.ours:
                self.model.config.pad_token_id = self.pad_id
        self.truncated = 0

    def score(self, prompts, responses, answers):
        import torch

        seqs = [render(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        self.truncated += sum(len(s) > self.max_length for s in seqs)
        seqs = [s[-self.max_length:] for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        scores: list[float | None] = [None] * len(seqs)
        with torch.inference_mode():
            for k in range(0, len(order), self.batch_size):
                idx = order[k: k + self.batch_size]
                S = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), S), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), S), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, : len(seqs[i])] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                out = self.model(ids, self.pad_id) if self.ours else self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
                for row, i in enumerate(idx):
                    scores[i] = float(out[row])
        return scores


# ------------------------------------------------------------------------------------ generative judge
JUDGE_TEMPLATE = (
    "You are a careful judge. Decide which output follows the instruction better: correct, helpful and "
    "honest first, length and style only after that.\n\n"
    "# Instruction:\n{prompt}\n\n# Output (a):\n{a}\n\n# Output (b):\n{b}\n\n"
    "# Which is better, Output (a) or Output (b)? Answer with exactly \"Output (a)\" or \"Output (b)\"."
)
# Strongest signal first; within a pattern the last match wins (a judge reasons first, then decides).
_VERDICT_PATTERNS = [
    re.compile(r"\[\[\s*([ab])\s*\]\]", re.I),
    re.compile(r"output\s*\(\s*([ab])\s*\)\s*[.!]?\s*$", re.I),  # ends on its choice
    re.compile(r"output\s*\(\s*([ab])\s*\)", re.I),
    re.compile(r"\b(?:response|answer|output|assistant)\s+([ab])\b(?=[^.\n]*\b(?:better|best|preferred|wins?)\b)", re.I),
    re.compile(r"(?:verdict|answer|choice|better(?: one)?)\s*(?:is|:)\s*\(?\s*([ab])\b\)?", re.I),
    re.compile(r"^\s*\(?([ab])\)?\s*\.?\s*$", re.I | re.M),
]


def parse_verdict(text: str) -> str | None:
    """'a', 'b', or None when the judge's text names no choice (or names both, equally strongly)."""
    text = re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.S)
    for pattern in _VERDICT_PATTERNS:
        found = [m.group(1).lower() for m in pattern.finditer(text)]
        if found:
            if len(set(found)) > 1 and pattern is _VERDICT_PATTERNS[2]:
                # "Output (a) ... Output (b)" both mentioned: only a statement of preference decides.
                continue
            return found[-1]
    return None


def combine_orders(first: str | None, second: str | None) -> Judgment:
    """One pair judged with chosen shown as (a), then as (b): verdicts 'a'/'b'/None -> a judgment."""
    o1 = None if first is None else (1 if first == "a" else -1)
    o2 = None if second is None else (1 if second == "b" else -1)
    seen = [o for o in (o1, o2) if o is not None]
    return Judgment(_sign(sum(seen)) if seen else None, orders=(o1, o2),
                    detail="" if seen else "unparsable in both orders")


@dataclass(frozen=True)
class GreedySampling:
    """What a judge asks its engine for: one greedy completion of at most `max_tokens` tokens. The fields are
    the ones an engine's `generate` reads (rollout's `SamplingConfig` has the same; rewards does not import
    rollout, tests/test_architecture.py)."""

    max_tokens: int
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


class VLLMJudge(Critic):
    """A generative judge served by vLLM, asked greedily with chosen first and again with chosen second.
    Agreeing orders decide; orders that disagree are a tie (position bias); one unparsable order leaves the
    other's verdict. `engine`: any engine with `generate(prompt_ids, sampling, version, seed)` returning
    samples with `prompt_index` and `response_ids` (`dspost.rollout.engine.VLLMEngine`), built by the caller."""

    pairwise = True

    def __init__(self, engine, tokenizer, max_tokens: int = 32, name: str = "judge", max_prompt_tokens: int | None = None):
        self.engine, self.tokenizer, self.max_tokens, self.name = engine, tokenizer, max_tokens, name
        self.max_prompt_tokens = max_prompt_tokens
        self.unparsable = self.too_long = 0

    def _ask(self, prompts: list[str]) -> list[str | None]:
        ids = [list(self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                       add_generation_prompt=True, return_dict=True)["input_ids"])
               if getattr(self.tokenizer, "chat_template", None) else list(self.tokenizer(p)["input_ids"])
               for p in prompts]
        # A prompt longer than the engine takes is not judged (no judgment), never silently truncated.
        fits = [i for i, p in enumerate(ids) if self.max_prompt_tokens is None or len(p) <= self.max_prompt_tokens]
        self.too_long += len(ids) - len(fits)
        samples = self.engine.generate([ids[i] for i in fits], GreedySampling(self.max_tokens), version=0, seed=0) \
            if fits else []
        verdicts: list[str | None] = [None] * len(ids)
        for s in samples:
            verdicts[fits[s.prompt_index]] = parse_verdict(self.tokenizer.decode(s.response_ids, skip_special_tokens=True))
        self.unparsable += sum(verdicts[i] is None for i in fits)
        return verdicts

    def compare(self, pairs, progress=None):
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i: i + self.batch_size]
            first = self._ask([JUDGE_TEMPLATE.format(prompt=p.prompt, a=p.chosen, b=p.rejected) for p in chunk])
            second = self._ask([JUDGE_TEMPLATE.format(prompt=p.prompt, a=p.rejected, b=p.chosen) for p in chunk])
            out += [combine_orders(v1, v2) for v1, v2 in zip(first, second)]
            if progress:
                progress(len(chunk))
        return out


def parse_critic(spec: str) -> tuple[str, str]:
    """(kind, argument) of a critic spec: ("length", ""), ("rule", NAME), ("judge", DIR) or ("model", DIR)."""
    kind, sep, rest = spec.partition(":")
    if spec == "length":
        return "length", ""
    if sep and kind in ("rule", "judge"):
        return kind, rest
    return "model", spec


EngineFactory = Callable[[str, int], object]  # (checkpoint directory, max_model_len) -> an engine


def make_critic(spec: str, batch_size: int = 16, max_length: int = 1024, judge_engine: EngineFactory | None = None,
                **options) -> Critic:
    """`length`; `rule:NAME` (a registered reward: math, format, code); `judge:DIR` (a generative judge
    served from that checkpoint by the engine `judge_engine` builds); or a reward-model checkpoint directory."""
    kind, rest = parse_critic(spec)
    if kind == "length":
        return LengthCritic()
    if kind == "rule":
        return RuleCritic(rest, options)
    if kind == "judge":
        from dspost.model import load_tokenizer

        if judge_engine is None:
            raise ValueError(f"critic {spec!r}: a judge needs an engine and none was given "
                             "(make_critic(..., judge_engine=dspost.eval_rm.vllm_engine))")
        # 64 tokens of room for the verdict (max_tokens 32) after the longest prompt judged.
        return VLLMJudge(judge_engine(rest, max_length + 64), load_tokenizer(rest), name=spec,
                         max_prompt_tokens=max_length)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ValueError(f"critic {spec}: directory has no config.json (not a model checkpoint)")
        return SequenceClassifierCritic(spec, batch_size=batch_size, max_length=max_length)
    raise ValueError(f"critic {spec!r}: not a checkpoint directory, and not one of length, rule:NAME, judge:DIR")
