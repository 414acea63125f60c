"""Spend per stack from the emulator's billing API, the pre-launch estimate, and the `fab cost` task."""

from __future__ import annotations

import datetime as dt
import json
import re
import time

import pytest
from invoke import Context

from infra.cost import stack_spend
from playbooks import cost as pc

pytestmark = pytest.mark.integration


def test_stack_spend_matches_what_the_emulator_billed(frozen_pod):
    emu, client, pod = frozen_pod
    vol = client.create_network_volume("ultrashape-data", 200, "EU-RO-1")
    emu.advance(10 * 3600)
    client.stop_pod(pod.id)
    emu.advance(3600)  # stopped: only disk/volume storage accrues
    sp = stack_spend(client, "h100", [pod.id], [vol.id],
                     until=dt.datetime.fromtimestamp(emu.clock.now(), dt.timezone.utc))
    assert sp.total_usd == pytest.approx(emu.spend_usd(), abs=0.01)
    assert sp.pod_usd[pod.id] == pytest.approx(10 * 2.69, rel=0.01)  # GPU hours dominate; disk adds cents
    assert sp.volume_usd[vol.id] == pytest.approx(200 * 0.07 * 11 / 730, abs=0.01)


def test_spend_lines_for_a_stack_found_by_name(frozen_pod):
    emu, client, pod = frozen_pod  # named ultrashape-h100: the h100 stack's pod
    client.create_network_volume("ultrashape-data", 200, "EU-RO-1")
    emu.advance(2 * 3600)
    lines = pc.spend_lines("h100", client)
    text = "\n".join(lines)
    assert f"pod {pod.id}: $5.3" in text or f"pod {pod.id}: $5.4" in text
    assert "network volume" in text and "budget $150.00" in text
    assert "now: $2.69/h" in text and "budget lasts" in text
    client.stop_pod(pod.id)
    assert "now: stopped" in "\n".join(pc.spend_lines("h100", client))
    a40 = "\n".join(pc.spend_lines("a40", client))  # no a40 pod, but the volume both stacks share
    assert "no pod now" in a40 and "network volume" in a40 and f"pod {pod.id}" not in a40


def test_budget_problem_when_the_stack_has_spent_its_budget(tmp_path, make_pod):
    from infra.runpod import RunPodClient
    from tests.emulator import Clock, RunPodEmulator

    # The laptop asks for spend up to its own "now": start the emulated history three days ago.
    with RunPodEmulator(tmp_path, clock=Clock(time.time() - 3 * 86400, real=False), ssh=False) as emu:
        client = RunPodClient(emu.api_key, emu.base_url, sleep=emu.advance)
        make_pod(emu, client)
        assert pc.budget_problem("h100", client) is None
        emu.advance(56 * 3600)  # 56 h of H100 at $2.69/h: past the h100 stack's $150
        msg = pc.budget_problem("h100", client)
        assert msg and "$150 budget" in msg and "ultrashape:budgetUsd" in msg


def test_estimate_offline_uses_the_training_config_and_flags_a_small_budget(repo_root):
    lines = pc.estimate_lines("h100", "configs/train_dit_refine.yaml", meshes=30000)
    text = "\n".join(lines)
    steps = 20000  # train.max_steps of configs/train_dit_refine.yaml; 4 samples per step (grad_accum 4)
    hours = steps * 0.383 * 4 / 3600  # ml.training's measured H100 step per sample (configs/cost.yaml)
    assert f"{steps} steps x 1.532 s" in text and f"= {hours:.2f} h" in text and "bench figure" in text
    assert "$2.69/h (configs/cost.yaml)" in text
    assert "network volume 200 GB = $14.00/month" in text
    assert "covers it" in text
    # 30,000 meshes x 45.7 MB + weights 15 + venv 10 + the training's checkpoints at their peak 142 (configs/cost.yaml)
    assert "needs ~1538 GB" in text and "raise networkVolumeGb" in text
    small = "\n".join(pc.estimate_lines("h100", "configs/train_dit_refine.yaml", meshes=100))
    assert "raise networkVolumeGb" not in small
    a40 = "\n".join(pc.estimate_lines("a40", "configs/train_dit_refine.yaml", meshes=100))
    assert "NOT enough" in a40 and "budgetUsd" in a40
    # 57.8 h of A40 training against Pulumi.a40.yaml's maxRuntimeHours: 8
    assert "maxRuntimeHours is 8 h" in a40 and "near step 2723" in a40  # (8 h - 0.13 h setup) / 10.4 s
    assert "not measured" in a40  # no A40 bench figure: the model's 2.6 s per sample
    assert "maxRuntimeHours" not in text  # 11.7 h fits the h100 stack's 48 h


