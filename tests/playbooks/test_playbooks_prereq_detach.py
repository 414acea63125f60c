"""`fab train` must not train on half-processed data: a Ctrl-C while it follows a prerequisite ends it there.

    .venv/bin/python -m pytest tests/playbooks/test_playbooks_prereq_detach.py -q

The task runs for real on `--stack local` (setup, sync, a real processing job in tmux); only the follow of
that job is replaced at the remote/jobs boundary by what jobs.follow returns when the user presses Ctrl-C.
"""

from __future__ import annotations

import subprocess

import pytest
from invoke import Context

from remote import jobs
from remote.target import LocalTarget

pytestmark = pytest.mark.integration


def test_playbooks_train_stops_when_a_prerequisite_is_detached(tmp_path, monkeypatch, capsys):
    import trimesh

    monkeypatch.setenv("ULTRASHAPE_LOCAL_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("ULTRASHAPE_STATE_DIR", str(tmp_path / "state"))
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.icosphere(subdivisions=2).export(meshes / "ball.obj")

    real_follow = jobs.follow
    followed = []

    def follow(target, name, *a, **kw):
        followed.append(name)
        if name == "process":  # the user pressed Ctrl-C while watching processing: jobs.follow's answer
            return jobs.JobState(name, "detached")
        return real_follow(target, name, *a, **kw)

    monkeypatch.setattr(jobs, "follow", follow)
    from playbooks.run import train

    t = LocalTarget()
    try:
        train(Context(), stack="local", tiny=True, src=str(meshes), follow=False)
        err = capsys.readouterr().err
        assert followed == ["process"]
        assert jobs.state(t, "process").state in ("running", "done")  # the real job was started and goes on
        assert jobs.state(t, "train").state == "absent", err  # ...but training was not started on its output
        assert "training was NOT started" in err and "fab logs --job process --follow --stack local" in err, err
        assert "fab train --stack local" in err, err
    finally:
        # This test's own tmux server (its socket is under tmp_path): ends whatever job it still runs.
        subprocess.run(["tmux", "-S", str(tmp_path / "ws" / "jobs" / "tmux.sock"), "kill-server"],
                       capture_output=True)
