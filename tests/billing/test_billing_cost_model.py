"""The cost model: the seed plan's total, what each kit choice changes, and the config's hygiene."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from infra.cost import (
    AS_BUILT,
    SCENARIOS,
    CostError,
    Scenario,
    cost_table,
    estimate_run,
    format_cost_table,
    load_cost_config,
    measured_step_time,
    plan_cost,
    total,
)
from ml.config import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cfg():
    return load_cost_config()


def test_seed_plan_reproduces_the_stated_total(cfg):
    seed = total(plan_cost(cfg, SCENARIOS[0]))
    assert cfg.seed_total_usd == 260.0
    assert abs(seed - cfg.seed_total_usd) / cfg.seed_total_usd < 0.02, seed


def test_each_kit_choice_lowers_the_bill_and_the_kit_meets_the_goal(cfg):
    rows = {sc.name: usd for sc, _, usd in cost_table(cfg)}
    names = [sc.name for sc in SCENARIOS]
    # volume, autostop, the kit's measured training step (0.383 s on an H100, official 0.52 s), processing speed,
    # CPU pod: each lowers the bill
    for before, after in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]:
        assert rows[names[after]] < rows[names[before]], (names[after], rows)
    # The goal is judged on what the kit delivers today, not on the CPU-pod row (no stack makes CPU pods yet).
    assert names[AS_BUILT] == "+ kit processing speed" and "not built" in names[-1]
    assert rows[names[AS_BUILT]] <= cfg.goal_usd


def test_as_built_processes_on_the_gpu_pod(cfg):
    """infra/ creates GPU pods only: the as-built row must not price a CPU pod."""
    built = plan_cost(cfg, SCENARIOS[AS_BUILT])
    assert not any("CPU pod" in l.what for l in built)
    assert any("process 29900 meshes" in l.what and l.rate == "$2.69/h" for l in built)


def test_seed_processes_on_the_gpu_pod_and_kit_on_a_cpu_pod(cfg):
    seed = plan_cost(cfg, SCENARIOS[0])
    kit = plan_cost(cfg, SCENARIOS[-1])
    assert any("process 30000" in l.what and "$2.69/h" == l.rate for l in seed)
    assert not any("CPU pod" in l.what for l in seed)
    cpu = [l for l in kit if "CPU pod" in l.what]
    assert cpu and all(l.rate == "$1.28/h" for l in cpu)
    assert not any(l.what.endswith("meshes") and "process" in l.what and "$2.69" in l.rate for l in kit)
    # one network volume instead of one pod volume per pod
    assert sum("pod volume" in l.what for l in seed) == 2
    assert sum("network volume" in l.what for l in kit) == 1 and not any("pod volume" in l.what for l in kit)


def test_autostop_replaces_overnight_idle_with_minutes(cfg):
    before = plan_cost(cfg, SCENARIOS[1])
    after = plan_cost(cfg, SCENARIOS[2])
    idle_before = sum(l.hours for l in before if "idle" in l.what)
    idle_after = sum(l.hours for l in after if "idle" in l.what)
    assert idle_before >= 6.0  # at least one unattended night
    assert idle_after < 1.0


def test_changing_an_assumption_moves_the_total():
    base = total(plan_cost(load_cost_config(), SCENARIOS[0]))
    longer = total(plan_cost(load_cost_config(overrides={"workload.project_months": 1.0}), SCENARIOS[0]))
    pricier = total(plan_cost(load_cost_config(overrides={"prices.gpu_usd_per_hour.NVIDIA H100 80GB HBM3": 3.0}),
                              SCENARIOS[0]))
    assert longer > base and pricier > base


def test_cpu_processing_without_network_volume_is_refused():
    with pytest.raises(ValueError, match="network volume"):
        Scenario("x", cpu_processing=True)


def test_unknown_key_in_cost_config_is_an_error(tmp_path, repo_root):
    text = (repo_root / "configs" / "cost.yaml").read_text().replace("goal_usd:", "goal_usdd:")
    p = tmp_path / "cost.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="goal_usdd"):
        load_cost_config(p)


def test_every_key_in_cost_yaml_is_commented(repo_root):
    """A key line either has a comment on it, or is a mapping/list header whose children are commented."""
    lines = (repo_root / "configs" / "cost.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#") or ":" not in s:
            continue
        m = re.match(r'^\s*(- )?"?([A-Za-z0-9_ ]+)"?:\s*(.*)$', line)
        if not m:
            continue
        value = m.group(3)
        if value == "" or value.startswith("#"):
            continue  # a header: its own comment, or its children carry them
        assert "#" in value, f"configs/cost.yaml:{i + 1} has no comment: {line!r}"


def test_bench_prints_the_table(repo_root):
    out = subprocess.run([sys.executable, str(repo_root / "bench" / "cost_model.py"), "--brief"],
                         capture_output=True, text=True, check=True, cwd=repo_root).stdout
    assert "Seed plan as stated: $260" in out
    for sc in SCENARIOS:
        assert sc.name in out
    assert "meets the goal" in out


def test_format_table_has_detail_lines(cfg):
    text = format_cost_table(cfg)
    assert "H100 production: process 30000 meshes" in text
    assert "one network volume" in text


def test_estimate_run_offline_uses_config_prices_and_step_time(cfg):
    e = estimate_run(gpu_ids=["NVIDIA H100 80GB HBM3"], meshes=30000, steps=60000, volume_gb=200,
                     network_volume=True, cfg=cfg)
    assert e.gpu_usd_per_hour == pytest.approx(2.69)
    assert e.step_time_s == pytest.approx(0.383)  # ml.training's measured H100 step, not the official 0.52 s
    assert e.train_hours == pytest.approx(60000 * 0.383 / 3600)
    assert e.storage_usd_per_month == pytest.approx(200 * 0.07)
    assert "configs/cost.yaml" in e.price_source
    assert any("$/h" in x or "/h" in x for x in e.lines())


def test_the_kits_checkpoints_size_the_volume_once_the_kit_trains(cfg):
    """ml.training's checkpoints (kit_volume_extra_gb) replace the seed's (volume_extra_gb) from the scenario where
    the kit trains on; fab train --dry-run's room check (needed_gb) uses them."""
    h100 = next(r for r in cfg.runs if r.gpu == "NVIDIA H100 80GB HBM3")
    assert h100.kit_volume_extra_gb > h100.volume_extra_gb

    def volume_gb(sc):
        (line,) = [x for x in plan_cost(cfg, sc) if x.what.startswith("one network volume")]
        return float(re.search(r"volume (\d+) GB", line.what).group(1))

    before, after = SCENARIOS[2], SCENARIOS[3]
    assert not before.kit_training and after.kit_training
    grown = sum(r.kit_volume_extra_gb - r.volume_extra_gb for r in cfg.runs if r.kit_volume_extra_gb is not None)
    assert volume_gb(after) - volume_gb(before) == pytest.approx(grown, abs=1)
    e = estimate_run(gpu_ids=["NVIDIA H100 80GB HBM3"], meshes=100, steps=10, volume_gb=200, network_volume=True,
                     cfg=cfg)
    w = cfg.workload
    assert e.needed_gb == pytest.approx(100 * (w.raw_mb_per_mesh + w.processed_mb_per_mesh) / 1000 + w.weights_gb
                                        + w.env_gb + h100.kit_volume_extra_gb)


