"""Mutation check of the test suite: apply each listed change to a fresh copy of the repository, run the tests
that guard it there, and print whether they caught it.

    .venv/bin/python scripts/mutants.py                 # every mutant (slow: the GRPO rows start vLLM)
    .venv/bin/python scripts/mutants.py --list          # names, files and guarding tests
    .venv/bin/python scripts/mutants.py --only 'loss-*' --only fp8-forward-negated --timeout 300
    .venv/bin/python scripts/mutants.py --only 'fp8-*' --each-test   # which guarding test catches what
    make mutants MUTANTS_ARGS="--only 'pool-*'"          # the same through make (TESTING.md holds the last table)

The working tree is never touched: its files (tracked, plus untracked ones git does not ignore, as they are on
disk) are copied to a temporary directory, and a throw-away virtual environment imports `dspost` from there
(the packages of the interpreter running this script, plus an editable finder mapping `dspost.*` onto the
copy, as /work/mkwt.sh does for worktrees). Each mutant gets a fresh copy of the repository; its snippet must
occur exactly once in its file. A mutant is "caught" only when a guarding test fails; a collection error, an
error in fixtures only, a timeout, or all tests skipped are reported as such, never as caught. A named test id
that does not exist stops the run before any mutant is applied. The guarding tests first run on the
unmutated copy and must pass (`--no-baseline` skips this).

Exit status: 0 when every selected mutant is caught, 1 otherwise, 2 on a bad mutant list (missing test id,
snippet not found exactly once)."""

from __future__ import annotations

