"""`pagedserve serve` with a scripted engine in place of the model, for the tests that
need the real process (signals, exit status) without loading weights.

    python tests/scripted_serve.py serve --port ... [server flags]

SCRIPTED_STEP_SECONDS: each step sleeps this long (a long request then takes a while).
SCRIPTED_FAIL_TOKEN: a request whose prompt starts with this token id makes the next
step raise, as a device error would.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from server_fixtures import ScriptedEngine  # noqa: E402


class SlowScriptedEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(vocab_size=100, max_model_len=1_000_000, num_blocks=1_000_000)
        self.step_seconds = float(os.environ.get("SCRIPTED_STEP_SECONDS", "0"))
        fail = os.environ.get("SCRIPTED_FAIL_TOKEN")
        self.fail_token = int(fail) if fail else None

    def step(self):
        if self.fail_token is not None and any(
                r["prompt"][:1] == [self.fail_token] for r in self.requests.values()):
            self.fail_next_step = True
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return super().step()


def main() -> int:
    import pagedserve.engine.llm_engine as llm_engine
    from pagedserve.cli import main as pagedserve_main

    llm_engine.LLMEngine = lambda config: SlowScriptedEngine()
    return pagedserve_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
