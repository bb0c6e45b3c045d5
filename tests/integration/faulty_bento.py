"""Test-only: the one Bento template with injected faults, served from source by the shadow tests.

`bentoml serve tests.integration.faulty_bento:Recsys --arg model_version=N` serves the production
service (bentos/service.py) unchanged except for its scoring of /predict, which this module wraps:
  RECSYS_TEST_FAULT_ERROR_RATE  the share of requests answered 500 (drawn per request)
  RECSYS_TEST_FAULT_DELAY_MS    every request waits this long before it is logged and answered (the
                                shadow test sets it to the baseline's p99, measured just before, so the
                                candidate's p99 is about twice the baseline's)
The production code has no such hook: only a process that imports this test module has the faults.
"""

from __future__ import annotations

import os
import random
import time

from bentos.service import Recsys

_ERROR_RATE = float(os.environ.get("RECSYS_TEST_FAULT_ERROR_RATE", "0"))
_DELAY_S = float(os.environ.get("RECSYS_TEST_FAULT_DELAY_MS", "0")) / 1000.0
_predict = Recsys.inner._predict
_log = Recsys.inner._log


class InjectedFault(RuntimeError):
    """The failure this test Bento answers a share of its requests with."""


def _faulty_predict(self, info, features):
    if random.random() < _ERROR_RATE:
        raise InjectedFault("injected by tests/integration/faulty_bento.py")
    return _predict(self, info, features)


def _slow_log(self, info, features, score, status):
    if _DELAY_S:
        time.sleep(_DELAY_S)  # blocks the worker's loop, as a slower model would
    _log(self, info, features, score, status)


Recsys.inner._predict = _faulty_predict
Recsys.inner._log = _slow_log

__all__ = ["Recsys"]
