"""Fixtures for the billing tests: the RunPod emulator with a frozen (controllable) clock, and a pod on it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from infra.runpod import PodRequest, RunPodClient
from tests.emulator import Clock, RunPodEmulator

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def frozen_emu(tmp_path):
    """API-only emulator whose clock moves only when advanced (a client built with sleep=emu.advance moves it).

    Its history starts a week ago, so code that asks for spend "until now" by the wall clock (the laptop side)
    sees everything a test advances through, whatever the time of day the test runs at."""
    with RunPodEmulator(tmp_path, clock=Clock(time.time() - 7 * 86400, real=False), ssh=False) as emu:
        yield emu


def _make_pod(emu, client, gpu=H100, name="ultrashape-h100", **kw):
    pod = client.create_pod(PodRequest(name=name, image="runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
                                       gpu_type_id=gpu, **kw))
    emu.wait_running(pod.id)
    return client.get_pod(pod.id)


@pytest.fixture
def make_pod():
    """make_pod(emu, client, gpu=..., name=..., **PodRequest fields) -> a RUNNING pod."""
    return _make_pod


@pytest.fixture
def frozen_pod(frozen_emu):
    """(emu, client, pod): a RUNNING H100 pod; every client wait advances the emulator's clock."""
    client = RunPodClient(frozen_emu.api_key, frozen_emu.base_url, sleep=frozen_emu.advance)
    return frozen_emu, client, _make_pod(frozen_emu, client)


@pytest.fixture
def bounded_sleep():
    """bounded_sleep(emu, hours=48) -> a sleep that advances the emulator's clock, and fails the test instead of
    looping forever when a watchdog that should have stopped the pod is still waiting after `hours`."""

    def make(emu, hours: float = 48.0):
        t0 = emu.clock.now()

        def sleep(seconds: float) -> None:
            if emu.clock.now() - t0 > hours * 3600:
                raise AssertionError(f"still watching after {hours} h of emulated time: the pod was never stopped")
            emu.advance(seconds)

        return sleep

    return make


@pytest.fixture
def live_emu(tmp_path):
    """API-only emulator on the wall clock: watchdog processes started by a test sleep for real."""
    with RunPodEmulator(tmp_path, ssh=False) as emu:
        yield emu


@pytest.fixture
def procs():
    """Every pid a test started or learnt of; all are SIGKILLed at the end, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
