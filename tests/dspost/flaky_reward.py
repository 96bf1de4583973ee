"""A reward for tests, importable without torch (the scoring pool's workers import it by name)."""

from dspost.rewards.verdict import Verdict


def scorer_breaks_on_x(response: str, example: dict) -> Verdict:
    """Fails (status `error`, a reward that could not be computed) on responses containing an x."""
    if "x" in response:
        return Verdict(0.0, "error", None, "the scorer broke")
    return Verdict(1.0, "correct")
