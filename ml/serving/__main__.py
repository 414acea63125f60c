"""Serve the refine model over HTTP.

    python -m ml.serving --ckpt outputs/run/model.pt --config configs/infer_dit_refine.yaml
    python -m ml.serving --ckpt ... --config configs/infer_dit_refine-tiny.yaml --serve-config configs/serve-tiny.yaml
    python -m ml.serving --ckpt ... --config ... --host 0.0.0.0 --port 8000 --set max_queue=4

Prints one line "ml.serving: ready on http://HOST:PORT ..." once the model is loaded and the port
answers; `fab serve` and the tests wait for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from ml.config import ConfigError, load_config, parse_overrides
from ml.serving.auth import ENV_KEY, ApiKeyError, resolve_api_key
from ml.serving.config import BIND_HOSTS, LOOPBACK_HOSTS, ServeConfig

READY_PREFIX = "ml.serving: ready on "
DEFAULT_SERVE_CONFIG = "configs/serve.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ml.serving", description="Serve the UltraShape refiner (LitServe).")
    p.add_argument("--ckpt", required=True, help="model checkpoint (what ml.refine takes)")
    p.add_argument("--config", required=True, help="inference config, e.g. configs/infer_dit_refine.yaml")
    p.add_argument("--serve-config", default=None, help=f"serving config (default {DEFAULT_SERVE_CONFIG} if present)")
    p.add_argument("--host", default=None, help="bind address: 127.0.0.1 (default), 0.0.0.0 or ::")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--key-file", default=None, help="where the generated API key is kept (0600)")
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without an API key; refused unless bound to 127.0.0.1",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="serving config overrides")
    return p.parse_args(argv)


def load_serve_config(args: argparse.Namespace) -> ServeConfig:
    overrides = parse_overrides(args.set)
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.key_file is not None:
        overrides["auth.key_file"] = args.key_file
    if args.insecure_no_auth:
        overrides["auth.enabled"] = False
    path = args.serve_config
    if path is None and Path(DEFAULT_SERVE_CONFIG).is_file():
        path = DEFAULT_SERVE_CONFIG
    if path is None:
        from ml.config import from_dict

        data: dict = {}
        for k, v in overrides.items():
            cur = data
            *head, last = k.split(".")
            for h in head:
                cur = cur.setdefault(h, {})
            cur[last] = v
        return from_dict(ServeConfig, data, source="<defaults + command line>")
    return load_config(path, ServeConfig, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_serve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for label, path in (("--ckpt", args.ckpt), ("--config", args.config)):
        if not Path(path).is_file():
            print(f"error: {label} {path}: file not found", file=sys.stderr)
            return 2
    if cfg.host not in BIND_HOSTS:
        print(f"error: host {cfg.host!r}: LitServe binds only {', '.join(BIND_HOSTS)}", file=sys.stderr)
        return 2
    if not 1024 <= cfg.port <= 65535:
        print(f"error: port {cfg.port}: LitServe takes 1024..65535", file=sys.stderr)
        return 2

    api_key = None
    if cfg.auth.enabled:
        try:
            api_key = resolve_api_key(cfg.key_file)
        except (ApiKeyError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if api_key.generated:
            bar = "=" * 72
            print(
                f"{bar}\nNew API key, saved to {api_key.source} (mode 0600). It is shown only this once:\n\n"
                f"    {api_key.value}\n\nSend it with every request:  -H 'X-API-Key: <key>'  "
                f"(or set {ENV_KEY} on the server to choose your own)\n{bar}",
                flush=True,
            )
        else:
            print(f"ml.serving: API key from {api_key.source} (sha256 {api_key.fingerprint}...)", flush=True)
    else:
        if cfg.host not in LOOPBACK_HOSTS:
            print(
                f"error: refusing to serve without an API key on {cfg.host}; "
                "bind 127.0.0.1 or drop --insecure-no-auth / auth.enabled: false",
                file=sys.stderr,
            )
            return 2
        print("ml.serving: WARNING auth disabled (loopback only)", flush=True)

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ml.serving.api import build_server, wait_until_ready

    server = build_server(args.ckpt, args.config, cfg, api_key)
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(cfg.host, cfg.host)
    public = f"http://{'[::]' if cfg.host == '::' else cfg.host}:{cfg.port}"

    def announce(body: dict) -> None:
        print(
            f"{READY_PREFIX}{public} (model {body.get('ckpt')} on {body.get('device')}; "
            f"docs at {public}/docs; max_queue={cfg.max_queue})",
            flush=True,
        )

    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        # LitServe shuts down gracefully (uvicorn, inference worker, manager) on KeyboardInterrupt
        # only; without this, SIGTERM (docker stop, fab, a test's kill) would orphan its children.
        # Forked helpers inherit this handler, so act only in the main process.
        if os.getpid() == main_pid:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    stop = threading.Event()
    # The model loads in LitServe's worker process; the line is printed only once /health says so.
    threading.Thread(
        target=wait_until_ready,
        args=(f"http://{probe_host}:{cfg.port}", 3600.0, announce, stop),
        daemon=True,
        name="ready-announcer",
    ).start()
    try:
        server.run(
            host=cfg.host,
            port=cfg.port,
            num_api_servers=1,
            log_level=cfg.log_level,
            generate_client_file=False,  # LitServe would otherwise drop a client.py into the CWD
        )
    except RuntimeError as e:  # LitServe: a worker's setup (model load) failed; its traceback is above
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
