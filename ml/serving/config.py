"""The serving config: where to listen, who may call, and how much one request may ask for.

    from ml.config import load_config
    from ml.serving.config import ServeConfig
    cfg = load_config("configs/serve.yaml", ServeConfig)

The model itself is described by the inference config (configs/infer_dit_refine.yaml) that
ml.refine reads; this file only holds what the HTTP layer needs. Every limit here exists because
the API is meant to be reachable from outside the pod: a request must not be able to take the
worker down, hold it forever, or make the server buffer unbounded data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# LitServe's run() accepts only these bind addresses (it refuses hostnames).
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
BIND_HOSTS = ("127.0.0.1", "0.0.0.0", "::")


def default_key_file() -> Path:
    """~/.config/ultrashape/serve_api_key (XDG); outside the repo so it is never synced or committed."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ultrashape" / "serve_api_key"


@dataclass
class AuthConfig:
    enabled: bool = True  # off only for a loopback bind: __main__ refuses a public bind without a key
    # Where a generated key is kept (0600). ULTRASHAPE_API_KEY in the environment wins over the file.
    # Empty means default_key_file().
    key_file: str = ""


@dataclass
class LimitsConfig:
    # Whole multipart body; the read is aborted (413) past this plus 64 KiB for the multipart framing.
    max_request_bytes: int = 80 * 1024**2
    max_image_bytes: int = 16 * 1024**2  # the `image` part
    max_mesh_bytes: int = 64 * 1024**2  # the `coarse_mesh` part
    min_image_side: int = 16  # smaller than this carries no usable view for DINOv2 (518 px input)
    max_image_side: int = 8192  # PIL's decompression-bomb guard also applies
    min_mesh_faces: int = 4  # a tetrahedron; fewer cannot enclose a volume
    max_mesh_faces: int = 5_000_000  # a sculpt decimated for refinement is far below this
    max_mesh_vertices: int = 5_000_000
    # A mesh whose bounding-box diagonal is below this (in its own units) is a point, not a shape.
    min_mesh_extent: float = 1e-6
    max_steps: int = 200  # flow-matching steps; 50 is the official default
    max_guidance: float = 30.0  # classifier-free guidance scale; 5.0 is the official default
    min_octree_resolution: int = 16  # marching-cubes grid; below 16 nothing survives extraction
    max_octree_resolution: int = 1024  # 1024 is the official default; memory grows with its cube

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_image_bytes", "max_mesh_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limits.{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps < 2:
            raise ValueError(f"limits.max_steps must be >= 2 (ml.refine needs 2 Euler steps), got {self.max_steps}")
        if self.max_image_bytes + self.max_mesh_bytes > self.max_request_bytes:
            # Otherwise a request whose two parts are each within their cap could still be refused.
            raise ValueError(
                "limits.max_request_bytes must be >= limits.max_image_bytes + limits.max_mesh_bytes "
                f"({self.max_image_bytes} + {self.max_mesh_bytes}), got {self.max_request_bytes}"
            )
        if not 1 <= self.min_octree_resolution <= self.max_octree_resolution:
            raise ValueError("limits.min_octree_resolution must be between 1 and limits.max_octree_resolution")
        if not 0 < self.min_image_side <= self.max_image_side:
            raise ValueError("limits.min_image_side must be between 1 and limits.max_image_side")
        if not 1 <= self.min_mesh_faces <= self.max_mesh_faces:
            raise ValueError("limits.min_mesh_faces must be between 1 and limits.max_mesh_faces")
        if not (math.isfinite(self.max_guidance) and self.max_guidance >= 0):
            raise ValueError("limits.max_guidance must be a finite number >= 0")


@dataclass
class DefaultsConfig:
    """Values used for form fields the client leaves out (the ml.refine defaults)."""

    steps: int = 50
    guidance: float = 5.0
    octree_resolution: int = 1024
    seed: int = 42


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default; a pod passes --host 0.0.0.0 behind its proxy
    port: int = 8000
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    devices: int = 1  # GPUs to serve on (one model copy, one worker each)
    # Requests admitted at once (running + waiting). One more gets 503 at once, before its body is
    # read, so a burst costs neither memory nor worker time.
    max_queue: int = 8
    # A request that waited this long in the queue is answered 504 instead of being run.
    queue_timeout_s: float = 600.0
    # A running refinement is aborted (504) after this long; the worker stays up for the next one.
    request_timeout_s: float = 600.0
    # The client must finish uploading within this (408); guards against slow-drip uploads.
    upload_timeout_s: float = 60.0
    torch_threads: int = 0  # CPU threads for torch in the worker; 0 leaves torch's default
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        for name in ("queue_timeout_s", "request_timeout_s", "upload_timeout_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {v}")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        d, lim = self.defaults, self.limits
        if not 2 <= d.steps <= lim.max_steps:  # ml.refine needs at least 2 Euler steps
            raise ValueError(f"defaults.steps={d.steps} is outside 2..limits.max_steps={lim.max_steps}")
        if not 0 <= d.guidance <= lim.max_guidance:
            raise ValueError(f"defaults.guidance={d.guidance} is outside 0..limits.max_guidance={lim.max_guidance}")
        if not lim.min_octree_resolution <= d.octree_resolution <= lim.max_octree_resolution:
            raise ValueError(
                f"defaults.octree_resolution={d.octree_resolution} is outside "
                f"limits.min_octree_resolution..limits.max_octree_resolution "
                f"({lim.min_octree_resolution}..{lim.max_octree_resolution})"
            )

    @property
    def key_file(self) -> Path:
        return Path(self.auth.key_file).expanduser() if self.auth.key_file else default_key_file()
