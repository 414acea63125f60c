"""Print the cost model: the seed plan's $260 against the kit's choices, one at a time.

    python bench/cost_model.py
    python bench/cost_model.py --set workload.project_months=1.0 --set workload.unattended_idle_hours=12
    python bench/cost_model.py --brief

All figures come from configs/cost.yaml (every assumption commented there); nothing talks to RunPod.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.cost import DEFAULT_COST_CONFIG, format_cost_table, load_cost_config  # noqa: E402
from ml.config import parse_overrides  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEFAULT_COST_CONFIG), help="cost model assumptions (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an assumption, e.g. workload.project_months=1.0")
    ap.add_argument("--brief", action="store_true", help="totals only, no per-line breakdown")
    args = ap.parse_args(argv)
    cfg = load_cost_config(args.config, parse_overrides(args.set))
    try:
        print(format_cost_table(cfg, detail=not args.brief))
    except BrokenPipeError:  # `| head`
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
