"""`fab status`'s disk lines: how `df -Pk` and `du -sk` output is read (the local and emulator tests run the real
commands; here the case they cannot set up: less room left than one checkpoint)."""

from __future__ import annotations

import pytest

from playbooks.common import disk_report

pytestmark = pytest.mark.unit

DF = "overlay   209715200 150994944  58720256  73% /workspace"  # POSIX df -Pk: 1024-blocks, used, available


def test_free_space_and_the_last_checkpoint():
    out = disk_report(DF + "\n41992192\tstep_0001000\n", "/workspace")
    assert out == ["  disk: 60.1 GB free of 215 GB (/workspace); last checkpoint step_0001000 43.0 GB"]


def test_less_than_one_checkpoint_free_says_what_happens_next():
    df = "overlay   209715200 180000000  29715200  86% /workspace"
    out = disk_report(df + "\n41992192\tstep_0002000\n", "/workspace")
    assert len(out) == 2 and "30.4 GB free" in out[0] and "step_0002000 43.0 GB" in out[0]
    assert "less than one checkpoint free" in out[1] and "networkVolumeGb" in out[1]


def test_no_run_yet_and_a_failed_df():
    assert disk_report(DF, "/workspace") == ["  disk: 60.1 GB free of 215 GB (/workspace)"]
    assert disk_report("", "/workspace") == ["  disk: unknown (df failed)"]
