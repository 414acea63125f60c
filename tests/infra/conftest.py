"""Fixtures for the infra tests: a RunPod emulator and a client on it whose waits are recorded."""

from __future__ import annotations

import time

import pytest

from infra.runpod import RunPodClient
from tests.emulator import RunPodEmulator, ssh_supported


class Sleeps(list):
    """A `sleep` for RunPodClient: records each requested wait, really waits only a little, so
    retry policy is observable (Retry-After: 7 -> 7.0 recorded) and tests stay fast."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        time.sleep(min(seconds, 0.02))


@pytest.fixture
def emu(tmp_path):
    with RunPodEmulator(tmp_path) as e:
        yield e


@pytest.fixture
def ssh_emu(tmp_path):
    ok, why = ssh_supported()
    if not ok:
        pytest.skip(why)
    with RunPodEmulator(tmp_path, ssh=True) as e:
        yield e


@pytest.fixture
def sleeps():
    return Sleeps()


@pytest.fixture
def client(emu, sleeps):
    return RunPodClient(emu.api_key, emu.base_url, sleep=sleeps, timeout=10)
