"""Test-only: the one Bento template with injected faults, served from source by the shadow tests.

`bentoml serve tests.integration.faulty_bento:Recsys --arg model_version=N` serves the production
service (bentos/service.py) unchanged except for what this module wraps (in its own process only):
  RECSYS_TEST_FAULT_ERROR_RATE  the share of requests answered 500 (drawn per request)
  RECSYS_TEST_FAULT_DELAY_MS    every model request waits this long (without blocking the others, as on a
                                slow feature store) before it is scored, logged and answered; the shadow
                                test sets it to twice the baseline's p99 measured just before, so the
                                candidate's p99 is at least about twice the baseline's
The production code has no such hook: only a process that imports this test module has the faults.
"""

from __future__ import annotations

import asyncio
import os
import random

from bentos.http import RequestGate
from bentos.service import Recsys

_ERROR_RATE = float(os.environ.get("RECSYS_TEST_FAULT_ERROR_RATE", "0"))
_DELAY_S = float(os.environ.get("RECSYS_TEST_FAULT_DELAY_MS", "0")) / 1000.0
_predict = Recsys.inner._predict
_answer = RequestGate._answer


class InjectedFault(RuntimeError):
    """The failure this test Bento answers a share of its requests with."""


def _faulty_predict(self, info, features):
    if random.random() < _ERROR_RATE:
        raise InjectedFault("injected by tests/integration/faulty_bento.py")
    return _predict(self, info, features)


async def _slow_answer(self, answer, info, receive, send):
    if _DELAY_S:
        await asyncio.sleep(_DELAY_S)  # counted in the request's latency from its arrival (info.started)
    await _answer(self, answer, info, receive, send)


Recsys.inner._predict = _faulty_predict
RequestGate._answer = _slow_answer

__all__ = ["Recsys"]
