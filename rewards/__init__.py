"""Rewards: verifiers that return a score with a status (correct, wrong, unparsable, timeout, error)."""

from dspost.rewards.code import run_code_tests, run_io_tests
from dspost.rewards.math import extract_answer, verify_math
from dspost.rewards.pool import PoolError, ScoringPool, pool_unavailable, verify_math_batch
from dspost.rewards.registry import REWARDS, resolve
from dspost.rewards.sandbox import sandbox_unavailable
from dspost.rewards.verdict import STATUSES, Verdict

__all__ = ["REWARDS", "STATUSES", "PoolError", "ScoringPool", "Verdict", "extract_answer", "pool_unavailable", "resolve",
           "run_code_tests", "run_io_tests", "sandbox_unavailable", "verify_math", "verify_math_batch"]
