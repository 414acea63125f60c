"""python -m ml.processing --input-dir data/input --output-dir data/output [--num-workers N] [--num-views 16]
       [--resolution 512] [--limit N] [--config configs/processing.yaml] [--set key=value ...]

Flags override the config file's keys; without --config the built-in defaults (= configs/processing.yaml)
apply. Exit code 0 when the run finished (rejected meshes are listed in report.jsonl), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys

from ml.config import ConfigError, from_dict, load_config, parse_overrides
from ml.processing.config import ProcessingConfig
from ml.processing.pipeline import run

FLAGS = {  # CLI flag -> config key (one name per thing: the flag is the key with dashes)
    "input_dir": "input_dir",
    "output_dir": "output_dir",
    "num_workers": "num_workers",
    "num_views": "num_views",
    "resolution": "resolution",
    "limit": "limit",
    "render_size": "render_size",
    "timeout_s": "timeout_s",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ml.processing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML config (configs/processing.yaml, configs/processing-tiny.yaml)")
    ap.add_argument("--input-dir")
    ap.add_argument("--output-dir")
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--num-views", type=int)
    ap.add_argument("--resolution", type=int, help="watertight grid cells per side (512 for official data)")
    ap.add_argument("--render-size", type=int)
    ap.add_argument("--timeout-s", type=float)
    ap.add_argument("--limit", type=int, help="only the first N meshes in sorted path order")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any other config key")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        overrides = parse_overrides(a.set)
        for flag, key in FLAGS.items():
            v = getattr(a, flag)
            if v is not None:
                overrides[key] = v
        if a.config:
            cfg = load_config(a.config, ProcessingConfig, overrides)
        else:
            cfg = from_dict(ProcessingConfig, overrides, source="command line")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, progress=not a.quiet)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
