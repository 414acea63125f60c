"""`fab cost`: what each stack has cost (RunPod's billing API) and what the next training run will cost.

    fab cost                              # every stack: billed spend, budget left, $/h now
    fab cost --stack h100 --meshes 30000  # ... and the estimate for that stack's next training run
    fab cost --model                      # the seed plan's cost model (configs/cost.yaml; bench/cost_model.py)

The other tasks call these (they print nothing themselves; they return lines):
    spend_lines(stack, client=None)                        `fab status`, `fab teardown`: spend so far
    budget_problem(stack, client=None)                     `fab train`: refuse when the budget is spent
    estimate_lines(stack, config, meshes=None, ...)        `fab train --dry-run`: GPU $/h, storage, hours
    watchdog_args(t, job="train")                          the autostop watchdog's command line for a job
    watchdog_line(t, job="train")                          is that watchdog alive (from its heartbeat)
    watchdog_lines(t)                                      `fab status`: every job's watchdog that matters now
"""

from __future__ import annotations

import datetime as dt
import shlex
from pathlib import Path
from typing import Optional

import yaml
from fabric import task

from infra.cost import CostError, estimate_run, format_cost_table, load_cost_config, measured_step_time, stack_spend
from infra.stack_config import NETWORK_VOLUME_NAME, StackConfigError, list_stacks, load_stack_config
from remote.target import REPO

MESH_SUFFIXES = {".obj", ".stl", ".glb", ".gltf", ".ply", ".off"}


def _client(client=None):
    if client is not None:
        return client
    from infra.runpod import RunPodClient

    return RunPodClient()


def stack_resources(client, stack: str):
    """(config, pods, network volume ids) of a stack, found by the deterministic names (infra/stack_config.py)."""
    cfg = load_stack_config(stack)
    pods = [p for p in client.find_pods(cfg.pod_name) if p.status != "TERMINATED"]
    vols = [v.id for v in client.find_network_volumes(NETWORK_VOLUME_NAME)] if cfg.network_volume else []
    return cfg, pods, vols


def spend_lines(stack: str, client=None, *, since: Optional[dt.datetime] = None) -> list[str]:
    """Billed spend of `stack` (its pods, its network volume), its budget, and what it costs per hour now."""
    client = _client(client)
    cfg, pods, vols = stack_resources(client, stack)
    if not pods and not vols:
        return [f"{stack}: no pod and no volume now (pods deleted by `pulumi destroy` keep their bill under their "
                "own id; `fab cost --account` shows the account total)"]
    sp = stack_spend(client, stack, [p.id for p in pods], vols, since=since, budget_usd=cfg.budget_usd or None)
    lines = sp.lines()
    rate = sum(p.cost_per_hr for p in pods)
    running = [p for p in pods if p.status in ("PROVISIONING", "STARTING", "RUNNING")]
    if running:
        lines.append(f"  now: ${rate:.2f}/h ({', '.join(f'{p.id} {p.status}' for p in running)})")
        if cfg.budget_usd:
            left = cfg.budget_usd - sp.total_usd
            lines.append(f"  at this rate the budget lasts {max(0.0, left) / rate:.1f} h more" if rate > 0 and left > 0
                         else "  the budget is spent: the watchdog stops the pod at its next check")
    elif pods:
        lines.append("  now: stopped, no GPU billed (volumes are)")
    else:
        lines.append(f"  no pod now (`pulumi up --stack {stack}` creates it); the shared volume is billed")
    return lines


def budget_problem(stack: str, client=None) -> Optional[str]:
    """A message when the stack's billed spend has reached its budgetUsd (else None): `fab train` should refuse
    to start the pod, since the watchdog would stop it at its first check."""
    client = _client(client)
    cfg, pods, vols = stack_resources(client, stack)
    if not cfg.budget_usd or not (pods or vols):
        return None
    sp = stack_spend(client, stack, [p.id for p in pods], vols, budget_usd=cfg.budget_usd)
    if sp.total_usd < cfg.budget_usd:
        return None
    return (f"stack {stack} has spent ${sp.total_usd:.2f} of its ${cfg.budget_usd:g} budget (budgetUsd): the watchdog "
            f"would stop the pod at once. Raise it: `pulumi config set --stack {stack} ultrashape:budgetUsd <usd>` "
            f"(or edit Pulumi.{stack}.yaml)")


def account_lines(client=None, days: int = 30) -> list[str]:
    """Everything the account spent (all resources), from /v2/billing: the figure RunPod invoices."""
    client = _client(client)
    end = dt.datetime.now(dt.timezone.utc)
    rep = client.billing(start_time=(end - dt.timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0),
                         end_time=end, bucket_size="day")
    return [f"account, last {days} days: ${rep.total_amount:.2f} (every pod, volume and endpoint)"]


def _train_shape(config: str) -> tuple[int, int]:
    """(max_steps, samples per optimizer step) from a training config (the YAML, read as data)."""
    path = REPO / config
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CostError(f"{path}: cannot read the training config: {e}") from e
    t = data.get("train") or {}
    steps = int(t.get("max_steps", 0) or 0)
    if steps < 1:
        raise CostError(f"{path}: train.max_steps is missing; the estimate needs the number of steps")
    return steps, int(t.get("micro_batch", 1) or 1) * int(t.get("grad_accum", 1) or 1)


def count_meshes(data_dir: str | Path) -> int:
    d = Path(data_dir)
    if not d.is_dir():
        return 0
    return sum(1 for p in d.rglob("*") if p.suffix.lower() in MESH_SUFFIXES)


