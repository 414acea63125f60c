"""What a run costs: the seed plan's cost model, pre-launch estimates, and actual spend per stack.

    python bench/cost_model.py                     # the seed's $260 against the kit's choices
    fab cost --stack h100                          # actual spend (billing API) + an estimate

Three things live here, from the most offline to the most live:

1. The cost model (`CostModelConfig`, `cost_table`): the seed guide's plan — a 100-model test on an A40,
   then 30,000 models on an H100 — priced line by line from configs/cost.yaml, and the same plan with the
   kit's choices applied one at a time (one reused network volume, processing on a CPU pod, autostop, the
   kit's processing speed). Nothing here talks to RunPod, so the table is reproducible.
2. `estimate_run`: a pre-launch estimate for `fab train --dry-run` — GPU $/h (live catalog when a client is
   given), storage $/month, and expected hours from the dataset size and a measured step time.
3. `stack_spend`: what a stack has actually cost, from the billing API (`/v2/billing/pods` and
   `/v2/billing/network-volumes`), for `fab cost`, `fab status` and the watchdog's budget cap.

Only infra/runpod.py speaks HTTP; this module takes a client object and calls its methods.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ml.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COST_CONFIG = ROOT / "configs" / "cost.yaml"


class CostError(RuntimeError):
    """A cost question that cannot be answered from what we were given (says what is missing)."""


# --------------------------------------------------------------------------------------------------------
# 1. The cost model
# --------------------------------------------------------------------------------------------------------


@dataclass
class Prices:
    """USD list prices. The model's own, fixed copy so the table is reproducible; `fab cost` shows live ones."""

    gpu_usd_per_hour: dict[str, float] = field(default_factory=dict)  # per GPU, by catalog id
    gpu_pod_vcpus: dict[str, int] = field(default_factory=dict)  # vCPUs a 1-GPU pod of that type comes with
    cpu_usd_per_vcpu_hour: float = 0.04  # CPU pods are billed per vCPU
    pod_volume_running_usd_per_gb_month: float = 0.10  # a pod's own volume while the pod runs
    pod_volume_stopped_usd_per_gb_month: float = 0.20  # ... and while it is stopped (RunPod doubles it)
    network_volume_usd_per_gb_month: float = 0.07  # network volume up to 1 TB
    network_volume_large_usd_per_gb_month: float = 0.05  # network volume over 1 TB (the whole volume)
    network_volume_large_from_gb: float = 1000.0  # where the lower rate starts
    hours_per_month: float = 730.0  # storage is billed per hour at rate / 730

    def gpu(self, gpu: str) -> float:
        if gpu not in self.gpu_usd_per_hour:
            raise CostError(f"no price for GPU '{gpu}' in prices.gpu_usd_per_hour (known: {sorted(self.gpu_usd_per_hour)})")
        return self.gpu_usd_per_hour[gpu]

    def vcpus(self, gpu: str) -> int:
        if gpu not in self.gpu_pod_vcpus:
            raise CostError(f"no vCPU count for GPU '{gpu}' in prices.gpu_pod_vcpus (known: {sorted(self.gpu_pod_vcpus)})")
        return self.gpu_pod_vcpus[gpu]

    def network_volume_month(self, gb: float) -> float:
        rate = (self.network_volume_large_usd_per_gb_month if gb > self.network_volume_large_from_gb
                else self.network_volume_usd_per_gb_month)
        return gb * rate


@dataclass
class Run:
    """One run of the plan on one GPU pod (the A40 test, the H100 production run)."""

    name: str
    gpu: str  # catalog id, a key of prices.gpu_usd_per_hour
    meshes: int  # models uploaded and processed for this run
    train_steps: int  # optimizer steps at batch 1
    step_time_s: float  # seconds per training step on this GPU
    unattended_job_ends: int = 2  # jobs that finish with nobody watching (processing, training)
    volume_extra_gb: float = 0.0  # checkpoints and logs kept on the volume for this run
    kit_step_time_s: Optional[float] = None  # ml.training's measured step on this GPU (None: not measured)
    kit_volume_extra_gb: Optional[float] = None  # ml.training's checkpoints + export at their peak (None: as above)


