"""A machine without the hub, for tests of what users see offline.

`unreachable_hub` fails every host name lookup as a machine without a network does and
records the hosts looked up: each is one attempt to reach the hub. `hub_offline` sets
`HF_HUB_OFFLINE=1` instead (and records lookups the same way, which must be none). Both are
fixtures of every test, through tests/conftest.py.
"""

import importlib
import socket

import pytest
from huggingface_hub import constants

from mlsae.lm import hub_access

_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _record_failing_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    attempts: list[str] = []

    def fail(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    # Newer hub clients fetch a registry of agent harnesses once per process, on the first
    # request whatever it is: not an attempt to find a model or dataset, so not counted.
    detect_agent = getattr(importlib.import_module("huggingface_hub.utils"), "_detect_agent", None)
    if hasattr(detect_agent, "_EMPTY_REGISTRY"):
        monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
    for name in _PROXIES:
        monkeypatch.delenv(name, raising=False)
    hub_access.forget_probe()
    return attempts


@pytest.fixture
def unreachable_hub(monkeypatch):
    """No network, `HF_HUB_OFFLINE` unset: yields the hosts looked up."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield _record_failing_lookups(monkeypatch)
    hub_access.forget_probe()


@pytest.fixture
def hub_offline(monkeypatch):
    """`HF_HUB_OFFLINE=1` (set after the hub client was imported, as a user's shell may
    not be), no network: yields the hosts looked up."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield _record_failing_lookups(monkeypatch)
    hub_access.forget_probe()