def estimate_lines(
    stack: str,
    config: str = "configs/train_dit_refine.yaml",
    *,
    meshes: Optional[int] = None,
    data_dir: str | Path = "data/input",
    metrics: Optional[str | Path] = None,
    processed: bool = True,
    client=None,
) -> list[str]:
    """The pre-launch estimate for `fab train --dry-run`.

    meshes: default, the meshes under `data_dir`. metrics: a metrics.jsonl of an earlier run on this GPU type
    (e.g. fetched with `fab fetch`), whose median step time replaces the model's. processed=False adds the
    processing of those meshes on the pod. client: the live catalog when given (else configs/cost.yaml prices).
    """
    cfg = load_stack_config(stack)
    steps, samples = _train_shape(config)
    n = count_meshes(REPO / data_dir if not Path(data_dir).is_absolute() else data_dir) if meshes is None else int(meshes)
    step_s = measured_step_time(metrics) if metrics else None
    vol = cfg.network_volume.size_gb if cfg.network_volume else cfg.volume_gb
    e = estimate_run(
        gpu_ids=cfg.gpu_types, gpu_count=cfg.gpu_count, cloud=cfg.cloud_type, meshes=n, steps=steps,
        samples_per_step=samples * cfg.gpu_count, step_time_s=step_s,
        step_time_source=f"measured, {metrics}" if step_s else "",
        process_meshes=0 if processed else n, volume_gb=vol, network_volume=cfg.network_volume is not None,
        budget_usd=cfg.budget_usd, max_runtime_hours=cfg.max_runtime_hours, client=client,
    )
    head = f"estimate for stack {stack} ({config}):"
    return [head] + [f"  {x}" for x in e.lines()]


def watchdog_args(t, job: str = "train") -> list[str]:
    """Arguments for `python -m infra.watchdog` beside job `job` on pod target `t` (remote/stack.PodTarget).

    Start it with --daemon (it detaches and returns). The limits come from this machine's stack file (the
    freshest: `pulumi config set` edits not yet committed or applied are in it); the pod's id and API key come
    from the pod's environment."""
    args = ["--daemon", "--job-dir", t.path("jobs", job), "--stack", t.name]
    cfg = getattr(t, "config", None)
    if cfg is not None:
        args += ["--idle-minutes", f"{cfg.autostop_idle_minutes:g}", "--max-runtime-hours", f"{cfg.max_runtime_hours:g}",
                 "--budget-usd", f"{cfg.budget_usd:g}"]
    return args


def watchdog_line(t, job: str = "train") -> str:
    """One line for `fab status`: is the watchdog of `job` alive, what did it decide (its heartbeat file)."""
    from infra.watchdog import STATE_FILE, health

    r = t.run(f"cat {shlex.quote(t.path('jobs', job, STATE_FILE))} 2>/dev/null", check=False)
    return "autostop: " + health(r.stdout).message


def watchdog_lines(t) -> list[str]:
    """`fab status`: the watchdogs on the pod, one line each (one round trip reads every jobs/*/watchdog.json).

    Every live one (watching, stood down for another job, stopping) and every one failing to stop; when none is
    alive, the latest one's last word (it stopped the pod, or it is NOT RUNNING and nothing will stop the pod)."""
    import json

    from infra.watchdog import STATE_FILE, health

    jobs_dir = shlex.quote(t.path("jobs"))
    r = t.run(f"cd {jobs_dir} 2>/dev/null && for f in */{STATE_FILE}; do [ -f \"$f\" ] && "
              f"printf '%s\\t%s\\n' \"${{f%%/*}}\" \"$(tr -d '\\n' < \"$f\")\"; done; true", check=False)
    found = []
    for line in r.stdout.splitlines():
        job, _, text = line.partition("\t")
        try:
            beat = json.loads(text).get("heartbeat") or 0.0
        except ValueError:
            beat = 0.0
        found.append((beat, job, health(text)))
    if not found:
        return ["autostop: " + health("").message]
    shown = [(job, h) for _, job, h in sorted(found, reverse=True) if h.running or h.outcome == "stop-failing"]
    if not shown:
        _, job, h = max(found, key=lambda f: f[0])
        shown = [(job, h)]
    return [f"autostop ({job}): {h.message}" for job, h in shown]


@task(help={
    "stack": "one stack (default: every stack with a Pulumi.<stack>.yaml)",
    "meshes": "meshes in the next training run (default: those in data/input)",
    "config": "training config for the estimate (default configs/train_dit_refine.yaml)",
    "metrics": "a metrics.jsonl from an earlier run: its measured step time replaces the model's",
    "model": "also print the seed plan's cost model table (configs/cost.yaml)",
    "account": "also print the whole account's spend (all resources), from /v2/billing",
})
def cost(c, stack=None, meshes=None, config="configs/train_dit_refine.yaml", metrics=None, model=False, account=False):
    """Actual spend per stack (RunPod billing API) and an estimate for the next training run."""
    from infra.runpod import RunPodError

    stacks = [stack] if stack else list_stacks()
    client = None
    try:
        client = _client()
    except RunPodError as e:
        print(f"spend: unavailable ({e})")
    for name in stacks:
        if client is not None:
            try:
                for line in spend_lines(name, client):
                    print(line)
            except (RunPodError, StackConfigError) as e:
                print(f"{name}: spend unavailable ({e})")
        try:
            for line in estimate_lines(name, config, meshes=meshes, metrics=metrics, client=client):
                print(line)
        except (CostError, StackConfigError) as e:
            print(f"{name}: no estimate ({e})")
    if account and client is not None:
        try:
            for line in account_lines(client):
                print(line)
        except RunPodError as e:
            print(f"account: unavailable ({e})")
    if model:
        print()
        print(format_cost_table(load_cost_config()))
