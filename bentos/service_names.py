"""How Bentos and BentoML models are named after registered versions (no BentoML import)."""

from __future__ import annotations


def bento_tag(version: int, model_name: str = "recsys") -> str:
    """The Bento serving registered version `version`: `recsys:v3`."""
    return f"{model_name}:v{version}"


def model_tag(version: int, model_name: str = "recsys") -> str:
    """The BentoML model store copy of registered version `version`: `recsys-model:v3`."""
    return f"{model_name}-model:v{version}"
