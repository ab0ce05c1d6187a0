"""Adaptive per-batch concurrency: batch traffic yields to online traffic.

AIMD on the engines' answers: each success adds ``1/limit`` (about +1 per round trip
of a full window), each 429/503 halves the limit. Online pressure then scales the
window down: ``Dispatcher.pressure()`` p gives ``limit * (1 - p)``, and at or above
``pressure_high`` the batch runs at its minimum.
"""

from __future__ import annotations

import math


class AdaptiveLimit:
    def __init__(self, minimum: int, initial: int, maximum: int, pressure_high: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.pressure_high = pressure_high
        self.limit = float(initial)

    def on_success(self) -> None:
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)

    def on_overload(self) -> None:
        self.limit = max(float(self.minimum), self.limit / 2)

    def allowed(self, pressure: float) -> int:
        """How many lines may be in flight now, given the online pressure (0..1)."""
        if pressure >= self.pressure_high:
            return self.minimum
        scaled = self.limit * (1.0 - max(0.0, pressure))
        return max(self.minimum, math.floor(scaled))
