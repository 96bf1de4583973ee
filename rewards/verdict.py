"""What a reward returns: a score and an honest status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["correct", "wrong", "unparsable", "timeout", "error"]
STATUSES: tuple[str, ...] = ("correct", "wrong", "unparsable", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    score: float
    status: Status
    extracted: str | None = None
    detail: str = ""
