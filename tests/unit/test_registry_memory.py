"""Registry behaviour, written once: run here on the in-memory registry, in integration on MLflow.

A subclass of `RegistryContract` provides a `registry` fixture holding versions 1, 2 and 3
(profiles control, baseline, better), with no aliases yet.
"""

import pytest

from control_plane.registry import (
    InMemoryRegistry,
    ModelRegistry,
    UnknownAlias,
    VersionNotFound,
)


def _state(registry) -> dict[int, tuple[tuple[str, ...], str]]:
    return {info.version: (info.aliases, info.stage) for info in registry.versions()}


class RegistryContract:
    def test_implements_the_interface(self, registry):
        assert isinstance(registry, ModelRegistry)

    def test_lists_versions_oldest_first_with_their_profiles_and_no_aliases(self, registry):
        infos = registry.versions()
        assert [i.version for i in infos] == [1, 2, 3]
        assert [i.profile for i in infos] == ["control", "baseline", "better"]
        assert all(i.aliases == () for i in infos)
        assert registry.get(2).profile == "baseline"

    def test_an_unknown_version_is_named_in_the_error(self, registry):
        with pytest.raises(VersionNotFound, match="9"):
            registry.get(9)
        for call in (registry.promote, registry.archive, registry.model_uri):
            with pytest.raises(VersionNotFound, match="9"):
                call(9)
        with pytest.raises(VersionNotFound, match="9"):
            registry.set_alias("canary", 9)
        assert registry.version_for("canary") is None

    def test_an_unknown_alias_is_refused(self, registry):
        with pytest.raises(UnknownAlias, match="champion"):
            registry.set_alias("champion", 1)
        with pytest.raises(UnknownAlias):
            registry.version_for("latest")

    def test_each_alias_brings_its_stage(self, registry):
        registry.set_alias("baseline", 1)
        registry.set_alias("canary", 2)
        registry.set_alias("previous_baseline", 3)
        assert _state(registry) == {
            1: (("baseline",), "Production"),
            2: (("canary",), "Staging"),
            3: (("previous_baseline",), "Archived"),
        }
        assert registry.version_for("canary") == 2

    def test_moving_an_alias_takes_it_from_the_old_holder_which_keeps_its_stage(self, registry):
        registry.set_alias("canary", 2)
        registry.set_alias("canary", 3)
        registry.set_alias("canary", 3)
        assert _state(registry)[2] == ((), "Staging")
        assert _state(registry)[3] == (("canary",), "Staging")

    def test_removing_an_alias_twice_is_harmless(self, registry):
        registry.set_alias("control", 1)
        registry.remove_alias("control")
        registry.remove_alias("control")
        assert registry.version_for("control") is None
        assert _state(registry)[1] == ((), "Staging")

    def test_promoting_the_canary_archives_the_old_baseline_as_previous(self, registry):
        registry.set_alias("control", 1)
        registry.set_alias("baseline", 2)
        registry.set_alias("canary", 3)
        registry.promote(3)
        want = {
            1: (("control",), "Staging"),
            2: (("previous_baseline",), "Archived"),
            3: (("baseline",), "Production"),
        }
        assert _state(registry) == want
        registry.promote(3)
        assert _state(registry) == want

    def test_promoting_with_no_baseline_leaves_no_previous(self, registry):
        registry.promote(1)
        assert registry.version_for("baseline") == 1
        assert registry.version_for("previous_baseline") is None

    def test_promoting_the_previous_baseline_swaps_them_back(self, registry):
        registry.promote(1)
        registry.promote(2)
        registry.promote(1)
        assert _state(registry)[1] == (("baseline",), "Production")
        assert _state(registry)[2] == (("previous_baseline",), "Archived")

    def test_archiving_removes_role_aliases_and_is_idempotent(self, registry):
        registry.set_alias("baseline", 1)
        registry.set_alias("canary", 2)
        registry.archive(2)
        registry.archive(2)
        registry.archive(3)  # a version with no alias can be archived too
        assert _state(registry) == {
            1: (("baseline",), "Production"),
            2: ((), "Archived"),
            3: ((), "Archived"),
        }
        assert registry.version_for("canary") is None

    def test_a_version_can_be_revived_from_the_archive(self, registry):
        registry.archive(2)
        registry.set_alias("canary", 2)
        assert _state(registry)[2] == (("canary",), "Staging")

    def test_model_uri_pins_the_version(self, registry):
        registry.set_alias("baseline", 2)
        uri = registry.model_uri(2)
        assert uri == f"models:/{registry.model_name}/2"
        assert "latest" not in uri and "@" not in uri


class TestInMemoryRegistry(RegistryContract):
    @pytest.fixture
    def registry(self):
        registry = InMemoryRegistry("recsys")
        for profile in ("control", "baseline", "better"):
            registry.add_version(profile=profile, metrics={"accuracy": 0.75})
        return registry


def test_in_memory_versions_are_snapshots():
    registry = InMemoryRegistry()
    registry.add_version(profile="baseline", metrics={"accuracy": 0.75})
    info = registry.get(1)
    info.metrics["accuracy"] = 0.0
    registry.set_alias("baseline", 1)
    assert info.aliases == () and registry.get(1).metrics == {"accuracy": 0.75}