import argparse
import ast
import fnmatch
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import tomllib
import venv
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def die(message: str) -> None:
    print(f"mutants: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file in the repository
    old: str  # must occur exactly once in `path`
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail
    why: str  # the behaviour the change breaks


# ================================================================================================================
# The tests guarding the GRPO end-to-end, rollout-restart and scoring-pool rows (issue 18). Each must exist:
# a missing id stops the whole run with "test id not found" (exit 2), never "caught".
GRPO, POOL = "tests/dspost/test_grpo.py::", "tests/rewards/test_pool.py::"
E2E = {
    "grpo_weights_move": GRPO + "test_grpo_moves_the_weights_the_engine_serves_them_and_resume_repeats_the_run",
    "grpo_noop_sync_raises": GRPO + "test_a_sync_that_does_not_reach_the_engine_stops_the_run",
    "grpo_resume": GRPO + "test_grpo_moves_the_weights_the_engine_serves_them_and_resume_repeats_the_run",
    "restart_reloads": GRPO + "test_a_killed_rollout_worker_restarts_on_the_pushed_weights_and_reruns_its_batch",
    "pool_timeout": POOL + "test_a_stuck_item_times_out_and_the_pool_answers_on",
    "pool_dead_worker": POOL + "test_a_worker_killed_mid_item_is_an_error_and_the_pool_answers_on",
}
# ================================================================================================================

LORA_SYNC = "tests/dspost/test_lora_rl.py::test_a_lora_sync_sends_the_merged_adapted_tensors_and_their_fused_partners"
LORA_E2E = "tests/dspost/test_lora_rl.py::test_lora_grpo_syncs_the_adapted_tensors_and_resume_repeats_the_run"
ALG = "tests/dspost/test_algorithms.py::"
TOKEN_LOSSES = ALG + "test_token_ratio_losses_match_their_papers_in_value_and_gradient"
GSPO = ALG + "test_gspo_sequence_ratio_and_clipping_match_the_paper"
KL = ALG + "test_kl_penalty_value_and_gradient"
QT = "tests/model/test_quantized.py::"
FP8_GEMM = QT + "test_fp8_forward_is_the_product_of_e4m3_operands_at_the_format_error"
FP8_BACKWARD = QT + "test_fp8_backward_gemms_are_within_the_format_error_of_the_exact_gradients"
FP8_MODEL = QT + "test_fp8_mode_runs_every_projection_through_e4m3"
FP4_MODEL = QT + "test_fp4_qat_forward_uses_mxfp4_weights_and_passes_the_gradient_straight_through"
LOGITS = QT + "test_training_modes_keep_the_logits_within_the_products_error"
PACKING = "tests/dspost/test_packing.py"
MTP_PACKING = "tests/model/test_mtp_packing.py"
HF_PARITY = "tests/model/test_hf_parity.py"

ALGOS, QUANT, MODEL = "dspost/algorithms.py", "model/quant.py", "model/deepseek_v3.py"
LOSS_TABLE = '"grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "dapo": dapo_loss, "gspo": gspo_loss,'

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------------------------ GRPO end to end
    Mutant("grpo-weight-sync-noop", "dspost/rl.py",
           "metrics = actor_get(self.trainers[0].publish_weights.remote(step + 1))", "metrics = {}",
           (E2E["grpo_weights_move"],), "run_grpo's weight sync does nothing"),
    Mutant("check-parity-never-raises", "dspost/rl.py", "if not mx <= threshold:", "if False:",
           (E2E["grpo_noop_sync_raises"],), "check_parity never raises ParityError"),
    Mutant("grpo-resume-drops-optimizer-state", "dspost/trainer_worker.py",
           "self.optimizer.resume(Path(resume_from) if resume_from else None)",
           "self.optimizer.resume(None)", (E2E["grpo_resume"],),
           "a resumed trainer starts with a fresh optimizer and learning-rate schedule"),
    Mutant("restarted-worker-skips-reload", "rollout/pool.py",
           "            self.rejoin(i, self.workers[i])", "            pass",
           (E2E["restart_reloads"],), "a restarted rollout worker serves its start-up weights"),
    # ---------------------------------------------------------------- LoRA GRPO (tests/dspost/test_lora_rl.py)
    Mutant("lora-sync-skips-fused-partners", "dspost/lora.py", "for partner in fused_group(proj):",
           "for partner in [proj]:", (LORA_SYNC, LORA_E2E),
           "a LoRA sync leaves out the unadapted half of a pair the engine fuses (q_a/kv_a, gate/up)"),
    Mutant("lora-sync-sends-base-weights", "dspost/lora.py", "merged_weights[path] = (w + delta).to(w.dtype)",
           "merged_weights[path] = w", (LORA_SYNC, LORA_E2E), "a LoRA sync sends the adapted modules without the adapter"),
    Mutant("lora-sync-sends-nothing", "dspost/trainer_worker.py", "return adapted_tensors(self.model)", "return []",
           (LORA_E2E,), "a LoRA sync pushes no tensor"),
    Mutant("lora-resume-fresh-adapters", "dspost/trainer_worker.py",
           "load_adapters(self.model, resume_from) if resume_from else add_adapters(",
           "add_adapters(", (LORA_E2E,), "a resumed LoRA trainer starts from fresh adapters"),
    Mutant("lora-resume-engine-serves-base", "dspost/rl.py", "if lora and resume_from:", "if False:",
           (LORA_E2E,), "after a LoRA resume the engines serve the base, not the resumed adapters"),
    Mutant("lora-router-biases-move", "dspost/trainer_worker.py", "0.0 if t.lora else m.bias_update_speed",
           "m.bias_update_speed", (LORA_E2E,), "LoRA RL updates the frozen base's router biases"),
    # ------------------------------------------------------------------------------------------ scoring pool
    Mutant("pool-timeout-as-error", "rewards/pool.py", 'Verdict(0.0, "timeout", None,', 'Verdict(0.0, "error", None,',
           (E2E["pool_timeout"],), "scoring-pool timeouts relabelled error"),
    Mutant("pool-stuck-worker-not-killed", "rewards/pool.py", "busy.pop(i)\n                    self._kill(i)",
           "busy.pop(i)", (E2E["pool_timeout"],),
           "a timed-out worker is left running (not killed and replaced): the next item waits behind it"),
    Mutant("pool-dead-worker-as-timeout", "rewards/pool.py", 'Verdict(0.0, "error", None, "scoring worker died")',
           'Verdict(0.0, "timeout", None, "scoring worker died")', (E2E["pool_dead_worker"],),
           "a worker killed mid-item comes back as a timeout, not an error"),
    Mutant("pool-dead-worker-not-replaced", "rewards/pool.py",
           'results[item] = Verdict(0.0, "error", None, "scoring worker died")\n                    self._kill(i)',
           'results[item] = Verdict(0.0, "error", None, "scoring worker died")', (E2E["pool_dead_worker"],),
           "a worker that died is not replaced: the pool stops answering"),
    # ------------------------------------------------------------------------------- losses and estimators
    Mutant("losses-all-as-grpo", ALGOS, LOSS_TABLE,
           '"grpo": grpo_loss, "dr_grpo": grpo_loss, "dapo": grpo_loss, "gspo": grpo_loss,',
           (TOKEN_LOSSES, GSPO), "dapo, gspo, dr_grpo all run the grpo loss"),
    Mutant("loss-dapo-as-grpo", ALGOS, LOSS_TABLE, LOSS_TABLE.replace('"dapo": dapo_loss', '"dapo": grpo_loss'),
           (TOKEN_LOSSES,), "dapo runs the grpo loss"),
    Mutant("loss-dr_grpo-as-grpo", ALGOS, LOSS_TABLE,
           LOSS_TABLE.replace('"dr_grpo": dr_grpo_loss', '"dr_grpo": grpo_loss'),
           (TOKEN_LOSSES,), "dr_grpo runs the grpo loss"),
    Mutant("loss-gspo-as-grpo", ALGOS, LOSS_TABLE, LOSS_TABLE.replace('"gspo": gspo_loss', '"gspo": grpo_loss'),
           (GSPO,), "gspo runs the grpo loss"),
    Mutant("kl-k3-as-7abs", ALGOS, "return d.exp() - d - 1", "return 7 * d.abs()", (KL,), "k3 replaced by 7|d|"),
    Mutant("kl-registry-k3-as-7abs", ALGOS, '"k3": kl_k3}', '"k3": lambda logp, ref: 7 * (ref - logp).abs()}',
           (KL,), "the k3 picked by name is 7|d| (kl_k3 itself intact)"),
    Mutant("kl-k2-unhalved", ALGOS, "return 0.5 * (logp - ref) ** 2", "return (logp - ref) ** 2", (KL,),
           "k2 without its 1/2"),
    Mutant("kl-beta-ignored", ALGOS, "loss = loss + cfg.kl_beta * kl", "loss = loss + kl", (KL,),
           "the KL term added without beta"),
    Mutant("clip-higher-ignored", ALGOS, "ratio.clamp(1 - lo, 1 + hi)", "ratio.clamp(1 - lo, 1 + lo)",
           (ALG + "test_clip_higher_acts_on_the_side_of_the_advantage",), "eps_high ignored (symmetric clip)"),
    Mutant("clip-sides-swapped", ALGOS, "ratio.clamp(1 - lo, 1 + hi)", "ratio.clamp(1 - hi, 1 + lo)",
           (ALG + "test_clip_higher_acts_on_the_side_of_the_advantage",), "eps_low and eps_high swapped"),
    Mutant("gspo-ratio-not-length-normalised", ALGOS,
           "log_ratio = _masked_mean(x.logprobs - x.old_logprobs, x.mask, dim=1)",
           "log_ratio = ((x.logprobs - x.old_logprobs) * x.mask).sum(1)", (GSPO,),
           "GSPO's sequence ratio is the full product, not its |o|-th root"),
    Mutant("gspo-clipped-at-token-eps", ALGOS, "cfg.seq_eps_low, cfg.seq_eps_high", "cfg.eps_low, cfg.eps_high",
           (GSPO,), "GSPO clips at the token eps instead of seq_eps"),
    Mutant("gspo-drops-rollout-weight", ALGOS, "s = (log_ratio + tis).exp()", "s = log_ratio.exp()",
           (ALG + "test_gspo_folds_the_capped_rollout_weight_into_the_sequence_ratio",),
           "GSPO ignores the rollout/trainer mismatch"),
    Mutant("grpo-token-mean", ALGOS, "loss = x.sequence_mean(_masked_mean(per_token, x.mask, dim=1))",
           "loss = x.token_mean(per_token)", (TOKEN_LOSSES,), "GRPO averages over tokens, not sequences"),
    Mutant("dapo-sequence-mean", ALGOS, 'return x.token_mean(per_token), {"clip_frac"',
           'return x.sequence_mean(_masked_mean(per_token, x.mask, dim=1)), {"clip_frac"', (TOKEN_LOSSES,),
           "DAPO averages per sequence, not over the batch's tokens"),
    Mutant("dr_grpo-token-mean", ALGOS, "loss = x.sequence_mean((per_token * x.mask).sum(1)) / "
           "(x.max_len if x.max_len is not None else x.mask.shape[1])",
           "loss = x.token_mean(per_token)", (TOKEN_LOSSES,), "Dr. GRPO loses its constant normaliser"),
    Mutant("tis-uncapped", ALGOS, ".exp().clamp(max=cap).detach()", ".exp().detach()",
           (TOKEN_LOSSES, ALG + "test_tis_weight_is_capped_and_detached"), "the TIS weight has no cap"),
    Mutant("tis-not-detached", ALGOS, ".exp().clamp(max=cap).detach()", ".exp().clamp(max=cap)",
           (ALG + "test_tis_weight_is_capped_and_detached",), "gradient flows through the TIS weight"),
    Mutant("tis-dropped", ALGOS, "return (x.old_logprobs - x.rollout_logprobs).exp().clamp(max=cap).detach()",
           "return torch.ones_like(x.old_logprobs)", (TOKEN_LOSSES, ALG + "test_tis_weight_is_capped_and_detached"),
           "no importance weight"),
    Mutant("entropy-bonus-sign", ALGOS, "loss = loss - cfg.entropy_coef * x.token_mean(x.entropy)",
           "loss = loss + cfg.entropy_coef * x.token_mean(x.entropy)",
           (ALG + "test_entropy_bonus_value_and_gradient",), "the entropy bonus becomes a penalty"),
    Mutant("adv-dr_grpo-std-normalised", ALGOS, '"dr_grpo": group_centred,', '"dr_grpo": group_normalised,',
           (ALG + "test_advantage_estimators_by_hand",), "Dr. GRPO's advantage divided by the std"),
    Mutant("adv-population-std", ALGOS, "r.std(1, keepdim=True)", "r.std(1, keepdim=True, unbiased=False)",
           (ALG + "test_advantage_estimators_by_hand",), "group std without Bessel's correction"),
    # --------------------------------------------------------------------------------------- meta-critic
    Mutant("meta-critic-one-biased-slice", "rewards/meta_critic.py",
           'biased = sorted(name for name, s in slices.items() if s["verdict"] == "biased")',
           'biased = sorted(name for name, s in slices.items() if s["verdict"] == "biased")[-1:]',
           ("tests/rewards/test_critics.py::test_planted_length_bias_is_flagged_and_corrected",),
           "the meta-critic reports only one of the planted critic's biased slices"),
    # -------------------------------------------------------------------------------- quantised training
    Mutant("fp8-forward-negated", QUANT, "return kernels.fp8_gemm(xq, xs, wq, ws, out_dtype=x2d.dtype)",
           "return -kernels.fp8_gemm(xq, xs, wq, ws, out_dtype=x2d.dtype)", (FP8_GEMM, FP8_MODEL, LOGITS),
           "FP8 forward products negated"),
    Mutant("fp8-forward-full-precision", QUANT, "return kernels.fp8_gemm(xq, xs, wq, ws, out_dtype=x2d.dtype)",
           "return x2d @ w.t()", (FP8_GEMM, FP8_MODEL, LOGITS), "FP8 forward run in full precision"),
    Mutant("fp8-linear-full-precision", QUANT, "y = fp8_matmul(x, self.weight)", "y = x @ self.weight.t()",
           (FP8_MODEL,), "Fp8Linear runs in full precision"),
    Mutant("fp8-linears-not-swapped", QUANT, "module.__class__ = Fp8Linear", "pass", (FP8_MODEL,),
           "apply_training_precision leaves the projections alone"),
    Mutant("fp8-experts-full-precision", QUANT, "base = fp8_grouped_mm if fp8_ok else RoutedExperts.grouped_mm",
           "base = RoutedExperts.grouped_mm", (FP8_MODEL,), "routed experts skip FP8"),
    Mutant("fp8-dgrad-full-precision", QUANT,
           "dx = kernels.fp8_gemm(gq, gs, wq.t().contiguous(), ws.t().contiguous(), out_dtype=ctx.dtype)",
           "dx = g @ kernels.weight_dequant(wq, ws, dtype=ctx.dtype)", (FP8_BACKWARD, FP8_MODEL),
           "Dgrad with the output gradient unrounded"),
    Mutant("fp8-wgrad-full-precision", QUANT, "dw = kernels.fp8_gemm(gTq, gTs, xTq, xTs, out_dtype=ctx.dtype)",
           "dw = (g.t().float() @ _dequant_act(xq, xs, torch.float32)).to(ctx.dtype)", (FP8_BACKWARD,),
           "Wgrad in full precision (on the saved FP8 activations)"),
    Mutant("fp8-wgrad-negated", QUANT, "dw = kernels.fp8_gemm(gTq, gTs, xTq, xTs, out_dtype=ctx.dtype)",
           "dw = -kernels.fp8_gemm(gTq, gTs, xTq, xTs, out_dtype=ctx.dtype)", (FP8_BACKWARD,), "Wgrad negated"),
    Mutant("fp4-qat-noop", QUANT, "return base(x_ND, fp4_qat_weights(w_EOD) if fp4 else w_EOD, counts)",
           "return base(x_ND, w_EOD, counts)", (FP4_MODEL,), "fp4-qat leaves the expert weights unrounded"),
    Mutant("fp4-fake-quant-identity", QUANT, "return kernels.mxfp4_fake_quant(w.detach())", "return w.detach()",
           (FP4_MODEL,), "the MXFP4 fake quantisation returns its input"),
    Mutant("fp4-qat-no-straight-through", QUANT, "return g  # straight through", "return 0 * g  # straight through",
           (FP4_MODEL,), "no gradient reaches the expert master weights"),
    # ----------------------------------------------------------------------------------------------- packing
    Mutant("packed-boundary-targets-unmasked", "dspost/data/packing.py",
           "return ids, next_labels.masked_fill(~same, -100), segments, positions",
           "return ids, next_labels, segments, positions", (PACKING,),
           "collate_packed keeps the targets crossing a sample boundary"),
    Mutant("packed-positions-not-restarted", "dspost/data/packing.py",
           "positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values", "positions = index",
           (PACKING + "::test_collate_packed_drops_the_targets_that_cross_a_sample_boundary",),
           "positions run on across samples"),
    Mutant("mtp-crossing-targets-unmasked", MODEL, "mtp_labels = mtp_labels.masked_fill(crosses, -100)", "pass",
           (MTP_PACKING, PACKING), "MTP targets from the next packed sequence count"),
    # -------------------------------------------------------------------------------------------- HF parity
    Mutant("attention-scale-x1.01", MODEL, "self.softmax_scale = (dn + dr) ** -0.5",
           "self.softmax_scale = (dn + dr) ** -0.5 * 1.01", (HF_PARITY,), "attention softmax scale 1% off"),
    Mutant("yarn-mscale-unsquared", MODEL, 'yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2',
           'yarn_mscale(rs["factor"], rs["mscale_all_dim"])', (HF_PARITY,), "YaRN mscale applied once, not squared"),
]


