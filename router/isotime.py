"""Times as the router's admin surface shows them: ISO-8601 in UTC, to the millisecond."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def iso(seconds: float) -> str: ...
@overload
def iso(seconds: None) -> None: ...
def iso(seconds: float | None) -> str | None:
    """``2026-12-04T19:02:03.123Z`` for a Unix time; None stays None."""
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
