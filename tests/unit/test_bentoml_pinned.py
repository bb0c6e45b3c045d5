"""The BentoML internals bentos/bentoml_fixes.py patches are the ones it was written against.

The fixes skip themselves, with a warning, under another BentoML version: the Bentos would still serve,
but slower (docs/performance.md). This test is the check that makes such a change loud: it fails when
BentoML (or simple_di, whose providers `use_bentoml_home` reads) is upgraded, or when any of the
patched functions' source differs from the one the fixes were measured with. Then read the new
source, adapt the fix, measure it again (`make bench`) and update the digests below.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
from importlib.metadata import version

import bentoml
import pytest

from bentos.bentoml_fixes import PATCHED_VERSION

SIMPLE_DI_VERSION = "0.1.5"  # BentoML's dependency injection, as 1.4.40 pins it
# module, qualified name -> the first 16 hex digits of the SHA-256 of its source
PATCHED = {
    # cancel_timeout_timers replaces it
    ("bentoml._internal.server.http.traffic", "TimeoutMiddleware.__call__"): "12e0d26839288a46",
    # gate_first wraps it
    ("_bentoml_impl.server.app", "ServiceAppFactory.middlewares"): "f5a8c8a75d40a638",
    # use_bentoml_home sets it, once it knows it unresolved
    ("bentoml._internal.configuration.containers", "_BentoMLContainerClass.bentoml_home"): "21fb728b23014eb6",
    ("simple_di.providers", "SingletonFactory"): "e9a3946c942fa589",
    # no_usage_tracking replaces it
    ("bentoml._internal.utils.analytics.usage_stats", "do_not_track"): "436375dba8744df4",
}


def source_of(module: str, qualname: str) -> str:
    text = inspect.getsource(importlib.import_module(module))
    nodes, node = ast.parse(text).body, None
    for part in qualname.split("."):
        node = next((n for n in nodes if getattr(n, "name", None) == part), None)
        assert node is not None, f"{module} has no {qualname} any more"
        nodes = getattr(node, "body", [])
    return ast.get_source_segment(text, node)


def test_bentoml_is_the_version_the_fixes_were_written_for():
    assert bentoml.__version__ == PATCHED_VERSION
    assert version("simple-di") == SIMPLE_DI_VERSION


@pytest.mark.parametrize("module, qualname", sorted(PATCHED), ids=[q for _, q in sorted(PATCHED)])
def test_a_patched_internal_is_unchanged(module, qualname):
    digest = hashlib.sha256(source_of(module, qualname).encode()).hexdigest()[:16]
    assert digest == PATCHED[module, qualname], f"{module}.{qualname} changed: read it, then adapt the fix"


def test_the_provider_state_use_bentoml_home_reads_is_there():
    from bentoml._internal.configuration.containers import BentoMLContainer

    provider = BentoMLContainer.bentoml_home
    assert hasattr(provider, "_cache") and hasattr(provider, "_override")