def test_estimate_run_unknown_gpu_names_the_fix(cfg):
    with pytest.raises(CostError, match="prices.gpu_usd_per_hour"):
        estimate_run(gpu_ids=["NVIDIA B200"], meshes=1, steps=1, volume_gb=10, network_volume=False, cfg=cfg)


def test_measured_step_time_from_metrics(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "step_time_s": 0.5 if i > 5 else 3.0} for i in range(1, 30)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 31, \"step_ti")  # a crash-cut last line
    assert measured_step_time(p) == pytest.approx(0.5)
    q = tmp_path / "m2.jsonl"
    q.write_text("\n".join(json.dumps({"step": i, "time": 100 + 0.25 * i}) for i in range(0, 40))
                 + "\n" + json.dumps({"kind": "val", "step": 40, "time": 900.0}))  # a val line: not a step
    assert measured_step_time(q) == pytest.approx(0.25)
    assert measured_step_time(tmp_path / "absent.jsonl") is None


def test_readme_table_matches_the_model(cfg, repo_root):
    """The README quotes the model's figures; a change to configs/cost.yaml must come with the README's."""
    text = (repo_root / "README.md").read_text()
    section = text[text.index("<!-- section:billing -->"):text.index("<!-- /section:billing -->")]
    prev = None
    for sc, lines, usd in cost_table(cfg):
        assert f"${usd:.2f}" in section, f"README billing table lacks {sc.name}: ${usd:.2f} (run bench/cost_model.py)"
        if prev is not None:
            change = f"−{prev - usd:.2f}" if usd < prev else f"+{usd - prev:.2f}"
            assert change in section, f"README lacks the change {change} for {sc.name}"
        prev = usd
