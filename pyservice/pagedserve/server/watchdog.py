"""StepWatchdog: health turns NOT_SERVING while one engine step runs too long.

A step that hangs (a wedged device, a kernel that never returns) blocks every request
without raising anything. The watchdog, on the event loop, reads the engine thread's
`step_started_at`; past `step_timeout` it reports the server unhealthy (probes and
load balancers then stop sending work, and the liveness probe restarts a pod that stays
stuck) and logs which requests were in the step. When steps move again it reports
healthy, unless the engine has failed for good.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


class StepWatchdog:
    def __init__(self, engine: Any, step_timeout: float,
                 set_healthy: Callable[[bool], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine  # AsyncEngine: step_started_at, running_request_ids(), is_healthy
        self.step_timeout = step_timeout
        self._set_healthy = set_healthy
        self._clock = clock
        # Checked this often: a stall is seen within 1.25 x step_timeout (or 1 s after).
        self.interval = min(step_timeout / 4, 1.0)
        self.stalled_step: float | None = None  # start time of the step reported stuck
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def check(self) -> None:
        """One look at the engine; public so tests and callers can force one."""
        started = self.engine.step_started_at
        if self.stalled_step is None:
            if started is not None and self._clock() - started > self.step_timeout:
                self.stalled_step = started
                requests = sorted(self.engine.running_request_ids())
                logger.error("engine step running for %.1fs (limit %gs); NOT_SERVING until "
                             "it returns. Requests in the step: %s", self._clock() - started,
                             self.step_timeout, ", ".join(requests) or "none")
                await self._set_healthy(False)
        elif started != self.stalled_step:  # that step returned (and maybe another began)
            self.stalled_step = None
            if self.engine.is_healthy:
                logger.warning("engine steps resumed; SERVING")
                await self._set_healthy(True)