def test_estimate_live_price_and_measured_step_time(frozen_pod, tmp_path):
    emu, client, pod = frozen_pod
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"kind": "train", "step": 10 * i, "step_time_s": 1.5})
                                 for i in range(1, 20)))
    text = "\n".join(pc.estimate_lines("h100", "configs/train_dit_refine.yaml", meshes=1000, metrics=metrics,
                                       processed=False, client=client))
    assert "$2.69/h (RunPod catalog)" in text
    assert "x 1.500 s (measured" in text
    assert "processing 1000 meshes on this pod" in text


def test_fab_cost_task_prints_spend_and_estimate(frozen_pod, monkeypatch, capsys):
    emu, client, pod = frozen_pod
    for k, v in emu.client_env().items():
        monkeypatch.setenv(k, v)
    emu.advance(3600)
    pc.cost(Context(), stack="h100", meshes=500, model=True, account=True)
    out = capsys.readouterr().out
    billed = float(re.search(rf"pod {pod.id}: \$([0-9.]+)", out).group(1))
    assert billed == pytest.approx(2.69, abs=0.02)  # one hour of H100 (+ cents of disk)
    assert "estimate for stack h100" in out and "(RunPod catalog)" in out
    assert "account, last 30 days" in out
    assert "Seed plan as stated: $260" in out


def test_fab_cost_without_an_api_key_still_estimates(monkeypatch, capsys):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    pc.cost(Context(), stack="h100", meshes=10)
    out = capsys.readouterr().out
    assert "spend: unavailable" in out and "RUNPOD_API_KEY" in out
    assert "estimate for stack h100" in out and "(configs/cost.yaml)" in out


def test_watchdog_args_and_health_line(tmp_path):
    from infra.watchdog import State
    from remote.target import LocalTarget

    t = LocalTarget(root=tmp_path)  # the same workspace layout as a pod's
    t.name = "h100"
    args = pc.watchdog_args(t)
    assert args == ["--daemon", "--job-dir", str(tmp_path / "jobs" / "train"), "--stack", "h100"]
    from infra.stack_config import load_stack_config

    t.config = load_stack_config("h100")  # what a PodTarget carries
    assert pc.watchdog_args(t)[-6:] == ["--idle-minutes", "30", "--max-runtime-hours", "48", "--budget-usd", "150"]
    assert "will NOT stop" in pc.watchdog_line(t)
    (tmp_path / "jobs" / "train").mkdir(parents=True)
    State(pod_id="p", started_at=0, last_check=time.time(), poll_s=30).save(tmp_path / "jobs" / "train" / "watchdog.json")
    assert "autostop: watchdog watching" in pc.watchdog_line(t)


def test_status_shows_every_live_watchdog_and_a_stand_down(tmp_path):
    """`fab status` (playbooks/cost.watchdog_lines): one line per live watchdog, a stood-down one says for whom;
    with none alive, the latest one's last word."""
    from infra.watchdog import State
    from remote.target import LocalTarget

    t = LocalTarget(root=tmp_path)
    assert pc.watchdog_lines(t) == ["autostop: no watchdog state: this pod will NOT stop by itself; `fab teardown` when done"]
    now = time.time()
    for job in ("train", "infer", "process"):
        (tmp_path / "jobs" / job).mkdir(parents=True)
    State(pod_id="p", started_at=0, heartbeat=now - 86400, outcome="stopped", reason="job-ended",
          poll_s=30).save(tmp_path / "jobs" / "process" / "watchdog.json")  # last week's
    State(pod_id="p", started_at=0, heartbeat=now - 3600, outcome="stopped", reason="idle",
          poll_s=30).save(tmp_path / "jobs" / "infer" / "watchdog.json")
    assert pc.watchdog_lines(t) == ["autostop (infer): watchdog stopped the pod (idle)"]
    State(pod_id="p", started_at=0, heartbeat=now, poll_s=30, stood_down_for="train",
          stood_down_detail="stood down (job-ended): job train now runs on this pod and its watchdog owns the pod",
          ).save(tmp_path / "jobs" / "infer" / "watchdog.json")
    State(pod_id="p", started_at=0, heartbeat=now - 1, poll_s=30).save(tmp_path / "jobs" / "train" / "watchdog.json")
    lines = pc.watchdog_lines(t)
    assert lines[0].startswith("autostop (infer): watchdog stood down (job-ended): job train now runs on this pod")
    assert lines[0].endswith("it still stops the pod for budget or max runtime")
    assert lines[1].startswith("autostop (train): watchdog watching") and len(lines) == 2
