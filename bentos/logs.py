"""JSON log lines for the Bento, each carrying the request id of the request it belongs to."""

from __future__ import annotations

import json
import logging

from bentos.http import current_request

EXTRA_FIELDS = ("status", "latency_ms")  # passed with `extra=` by the access log


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, model version, request id and route."""

    def __init__(self, model_version: int) -> None:
        super().__init__()
        self.model_version = model_version

    def format(self, record: logging.LogRecord) -> str:
        info = current_request.get()
        line = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "model_version": self.model_version,
            "request_id": info.request_id if info is not None else None,
        }
        if info is not None:
            line["endpoint"] = info.endpoint
            line["route"] = info.route
            line["role"] = info.role
        for key in EXTRA_FIELDS:
            if key in record.__dict__:
                line[key] = record.__dict__[key]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class DropClientErrors(logging.Filter):
    """BentoML logs every refused input as an ERROR with a traceback (and the input): 4xx are not errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            return False
        code = getattr(getattr(exc, "error_code", None), "value", 500)
        return not (isinstance(code, int) and code < 500)


def detach_uvicorn_access_log() -> None:
    """Leave uvicorn's access logger without a handler, its ancestors' included.

    uvicorn decides, per connection, to build an access line for every response when that logger
    or an ancestor has a handler: the root's did, so each response formatted the client's address
    and path and called a logger that dropped the line (nothing printed it). One JSON line per
    request is ours to turn on (RECSYS_ACCESS_LOG).
    """
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False


def use_json_logs(model_version: int) -> None:
    """Give every handler BentoML set up in this worker (and our `recsys.*` loggers) the JSON format."""
    logging.getLogger("bentoml._internal.server.http_app").addFilter(DropClientErrors())
    detach_uvicorn_access_log()
    formatter = JsonFormatter(model_version)
    recsys = logging.getLogger("recsys")
    recsys.setLevel(logging.INFO)
    seen = set()
    for name in ("", "bentoml", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
            seen.add(id(handler))
    if not seen:  # nothing configured (not under `bentoml serve`): log to stderr ourselves
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        recsys.addHandler(handler)
        recsys.propagate = False