@dataclass
class Workload:
    """What the work weighs. Every figure is an assumption of the plan, commented in configs/cost.yaml."""

    raw_mb_per_mesh: float = 20.0
    processed_mb_per_mesh: float = 20.0
    weights_gb: float = 15.0
    env_gb: float = 10.0  # the venv on the volume
    upload_mb_per_s: float = 50.0
    setup_hours: float = 1.0  # venv + weights download on a fresh volume, on the pod that does it
    setup_reused_hours: float = 0.1  # the same when the volume already has them (setup is idempotent)
    seed_processing_cpu_s_per_mesh: float = 120.0
    kit_processing_cpu_s_per_mesh: float = 10.0
    unattended_idle_hours: float = 8.0  # how long a pod idles after an unattended job before someone stops it
    project_months: float = 0.5  # how long the volumes are kept


@dataclass
class KitChoices:
    cpu_pod_vcpus: int = 32  # the CPU pod that uploads and processes
    autostop_stop_minutes: float = 2.0  # job end -> pod EXITED: a watchdog poll + the checkpoint flush + the stop call


@dataclass
class CostModelConfig:
    seed_total_usd: float = 260.0  # the seed plan's stated total
    goal_usd: float = 100.0
    prices: Prices = field(default_factory=Prices)
    workload: Workload = field(default_factory=Workload)
    runs: list[Run] = field(default_factory=list)
    kit: KitChoices = field(default_factory=KitChoices)

    def __post_init__(self):
        if not self.runs:
            raise ValueError("runs: at least one run (e.g. the A40 test and the H100 production run) is needed")


def load_cost_config(path: str | Path = DEFAULT_COST_CONFIG, overrides: dict | None = None) -> CostModelConfig:
    return load_config(path, CostModelConfig, overrides)


@dataclass(frozen=True)
class Scenario:
    """Which of the kit's choices are applied. The seed plan applies none."""

    name: str
    shared_volume: bool = False  # one network volume reused by every pod (vs a pod volume per pod)
    cpu_processing: bool = False  # upload + process on a CPU pod (needs the network volume)
    autostop: bool = False  # the watchdog stops each pod when its job ends or the GPU idles
    kit_training: bool = False  # ml.training's measured step time instead of the official modules'
    kit_processing: bool = False  # the kit's processing speed instead of the seed's

    def __post_init__(self):
        # RunPod CPU pods take network volumes only (mounts.persistent is invalid when cpu is set), so the
        # processed data could not reach the GPU pod otherwise.
        if self.cpu_processing and not self.shared_volume:
            raise ValueError("processing on a CPU pod needs the shared network volume (CPU pods have no pod volume)")


# In the order the kit delivers them: the rows up to "+ kit processing speed" are what the kit does today
# (the stacks make GPU pods only, so processing runs on the GPU pod); the last row is a proposal that is not
# built yet (a CPU-pod stack for upload and processing on the shared network volume), priced so its worth is seen.
SCENARIOS = (
    Scenario("seed plan"),
    Scenario("+ one reused network volume", shared_volume=True),
    Scenario("+ autostop watchdog", shared_volume=True, autostop=True),
    Scenario("+ kit training step (measured)", shared_volume=True, autostop=True, kit_training=True),
    Scenario("+ kit processing speed", shared_volume=True, autostop=True, kit_training=True, kit_processing=True),
    Scenario("+ processing on a CPU pod (not built)", shared_volume=True, cpu_processing=True, autostop=True,
             kit_training=True, kit_processing=True),
)
# The last row the kit actually delivers (the goal is judged on it).
AS_BUILT = 4


@dataclass
class CostLine:
    what: str  # "H100 production: training"
    hours: float  # billed hours (0 for storage lines)
    rate: str  # "$2.69/h", "$0.20/GB-month"
    usd: float


def _gb(meshes: int, mb_per_mesh: float) -> float:
    return meshes * mb_per_mesh / 1000.0


