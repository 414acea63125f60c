"""Checkpoint folder handling without DeepSpeed: saving a step again, and a kill in the middle of that.

The engine below stands in for DeepSpeed's `save_checkpoint` (it writes one file into the tag's folder, as
DeepSpeed writes its shards); everything else is ml.training.checkpoint itself."""

from __future__ import annotations

import errno
import os

import pytest

from ml.training import checkpoint as ckpt

pytestmark = pytest.mark.unit


class DiskEngine:
    def __init__(self, weights: str) -> None:
        self.weights = weights

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "weights.txt"), "w") as f:
            f.write(self.weights)


def _save(ck, weights, step=4):
    return ckpt.save(DiskEngine(weights), ck, step, {"step": step, "world_size": 1}, keep=3, rank=0)


def test_saving_a_step_again_replaces_it_and_drops_its_stale_universal_copy(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    final = _save(ck, "old")
    uni = final.with_name(final.name + ckpt.UNIVERSAL_SUFFIX)
    uni.mkdir()  # converted from the old weights (a resume on another world size)
    (uni / "marker").write_text("old")
    again = _save(ck, "new")  # the same step saved after a resume
    assert again == final and (final / "weights.txt").read_text() == "new"
    assert not uni.exists(), "ensure_universal would reuse the old weights' conversion"
    assert ckpt.latest_in(tmp_path / "run") == final
    assert sorted(p.name for p in ck.iterdir()) == ["latest", final.name]  # no .tmp-/.old- folder left


def test_a_kill_while_replacing_a_step_leaves_latest_loadable(tmp_path, monkeypatch):
    ck = tmp_path / "run" / "checkpoints"
    final = _save(ck, "old")
    real = os.replace

    def killed(src, dst):  # the process dies as the new folder is about to take the step's name
        if str(src).endswith(".tmp-" + final.name):
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(ck, "new")
    monkeypatch.setattr(ckpt.os, "replace", real)
    found = ckpt.latest_in(tmp_path / "run")  # what --resume latest uses
    assert found == final and (found / "weights.txt").read_text() == "old"
    # and the next save of that step still works
    assert (_save(ck, "newer") / "weights.txt").read_text() == "newer"


# ---- disk space. SmallDisk is the filesystem: a quota over the test's folder, reported through shutil.disk_usage
# (what ml.training.checkpoint asks) and enforced on the stand-in engine's writes, as a full volume would refuse them.

UNIT = 1_000_000  # one checkpoint's weights file


class SmallDisk:
    def __init__(self, root, quota: int, monkeypatch) -> None:
        self.root, self.quota = root, quota
        real = ckpt.shutil.disk_usage
        monkeypatch.setattr(ckpt.shutil, "disk_usage",
                            lambda p: real(p)._replace(total=quota, free=max(self.quota - self.used(), 0)))

    def used(self) -> int:
        return ckpt.dir_bytes(self.root)


class QuotaEngine(DiskEngine):
    def __init__(self, disk: SmallDisk, size: int = UNIT) -> None:
        super().__init__("x" * size)
        self.disk, self.calls = disk, 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls += 1
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        room = self.disk.quota - self.disk.used()
        with open(os.path.join(d, "weights.txt"), "w") as f:
            f.write(self.weights[: max(room, 0)])  # what fits, then the error a full disk gives
        if room < len(self.weights):
            raise OSError(errno.ENOSPC, "No space left on device")


def _save_with_room(ck, engine, step, keep=3, estimate=UNIT):
    return ckpt.save(engine, ck, step, {"step": step, "world_size": 1}, keep=keep, rank=0,
                     need=ckpt.checkpoint_need(ck, estimate))


def _steps(ck):
    return [p.name for p in sorted(ck.glob("step_*"))]


def test_a_full_disk_drops_older_checkpoints_early_rather_than_failing(tmp_path, monkeypatch, caplog):
    disk = SmallDisk(tmp_path, int(2.5 * UNIT), monkeypatch)
    ck = tmp_path / "run" / "checkpoints"
    eng = QuotaEngine(disk)
    for step in (1, 2, 3):  # keep=3 would hold three; the disk holds two
        _save_with_room(ck, eng, step)
    assert _steps(ck) == ["step_0000002", "step_0000003"]
    assert (ck / "latest").read_text().strip() == "step_0000003"
    assert "deleting checkpoint step_0000001 early" in caplog.text


def test_no_room_for_one_checkpoint_raises_before_writing_and_keeps_the_last(tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path, int(1.5 * UNIT), monkeypatch)
    ck = tmp_path / "run" / "checkpoints"
    first = _save_with_room(ck, QuotaEngine(disk), 1)
    second = QuotaEngine(disk)
    with pytest.raises(ckpt.DiskSpaceError) as err:
        _save_with_room(ck, second, 2)
    assert second.calls == 0, "refused before writing anything"
    msg = str(err.value)
    assert str(ck) in msg and "step_0000001" in msg and "--resume" in msg and "networkVolumeGb" in msg
    assert ckpt.latest_in(tmp_path / "run") == first and len((first / "weights.txt").read_text()) == UNIT
    assert _steps(ck) == ["step_0000001"] and not list(ck.glob(".tmp-*"))


def test_a_write_that_runs_out_of_space_removes_its_partial_folder(tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path, int(1.5 * UNIT), monkeypatch)
    ck = tmp_path / "run" / "checkpoints"
    first = _save_with_room(ck, QuotaEngine(disk, size=UNIT // 2), 1, estimate=UNIT // 2)
    with pytest.raises(ckpt.DiskSpaceError, match="filled up while checkpoint step_0000002"):
        # grown past the last one's size (say, LoRA turned off on --resume would be refused; a bigger optimizer
        # state is the realistic case): the room check passes on the old size and the write hits the wall
        _save_with_room(ck, QuotaEngine(disk, size=int(1.2 * UNIT)), 2, estimate=UNIT // 2)
    assert not list(ck.glob(".tmp-*")), "the partial checkpoint must not hold the space"
    assert ckpt.latest_in(tmp_path / "run") == first


def test_other_save_errors_are_not_called_a_full_disk(tmp_path):
    class Broken(DiskEngine):
        def save_checkpoint(self, *a, **k):
            raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem"):
        ckpt.save(Broken(""), tmp_path / "ck", 1, {"step": 1}, keep=2, rank=0, need=1)


def test_preflight_refuses_a_disk_without_room_for_one_checkpoint(tmp_path, monkeypatch, caplog):
    ck = tmp_path / "run" / "checkpoints"
    SmallDisk(tmp_path, int(0.9 * UNIT), monkeypatch)
    msg = ckpt.preflight(ck, estimate=UNIT, keep=2, export_bytes=0)
    assert msg and str(ck) in msg and "nothing has been trained yet" in msg
    disk = SmallDisk(tmp_path, int(2.5 * UNIT), monkeypatch)  # one fits, keep + 1 do not: a warning only
    assert ckpt.preflight(ck, estimate=UNIT, keep=2, export_bytes=UNIT) is None
    assert "older checkpoints will be deleted early" in caplog.text
    caplog.clear()
    disk.quota = 10 * UNIT
    assert ckpt.preflight(ck, estimate=UNIT, keep=2, export_bytes=UNIT) is None and not caplog.text


def test_making_room_keeps_the_checkpoint_latest_names(tmp_path, monkeypatch):
    """Resumed from step 1 while step 2 exists (say, --resume <step_1>): step 1 is what `latest` names and what the
    run continues from, so the room comes from step 2."""
    disk = SmallDisk(tmp_path, int(2.5 * UNIT), monkeypatch)
    ck = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        _save_with_room(ck, QuotaEngine(disk), step)
    (ck / "latest").write_text("step_0000001\n")
    _save_with_room(ck, QuotaEngine(disk), 3)
    assert _steps(ck) == ["step_0000001", "step_0000003"]
