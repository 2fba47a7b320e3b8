"""The node's real-time factor: device seconds distilled per second of wall time (issue 12).

A QKD link is judged by the key it delivers per second of wall time. The device produces
``pulses / rep_rate_hz`` seconds of raw material per frame; the node keeps up with it only if it
distils those frames at least as fast as the device makes them. The *real-time factor* is

    real_time_factor = (device seconds of the rounds accepted in the window) / (window length),

over a sliding window of wall time (60 s by default, or the time since the meter started if that is
shorter). 1.0 means the node keeps up with its device; 0.08 means it throws away 92 % of what the
device could give. Aborted rounds count for nothing (their frames gave no key), and so do pauses
while a key store is full: the figure says how much of the device's time became key, honestly.
"""

from __future__ import annotations

import time
from collections import deque


class RealTimeMeter:
    """Sliding-window real-time factor; ``add`` once per accepted round. Not thread-safe (one writer)."""

    def __init__(self, window_s: float = 60.0, *, start: float | None = None) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.start = time.time() if start is None else start
        self.total_device_s = 0.0
        self._events: deque[tuple[float, float]] = deque()

    def __repr__(self) -> str:
        return f"RealTimeMeter(window_s={self.window_s}, total_device_s={self.total_device_s:.3f})"

    def restart(self, start: float | None = None) -> None:
        """Start the window again (e.g. when the node starts generating): earlier idle time does not count."""
        self.start = time.time() if start is None else start
        self._events.clear()

    def add(self, device_s: float, at: float | None = None) -> None:
        """Record a round that distilled ``device_s`` seconds of device time, finished at ``at`` (wall time)."""
        at = time.time() if at is None else at
        self.total_device_s += device_s
        self._events.append((at, device_s))
        self._trim(at)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._events.popleft()

    def factor(self, now: float | None = None) -> float:
        """Device seconds distilled per wall second over the window ending at ``now`` (0 before any time passed)."""
        now = time.time() if now is None else now
        self._trim(now)
        span = min(self.window_s, now - self.start)
        if span <= 0:
            return 0.0
        return sum(d for t, d in self._events if t > now - self.window_s) / span