def plan_cost(cfg: CostModelConfig, sc: Scenario) -> list[CostLine]:
    """Price the plan under one scenario, line by line. Sum `usd` for the total."""
    p, w, k = cfg.prices, cfg.workload, cfg.kit
    lines: list[CostLine] = []
    cpu_s = w.kit_processing_cpu_s_per_mesh if sc.kit_processing else w.seed_processing_cpu_s_per_mesh
    cpu_pod_rate = k.cpu_pod_vcpus * p.cpu_usd_per_vcpu_hour
    project_h = w.project_months * p.hours_per_month

    def idle_hours(job_ends: int) -> float:
        if sc.autostop:
            # The watchdog stops the pod at the job's end, not after the idle window (that is for hung jobs).
            return job_ends * k.autostop_stop_minutes / 60.0
        return job_ends * w.unattended_idle_hours

    uploaded = 0  # with one shared volume, meshes already uploaded/processed by an earlier run are reused
    set_up = False
    for run in cfg.runs:
        rate = p.gpu(run.gpu)
        new_meshes = max(0, run.meshes - uploaded) if sc.shared_volume else run.meshes
        upload_h = _gb(new_meshes, w.raw_mb_per_mesh) * 1000.0 / w.upload_mb_per_s / 3600.0
        setup_h = w.setup_reused_hours if (sc.shared_volume and set_up) else w.setup_hours
        gpu_h: list[tuple[str, float]] = [("setup (venv, weights)", setup_h)]
        if sc.cpu_processing:
            proc_h = new_meshes * cpu_s / k.cpu_pod_vcpus / 3600.0
            cpu_h = upload_h + proc_h
            if cpu_h > 0:
                # The CPU pod's job ends unattended too; autostop catches it, the seed habit does not.
                cpu_idle = idle_hours(1)
                lines.append(CostLine(f"{run.name}: upload+process {new_meshes} meshes on CPU pod",
                                      cpu_h + cpu_idle, f"${cpu_pod_rate:.2f}/h", (cpu_h + cpu_idle) * cpu_pod_rate))
            job_ends = max(1, run.unattended_job_ends - 1)  # processing no longer ends on the GPU pod
        else:
            proc_h = new_meshes * cpu_s / p.vcpus(run.gpu) / 3600.0
            gpu_h += [(f"upload {new_meshes} meshes", upload_h), (f"process {new_meshes} meshes", proc_h)]
            job_ends = run.unattended_job_ends
        step_s = run.kit_step_time_s if (sc.kit_training and run.kit_step_time_s) else run.step_time_s
        gpu_h.append((f"train {run.train_steps} steps x {step_s:g} s", run.train_steps * step_s / 3600.0))
        gpu_h.append(("idle after jobs" + (" (autostop)" if sc.autostop else " (no autostop)"), idle_hours(job_ends)))
        for what, h in gpu_h:
            if h > 0:
                lines.append(CostLine(f"{run.name}: {what}", h, f"${rate:.2f}/h", h * rate))
        run_h = sum(h for _, h in gpu_h)
        if not sc.shared_volume:
            # Seed: each pod has its own volume sized for its own data, billed at the running rate while the pod
            # runs and at the (double) stopped rate for the rest of the project.
            gb = (_gb(run.meshes, w.raw_mb_per_mesh + w.processed_mb_per_mesh) + w.weights_gb + w.env_gb
                  + _extra_gb(run, sc.kit_training))
            running = gb * p.pod_volume_running_usd_per_gb_month * run_h / p.hours_per_month
            stopped = gb * p.pod_volume_stopped_usd_per_gb_month * max(0.0, project_h - run_h) / p.hours_per_month
            lines.append(CostLine(f"{run.name}: pod volume {gb:.0f} GB, {w.project_months:g} month", 0.0,
                                  f"${p.pod_volume_running_usd_per_gb_month:.2f}/${p.pod_volume_stopped_usd_per_gb_month:.2f} per GB-month",
                                  running + stopped))
        uploaded = max(uploaded, run.meshes)
        set_up = True
    if sc.shared_volume:
        gb = (_gb(uploaded, w.raw_mb_per_mesh + w.processed_mb_per_mesh) + w.weights_gb + w.env_gb
              + sum(_extra_gb(r, sc.kit_training) for r in cfg.runs))
        usd = p.network_volume_month(gb) * w.project_months
        lines.append(CostLine(f"one network volume {gb:.0f} GB, {w.project_months:g} month", 0.0,
                              f"${usd / max(gb * w.project_months, 1e-9):.2f}/GB-month", usd))
    return lines


def _extra_gb(run: Run, kit: bool) -> float:
    """A run's checkpoints and logs on the volume: the kit trainer's own figure once the kit trains."""
    return run.kit_volume_extra_gb if (kit and run.kit_volume_extra_gb is not None) else run.volume_extra_gb


def total(lines: list[CostLine]) -> float:
    return sum(line.usd for line in lines)


def cost_table(cfg: CostModelConfig, scenarios=SCENARIOS) -> list[tuple[Scenario, list[CostLine], float]]:
    return [(sc, lines, total(lines)) for sc in scenarios for lines in [plan_cost(cfg, sc)]]


