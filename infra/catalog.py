"""What each stack would cost per hour now, from RunPod's live GPU catalog.

    python -m infra.catalog                 # every stack (Pulumi.*.yaml)
    python -m infra.catalog --stack h100    # one

For each GPU type a stack lists (in its order of preference) it prints the list price for the
stack's cloud and GPU count and the current pod availability. The price billed for a running pod
is the pod's own `cost` (`pulumi stack output costPerHr`); storage is extra (see README).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from infra.runpod import RunPodClient, RunPodError
from infra.stack_config import StackConfig, StackConfigError, list_stacks, load_stack_config


@dataclass
class Quote:
    gpu_type_id: str
    usd_per_hr: Optional[float]  # None: the catalog does not know this id
    availability: Optional[str]  # NONE | LOW | MEDIUM | HIGH


def quote(cfg: StackConfig, client: RunPodClient) -> list[Quote]:
    """One quote per GPU candidate of the stack, in its order of preference."""
    gpus = {g.id: g for g in client.list_gpu_types(availability=True, count=cfg.gpu_count, cloud=cfg.cloud_type)}
    out = []
    for gid in cfg.gpu_types:
        g = gpus.get(gid)
        out.append(Quote(gid, g.price(cfg.cloud_type, cfg.gpu_count) if g else None, g.availability if g else None))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.catalog", description=__doc__.splitlines()[0])
    ap.add_argument("--stack", action="append", help="stack name (repeatable); default: every Pulumi.<stack>.yaml")
    args = ap.parse_args(argv)
    try:
        client = RunPodClient()
        for stack in args.stack or list_stacks():
            cfg = load_stack_config(stack)
            print(f"{stack}: {cfg.gpu_count}x GPU, {cfg.cloud_type} cloud")
            for q in quote(cfg, client):
                price = f"${q.usd_per_hr:.2f}/h" if q.usd_per_hr is not None else "not in the catalog (check the id)"
                print(f"  {q.gpu_type_id:<24} {price:<12} availability {q.availability or '?'}")
    except (RunPodError, StackConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