# ------------------------------------------------------------------------------------------- environment
def working_tree_files(repo: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore, as they are on disk now."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (repo / f).is_file()})


def copy_tree(files: list[str], src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dst / f)


def package_dirs() -> list[str]:
    """The running interpreter's site-packages (from sys.prefix) and the directories their .pth files add,
    without running any .pth import line (so no editable finder of another checkout comes along)."""
    dirs: list[str] = []
    for sp in site.getsitepackages([sys.prefix]):
        if not os.path.isdir(sp):
            continue
        dirs.append(sp)
        for pth in sorted(Path(sp).glob("*.pth")):
            for line in pth.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ")) and os.path.isdir(os.path.join(sp, line)):
                    dirs.append(os.path.abspath(os.path.join(sp, line)))
    return list(dict.fromkeys(dirs))


def make_venv(root: Path, repo_copy: Path, dirs: list[str]) -> Path:
    """A venv whose `dspost` packages import from `repo_copy` (setuptools' editable finder, its MAPPING
    rewritten from pyproject.toml's package-dir) and whose other packages are the running interpreter's."""
    env = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    sp = Path(next(p for p in site.getsitepackages([str(env)]) if "site-packages" in p))
    sp.mkdir(parents=True, exist_ok=True)
    (sp / "zz_packages.pth").write_text("\n".join(dirs) + "\n")
    finders = [f for d in dirs for f in Path(d).glob("__editable___dspost_*finder.py")]
    if not finders:
        die("no setuptools editable finder for dspost next to the running interpreter's packages; "
            "run this script with the project's .venv/bin/python")
    package_dir = tomllib.loads((repo_copy / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mapping = {name: str(repo_copy / path) for name, path in package_dir.items()}
    text, n = re.subn(r"^MAPPING: dict\[str, str\] = \{.*\}$", f"MAPPING: dict[str, str] = {mapping!r}",
                      finders[0].read_text(), count=1, flags=re.M)
    if n != 1:
        die(f"{finders[0]} has no MAPPING line to rewrite")
    (sp / "__editable___dspost_mutants_finder.py").write_text(text)
    (sp / "__editable__.dspost_mutants.pth").write_text(
        "import __editable___dspost_mutants_finder; __editable___dspost_mutants_finder.install()\n")
    return env / "bin" / "python"


# ------------------------------------------------------------------------------------------------ pytest
@dataclass
class Outcome:
    status: str  # caught | missed | collection error | error | timeout | skipped | no tests
    seconds: float
    detail: str = ""
    per_test: dict[str, str] | None = None  # --each-test: each guarding test's own status
    output: str = ""  # pytest's output, shown when the baseline fails


def run_pytest(python: Path, repo_copy: Path, tests: list[str], timeout: float, tmp: Path) -> Outcome:
    """`tests` in the copy, stopping at the first failure; classified from pytest's exit code and junit report
    (a fresh DSPOST_CACHE per run: a cache built by a mutant must not serve the next one)."""
    report = tmp / "junit.xml"
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DSPOST_CACHE", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    data = REPO.parent / "shared" / "data"
    if "DSPOST_SHARED_DATA" not in env and data.is_dir():
        env["DSPOST_SHARED_DATA"] = str(data)
    cmd = [str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--basetemp={tmp / 'pytest'}",
           f"--junitxml={report}", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo_copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest run this function started, and its children
        proc.communicate()
        return Outcome("timeout", time.perf_counter() - t0, f"after {timeout:g}s")
    seconds = time.perf_counter() - t0
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    counts = junit_counts(report)
    if proc.returncode == 1 and counts.get("failures", 0) > 0:
        return Outcome("caught", seconds, tail, output=out)
    if proc.returncode == 0:
        if counts and counts.get("skipped", 0) == counts.get("tests", 0):
            return Outcome("skipped", seconds, tail, output=out)
        return Outcome("missed", seconds, tail, output=out)
    if proc.returncode == 2 or "found no collectors" in out or "ERROR collecting" in out:
        return Outcome("collection error", seconds, tail, output=out)  # e.g. the mutant broke an import
    if proc.returncode == 5:
        return Outcome("no tests", seconds, tail, output=out)
    return Outcome("error", seconds, f"pytest exit {proc.returncode}: {tail}", output=out)


def junit_counts(report: Path) -> dict[str, int]:
    if not report.exists():
        return {}
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def check_test_ids(python: Path, repo_copy: Path, tests: list[str]) -> list[str]:
    """The ids pytest cannot find in the copy (collection only): missing files, then missing tests."""
    missing = [f"{t} (no file {t.split('::')[0]})" for t in tests if not (repo_copy / t.split("::")[0]).is_file()]
    present = [t for t in tests if (repo_copy / t.split("::")[0]).is_file()]
    if not present:
        return missing
    out = subprocess.run([str(python), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *present],
                         cwd=repo_copy, capture_output=True, text=True)
    if out.returncode == 0:
        return missing
    text = out.stdout + out.stderr
    found = [line.replace(str(repo_copy) + "/", "") for line in text.splitlines() if "not found" in line]
    return missing + (found or [f"collection failed (exit {out.returncode}): {text.strip()[-2000:]}"])


# ---------------------------------------------------------------------------------------------------- main
def select(names: list[str] | None) -> list[Mutant]:
    if not names:
        return MUTANTS
    chosen = [m for m in MUTANTS if any(fnmatch.fnmatchcase(m.name, pat) for pat in names)]
    unknown = [pat for pat in names if not any(fnmatch.fnmatchcase(m.name, pat) for m in MUTANTS)]
    if unknown:
        die(f"no mutant named {', '.join(unknown)} (see --list)")
    return chosen


def check_snippets(mutants: list[Mutant], repo: Path) -> list[str]:
    problems = []
    for m in mutants:
        path = repo / m.path
        count = path.read_text().count(m.old) if path.is_file() else -1
        if count != 1:
            where = "file missing" if count < 0 else f"occurs {count} times"
            problems.append(f"{m.name}: snippet {m.old!r} in {m.path}: {where} (must be exactly once)")
    return problems


def enclosing(repo: Path, m: Mutant) -> str:
    """`path::Class.function` holding the mutant's snippet (the innermost definitions around its first line), or
    the module-level name assigned there."""
    text = (repo / m.path).read_text()
    line = text[:text.index(m.old)].count("\n") + 1
    names: list[str] = []
    nodes = ast.parse(text).body
    while True:
        inside = [n for n in nodes if n.lineno <= line <= (n.end_lineno or n.lineno)]
        if inside and isinstance(inside[0], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(inside[0].name)
            nodes = inside[0].body
            continue
        if not names and inside and isinstance(inside[0], (ast.Assign, ast.AnnAssign)):  # a module-level table
            target = inside[0].targets[0] if isinstance(inside[0], ast.Assign) else inside[0].target
            names.append(ast.unparse(target))
        break
    return f"{m.path}::{'.'.join(names) or '(module level)'}"


def run_each(python: Path, repo_copy: Path, tests: tuple[str, ...], timeout: float, tmp: Path) -> Outcome:
    """Every guarding test on its own: the row is caught when one of them fails; each one's status is kept."""
    outcomes = {t: run_pytest(python, repo_copy, [t], timeout, tmp) for t in tests}
    statuses = [o.status for o in outcomes.values()]
    status = "caught" if "caught" in statuses else statuses[0]
    return Outcome(status, sum(o.seconds for o in outcomes.values()), "; ".join(statuses),
                   {t: o.status for t, o in outcomes.items()})


def table(rows: list[tuple[Mutant, Outcome]], repo: Path) -> str:
    lines = ["| mutation | changes | guarding tests | result | seconds |", "|---|---|---|---|---|"]
    for m, o in rows:
        tests = "<br>".join(f"`{t}`" + (f" ({o.per_test[t]})" if o.per_test else "") for t in m.tests)
        why = m.why.replace("|", "\\|")
        lines.append(f"| `{m.name}`: {why} | `{enclosing(repo, m)}` | {tests} | {o.status} | {o.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", metavar="NAME", help="mutant name or glob (repeatable)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run (default 900)")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated copy")
    ap.add_argument("--each-test", action="store_true",
                    help="run every guarding test of a mutant on its own and report each one's result (slower)")
    args = ap.parse_args(argv)
    mutants = select(args.only)
    if args.list:
        for m in mutants:
            print(f"{m.name}\n    {enclosing(REPO, m)}: {m.why}\n" + "".join(f"    {t}\n" for t in m.tests), end="")
        return 0
    t_start = time.perf_counter()
    problems = check_snippets(mutants, REPO)
    if problems:
        print("mutants: stale mutant list:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    files = working_tree_files(REPO)
    with tempfile.TemporaryDirectory(prefix="dspost-mutants-") as tmp_name:
        tmp = Path(tmp_name)
        base, repo_copy = tmp / "base", tmp / "repo"
        copy_tree(files, REPO, base)
        copy_tree(files, REPO, repo_copy)
        python = make_venv(tmp, repo_copy, package_dirs())
        all_tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
        missing = check_test_ids(python, repo_copy, all_tests)
        if missing:
            print("mutants: guarding tests not found (a row is only 'caught' by tests that exist):\n  "
                  + "\n  ".join(missing), file=sys.stderr)
            return 2
        if not args.no_baseline:
            base_run = run_pytest(python, repo_copy, all_tests, args.timeout * 2, tmp)
            print(f"baseline (unmutated): {base_run.status.replace('missed', 'all pass')} "
                  f"in {base_run.seconds:.0f}s: {base_run.detail}", flush=True)
            if base_run.status != "missed":
                print("\n".join(base_run.output.splitlines()[-60:]), file=sys.stderr)
                print("mutants: the guarding tests do not all pass on the unmutated code", file=sys.stderr)
                return 2
        rows = []
        for m in mutants:
            copy_tree(files, base, repo_copy)  # fresh for every mutant
            path = repo_copy / m.path
            path.write_text(path.read_text().replace(m.old, m.new, 1))
            outcome = (run_each(python, repo_copy, m.tests, args.timeout, tmp) if args.each_test
                       else run_pytest(python, repo_copy, list(m.tests), args.timeout, tmp))
            rows.append((m, outcome))
            print(f"{m.name}: {outcome.status} ({outcome.seconds:.0f}s) {outcome.detail}", flush=True)
    print()
    print(table(rows, REPO))
    caught = sum(o.status == "caught" for _, o in rows)
    print(f"\n{caught}/{len(rows)} caught in {time.perf_counter() - t_start:.0f}s")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
