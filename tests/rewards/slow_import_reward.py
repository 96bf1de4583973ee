"""A reward whose module takes 2 s to import (as one pulling in `datasets` does), for the pool's tests."""

import time

from dspost.rewards.verdict import Verdict

time.sleep(2.0)


def score(response: str, example: dict) -> Verdict:
    return Verdict(1.0, "correct")
