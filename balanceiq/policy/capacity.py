"""Old names for the decision core's breach and critical-set helpers (:mod:`.decide`)."""

from __future__ import annotations

from balanceiq.policy.decide import with_forced as with_breaching
from balanceiq.policy.memory import BREACH_ERROR_RATE
from balanceiq.policy.memory import window_breaching as breaching

__all__ = ["BREACH_ERROR_RATE", "breaching", "with_breaching"]
