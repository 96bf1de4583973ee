"""Rewards: verifiers that return a score with a status (correct, wrong, unparsable, timeout, error)."""

from dspost.rewards.math import extract_answer, verify_math
from dspost.rewards.verdict import STATUSES, Verdict

__all__ = ["STATUSES", "Verdict", "extract_answer", "verify_math"]
