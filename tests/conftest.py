"""Shared fixtures: a real local Ray instance, a real embedded Kafka-protocol broker, real files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from senmon.config import DEFAULT_CONFIG, SenmonConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
# `make test` runs pytest with two xdist workers and `--dist loadgroup`: one runs the `ray up` test
# (as another user, on a Ray of its own) first, then the broker-restart, clean-up, routing-text, security and
# training tests (on a second local Ray, as `senmon up` in the CLI tests already runs beside the
# suite's), the other every other test, each group in file order after that. The `ray up` test goes
# first because the suite's early files (brokers, CLI) leave the two cores 35-60% idle, which its
# node's setup (a fresh virtual environment on a new machine: minutes of pip and compileall) and
# engine starts fill. The broker-restart and clean-up files (about 4 minutes) moved here from the
# suite, which ran 10 minutes past this worker alone (2026-11-27: this worker done after 15.7 of
# 25.4 minutes). The security file (its own `senmon up`, like the clean-up tests) moved here when the training
# tests got shorter (2026-11-27 16:07: the two workers ended 8 s apart before that cut took a run out of this one).
# (xdist's own `xdist_group` marks do not group under pytest 9, which derives node
# ids from a structure xdist does not change, so the groups are made here, by xdist's scheduler hook.)
SEPARATE_GROUPS = {"test_ray_up.py": "beside", "test_broker_restart.py": "beside", "test_cleanup.py": "beside",
                   "test_train.py": "beside", "test_routing_texts.py": "beside", "test_security.py": "beside"}
FIRST = "test_ray_up.py"  # runs first in its group (see above)


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def xdist_group_of(nodeid: str) -> str:
    """The xdist group of a test: its file's entry in SEPARATE_GROUPS, else "suite"."""
    return SEPARATE_GROUPS.get(_file_of(nodeid), "suite")


def pytest_collection_modifyitems(config, items):
    """FIRST's tests before every other test (a stable sort: the rest keep file order)."""
    items.sort(key=lambda item: _file_of(item.nodeid) != FIRST)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own scheduling for other modes
    from xdist.scheduler import LoadScopeScheduling

    class TwoGroups(LoadScopeScheduling):
        """xdist's scope scheduling with xdist_group_of as the scope: each group goes to one worker, in file order."""

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    return TwoGroups(config, log)


@pytest.fixture(scope="session")
def embedded_config_data() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))


@pytest.fixture()
def make_config(tmp_path, embedded_config_data):
    """Build a config from the shipped embedded one, with a private storage root and overrides."""

    def build(**overrides) -> SenmonConfig:
        data = copy.deepcopy(embedded_config_data)
        data["storage_root"] = str(tmp_path / "storage")
        data["corpus_dir"] = str(REPO / "data" / "corpus")
        data["routing_dir"] = str(REPO / "data" / "routing")
        for key, value in overrides.items():
            data[key] = value
        return parse_config(data, source="test", base_dir=REPO / "configs")

    return build


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One embedded broker for the session, on a free loopback port."""
    from senmon.ingest.broker import EmbeddedBroker

    with EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the session (logical CPUs above the 2 cores, as the embedded config)."""
    import ray

    if ray.is_initialized():  # a test before this one touched Ray and it started itself, with defaults
        ray.shutdown()
    from senmon.stack import init_local_ray

    init_local_ray(num_cpus=8, include_dashboard=False, namespace="senmon-test", log_to_driver=False)
    yield ray
    ray.shutdown()