def format_cost_table(cfg: CostModelConfig, detail: bool = True) -> str:
    """The table bench/cost_model.py prints: each scenario's total, its change, and (detail) its lines."""
    rows = cost_table(cfg)
    out = []
    seed_usd = rows[0][2]
    out.append(f"Seed plan as stated: ${cfg.seed_total_usd:.0f}. Reconstructed from configs/cost.yaml: ${seed_usd:.2f} "
               f"({seed_usd - cfg.seed_total_usd:+.2f}).")
    out.append("")
    out.append(f"{'scenario (cumulative)':<38} {'total':>10} {'change':>10} {'GPU-pod h':>10}")
    prev = None
    for sc, lines, usd in rows:
        gpu_h = sum(l.hours for l in lines if l.rate.endswith("/h") and "CPU pod" not in l.what)
        change = "" if prev is None else f"{usd - prev:+.2f}"
        out.append(f"{sc.name:<38} {'$%.2f' % usd:>10} {change:>10} {gpu_h:>10.1f}")
        prev = usd
    final = rows[AS_BUILT][2]
    verdict = "meets" if final <= cfg.goal_usd else "MISSES"
    out.append("")
    out.append(f"Kit as built ${final:.2f} vs seed ${seed_usd:.2f}: {verdict} the goal of <= ${cfg.goal_usd:.0f} "
               f"({100 * (1 - final / seed_usd):.0f}% less); with a CPU-pod stack (not built) ${rows[-1][2]:.2f}.")
    if detail:
        for sc, lines, usd in (rows[0], rows[AS_BUILT]):
            out.append("")
            out.append(f"{sc.name}: ${usd:.2f}")
            for l in lines:
                hrs = f"{l.hours:8.2f} h" if l.hours else " " * 10
                out.append(f"  {l.what:<58} {hrs} {l.rate:>26} {'$%.2f' % l.usd:>9}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# 2. Pre-launch estimate (fab train --dry-run)
# --------------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    gpu: str
    gpu_count: int
    gpu_usd_per_hour: float  # for the whole pod (per-GPU price x count)
    price_source: str  # "RunPod catalog" or "configs/cost.yaml"
    meshes: int
    steps: int  # optimizer steps
    samples_per_step: int  # micro_batch x grad_accum x GPUs
    step_time_s: float  # per optimizer step
    step_time_source: str
    train_hours: float
    process_meshes: int  # meshes still to process on this pod (0: already processed)
    process_hours: float
    overhead_hours: float  # setup + one autostop tail
    storage_gb: float
    storage_usd_per_month: float
    storage_kind: str  # "network volume" or "pod volume"
    budget_usd: float = 0.0
    max_runtime_hours: float = 0.0
    needed_gb: float = 0.0  # what the run puts on the volume: meshes, samples, weights, venv, checkpoints

    @property
    def hours(self) -> float:
        return self.train_hours + self.process_hours + self.overhead_hours

    @property
    def compute_usd(self) -> float:
        return self.hours * self.gpu_usd_per_hour

    @property
    def epochs(self) -> float:
        return self.steps * self.samples_per_step / self.meshes if self.meshes else 0.0

    def lines(self) -> list[str]:
        out = [
            f"GPU: {self.gpu_count} x {self.gpu} at ${self.gpu_usd_per_hour:.2f}/h ({self.price_source})",
            f"training: {self.steps} steps x {self.step_time_s:.3f} s ({self.step_time_source}) = {self.train_hours:.2f} h"
            + (f"; {self.epochs:.1f} epochs over {self.meshes} meshes" if self.meshes else ""),
        ]
        if self.process_meshes:
            out.append(f"processing {self.process_meshes} meshes on this pod: {self.process_hours:.2f} h "
                       "(a CPU pod on the same network volume does it for a fraction; see `fab cost --model`)")
        out.append(f"setup + autostop tail: {self.overhead_hours:.2f} h")
        out.append(f"compute: {self.hours:.2f} h x ${self.gpu_usd_per_hour:.2f}/h = ${self.compute_usd:.2f}")
        out.append(f"storage: {self.storage_kind} {self.storage_gb:.0f} GB = ${self.storage_usd_per_month:.2f}/month")
        if self.needed_gb > self.storage_gb:
            out.append(f"volume: this run needs ~{self.needed_gb:.0f} GB (meshes, samples, weights, checkpoints), more "
                       f"than the {self.storage_gb:.0f} GB volume: raise networkVolumeGb (or volumeGb) first")
        if self.max_runtime_hours > 0 and self.hours > self.max_runtime_hours:
            step = int(max(0.0, self.max_runtime_hours - self.overhead_hours - self.process_hours) * 3600 / self.step_time_s)
            out.append(f"runtime: maxRuntimeHours is {self.max_runtime_hours:g} h: the watchdog stops the pod then, near step "
                       f"{min(step, self.steps)}; `fab train` again resumes from the last checkpoint (or raise maxRuntimeHours)")
        if self.budget_usd > 0:
            if self.compute_usd <= self.budget_usd:
                out.append(f"budget: ${self.budget_usd:.2f} (budgetUsd) covers it, ${self.budget_usd - self.compute_usd:.2f} to spare")
            else:
                h = self.budget_usd / self.gpu_usd_per_hour
                out.append(f"budget: ${self.budget_usd:.2f} (budgetUsd) is NOT enough: the watchdog will stop the pod "
                           f"after ~{h:.1f} h; raise budgetUsd or lower train.max_steps")
        return out


def catalog_gpu_price(client, gpu_ids: list[str], cloud: str = "SECURE") -> tuple[str, float]:
    """First GPU type of `gpu_ids` (the stack's order of preference) that the catalog prices: (id, $/h per GPU)."""
    gpus = {g.id: g for g in client.list_gpu_types()}
    for gid in gpu_ids:
        g = gpus.get(gid)
        if g is not None and g.price(cloud) > 0:
            return gid, g.price(cloud)
    raise CostError(f"none of {gpu_ids} has a {cloud.lower()} price in the RunPod GPU catalog")


def estimate_run(
    *,
    gpu_ids: list[str],
    gpu_count: int = 1,
    cloud: str = "SECURE",
    meshes: int,
    steps: int,
    samples_per_step: int = 1,
    step_time_s: float | None = None,
    step_time_source: str = "measured",
    process_meshes: int = 0,
    volume_gb: float,
    network_volume: bool,
    budget_usd: float = 0.0,
    max_runtime_hours: float = 0.0,
    cfg: CostModelConfig | None = None,
    client=None,
) -> Estimate:
    """Estimate a training run before launching it (`fab train --dry-run`).

    Price: the live catalog when `client` is given (the stack's GPU types in order), else configs/cost.yaml.
    Step time (per optimizer step): the measured one when given, else the model's per-sample figure for that
    GPU times `samples_per_step`. `process_meshes`: meshes that would still be processed on this pod.
    """
    cfg = cfg or load_cost_config()
    price_source = "configs/cost.yaml"
    gpu, per_gpu = gpu_ids[0], None
    if client is not None:
        try:
            gpu, per_gpu = catalog_gpu_price(client, gpu_ids, cloud)
            price_source = "RunPod catalog"
        except Exception as e:  # an estimate must still print offline; say why the price is the stored one
            price_source = f"configs/cost.yaml; catalog unavailable: {e}"
    if per_gpu is None:
        for gid in gpu_ids:
            if gid in cfg.prices.gpu_usd_per_hour:
                gpu, per_gpu = gid, cfg.prices.gpu_usd_per_hour[gid]
                break
        else:
            raise CostError(f"no price for any of {gpu_ids}: add it to prices.gpu_usd_per_hour in {DEFAULT_COST_CONFIG}")
    if step_time_s is None:
        runs = [r for r in cfg.runs if r.gpu == gpu]
        if not runs:
            raise CostError(f"no step time for '{gpu}': measure one (bench/train_step.py) or add a run for it in "
                            f"{DEFAULT_COST_CONFIG}")
        per_sample = runs[0].kit_step_time_s or runs[0].step_time_s
        what = ("ml.training's bench figure" if runs[0].kit_step_time_s else "the model's figure, not measured")
        step_time_s = per_sample * samples_per_step / max(1, gpu_count)
        step_time_source = (f"{per_sample:g} s per sample, {what}, configs/cost.yaml"
                            + (f"; x {samples_per_step}" if samples_per_step != 1 else ""))
    storage = (cfg.prices.network_volume_month(volume_gb) if network_volume
               else volume_gb * cfg.prices.pod_volume_stopped_usd_per_gb_month)
    vcpus = cfg.prices.gpu_pod_vcpus.get(gpu, 8)
    w = cfg.workload
    ckpt_gb = max((_extra_gb(r, True) for r in cfg.runs if r.gpu == gpu), default=0.0)
    needed = meshes * (w.raw_mb_per_mesh + w.processed_mb_per_mesh) / 1000.0 + w.weights_gb + w.env_gb + ckpt_gb
    process_h = process_meshes * cfg.workload.kit_processing_cpu_s_per_mesh / vcpus / 3600.0
    overhead = cfg.workload.setup_reused_hours + cfg.kit.autostop_stop_minutes / 60.0
    return Estimate(
        gpu=gpu, gpu_count=gpu_count, gpu_usd_per_hour=per_gpu * gpu_count, price_source=price_source,
        meshes=meshes, steps=steps, samples_per_step=samples_per_step, step_time_s=step_time_s,
        step_time_source=step_time_source, train_hours=steps * step_time_s / 3600.0,
        process_meshes=process_meshes, process_hours=process_h, overhead_hours=overhead,
        storage_gb=volume_gb, storage_usd_per_month=storage,
        storage_kind="network volume" if network_volume else "pod volume (stopped rate)", budget_usd=budget_usd,
        max_runtime_hours=max_runtime_hours, needed_gb=needed,
    )


def measured_step_time(metrics_path: str | Path, skip_first: int = 5) -> float | None:
    """Median seconds per step from a trainer's metrics.jsonl (rows with `step` and `step_time_s` or `time`)."""
    path = Path(metrics_path)
    if not path.is_file():
        return None
    times: list[float] = []
    last: tuple[int, float] | None = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if not isinstance(row, dict) or "step" not in row or row.get("kind", "train") != "train":
            continue  # validation lines carry a step and a time too
        if "step_time_s" in row:
            times.append(float(row["step_time_s"]))
        elif "time" in row:  # wall-clock stamps: difference per step
            if last is not None and row["step"] > last[0]:
                times.append((float(row["time"]) - last[1]) / (row["step"] - last[0]))
            last = (int(row["step"]), float(row["time"]))
    times = times[skip_first:] if len(times) > skip_first else times
    if not times:
        return None
    times.sort()
    return times[len(times) // 2]


# --------------------------------------------------------------------------------------------------------
# 3. Actual spend from the billing API
# --------------------------------------------------------------------------------------------------------


@dataclass
class Spend:
    """Billed spend of one stack: its pods (GPU, CPU, disk) and its network volume, over [since, until)."""

    stack: str
    since: str
    until: str
    pod_usd: dict[str, float] = field(default_factory=dict)  # by pod id
    volume_usd: dict[str, float] = field(default_factory=dict)  # by network volume id
    budget_usd: float | None = None

    @property
    def total_usd(self) -> float:
        return sum(self.pod_usd.values()) + sum(self.volume_usd.values())

    def lines(self) -> list[str]:
        out = [f"{self.stack}: ${self.total_usd:.2f} billed {self.since[:10]} .. {self.until[:16]}Z"]
        for pid, usd in sorted(self.pod_usd.items()):
            out.append(f"  pod {pid}: ${usd:.2f}")
        for vid, usd in sorted(self.volume_usd.items()):
            out.append(f"  network volume {vid}: ${usd:.2f} (shared by the stacks that mount it)")
        if self.budget_usd:
            left = self.budget_usd - self.total_usd
            out.append(f"  budget ${self.budget_usd:.2f}: ${left:.2f} left ({100 * self.total_usd / self.budget_usd:.0f}% used)")
        return out


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stack_spend(
    client,
    stack: str,
    pod_ids: list[str],
    volume_ids: list[str] = (),
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    budget_usd: float | None = None,
) -> Spend:
    """Billed spend of a stack's pods and network volumes.

    The billing API buckets by hour/day; records are summed per resource. Default window: the last 30 days
    (the API's own default), which covers a stack's life in practice; pass `since` for longer.
    """
    until = until or dt.datetime.now(dt.timezone.utc)
    since = since or until - dt.timedelta(days=30)
    # Snap to whole days: the API snaps startTime down to its bucket anyway; asking aligned avoids widening.
    start = since.astimezone(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    spend = Spend(stack=stack, since=_iso(start), until=_iso(until), budget_usd=budget_usd)
    for pid in pod_ids:
        rep = client.pod_billing(pod_id=pid, start_time=start, end_time=until, bucket_size="day")
        spend.pod_usd[pid] = round(sum(r.total_amount for r in rep.records if (r.pod_id or pid) == pid), 6)
    for vid in volume_ids:
        rep = client.network_volume_billing(network_volume_id=vid, start_time=start, end_time=until, bucket_size="day")
        spend.volume_usd[vid] = round(sum(r.total_amount for r in rep.records if (r.network_volume_id or vid) == vid), 6)
    return spend
