"""Checkpoint folder handling without DeepSpeed: saving a step again, and a kill in the middle of that.

The engine below stands in for DeepSpeed's `save_checkpoint` (it writes one file into the tag's folder, as
DeepSpeed writes its shards); everything else is ml.training.checkpoint itself."""

from __future__ import annotations

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
