"""The LitServe refine API: POST /infer (image + coarse mesh -> refined GLB), GET /health.

    server = build_server(ckpt, "configs/infer_dit_refine.yaml", cfg, api_key)
    server.run(host=cfg.host, port=cfg.port)           # what `python -m ml.serving` does

One LitServe worker per device runs the same RefinePipeline as `python -m ml.refine`, in process,
loaded once in setup(device). Requests reach it only after the Guard (ml/serving/guard.py) has
checked the key, the queue bound, the body size, the form and the formats; the worker then
decodes the image and mesh fully and answers bad content with a 4xx naming the problem.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from litserve.utils import WorkerSetupStatus
from starlette.middleware.gzip import GZipMiddleware

from ml.serving.auth import ApiKey
from ml.serving.config import ServeConfig
from ml.serving.guard import INFER_PATH, OPEN_PATHS, Guard, GuardSettings
from ml.serving.validation import (
    IMAGE_FIELD,
    MESH_FIELD,
    MIN_STEPS,
    RequestError,
    check_part_size,
    decode_image,
    decode_mesh,
    parse_params,
    split_form,
)

GLB_MEDIA_TYPE = "model/gltf-binary"
API_TITLE = "UltraShape refine API"
API_VERSION = "1.0"


class RefineTimeout(Exception):
    """Raised from inside the model when a request's compute deadline has passed."""


class _Deadline:
    """A forward pre-hook that aborts a refinement past its deadline.

    The diffusion loop calls the DiT once per step and the VAE decoder once per chunk of the
    marching-cubes grid, so a check at each module call stops a refinement within one step of its
    deadline. Raising unwinds the pipeline like any error: nothing is left half-done in the worker,
    which goes on to the next request. (LitServe's own `timeout` only covers time in the queue.)
    """

    def __init__(self) -> None:
        self.at: float | None = None
        self.limit_s: float = 0.0

    def start(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.at = time.monotonic() + limit_s

    def stop(self) -> None:
        self.at = None

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise RefineTimeout(f"refinement exceeded {self.limit_s:g} s")

    def __call__(self, module, args) -> None:  # torch forward pre-hook signature
        self.check()


def _attach_deadline(pipeline: Any, deadline: _Deadline, max_depth: int = 3) -> int:
    """Hook every torch module the pipeline holds, down to max_depth (blocks, not every Linear)."""
    import torch

    roots: list[torch.nn.Module] = []
    if isinstance(pipeline, torch.nn.Module):
        roots.append(pipeline)
    for v in vars(pipeline).values():
        if isinstance(v, torch.nn.Module):
            roots.append(v)
        elif callable(getattr(v, "parts", None)):  # ml.models UltraShapeModels: {"vae", "dit", "conditioner"}
            roots.extend(m for m in v.parts().values() if isinstance(m, torch.nn.Module))
    if not roots:
        raise TypeError(f"{type(pipeline).__name__} holds no torch modules; the request timeout cannot be enforced")
    seen: set[int] = set()
    n = 0

    def visit(m: torch.nn.Module, depth: int) -> None:
        nonlocal n
        if id(m) in seen or depth > max_depth:
            return
        seen.add(id(m))
        m.register_forward_pre_hook(deadline)
        n += 1
        for child in m.children():
            visit(child, depth + 1)

    for r in roots:
        visit(r, 0)
    return n


class RefineAPI(ls.LitAPI):
    """setup -> decode_request -> predict -> encode_response, one request at a time per worker."""

    def __init__(self, ckpt: str | Path, model_config: str | Path, cfg: ServeConfig):
        # One request per forward: a refinement is one big batch of its own (the DiT runs CFG
        # pairs over ~32k latent tokens), so batching requests would only add queueing delay.
        super().__init__(api_path=INFER_PATH, max_batch_size=1)
        self.ckpt = str(ckpt)
        self.model_config = str(model_config)
        self.cfg = cfg
        self.pipeline = None
        self._deadline = _Deadline()

    # ------------------------------------------------------------------ LitServe hooks (worker side)

    def setup(self, device) -> None:
        import torch

        from ml.refine import RefinePipeline

        if self.cfg.torch_threads > 0:
            torch.set_num_threads(self.cfg.torch_threads)
        t0 = time.perf_counter()
        self.pipeline = RefinePipeline.from_checkpoint(self.ckpt, self.model_config, device=device)
        n_hooks = _attach_deadline(self.pipeline, self._deadline)
        # print, not log: LitServe does not configure logging in its spawned worker processes.
        print(
            f"ml.serving: model loaded from {self.ckpt} on {device} in {time.perf_counter() - t0:.1f} s "
            f"({n_hooks} modules watched for the {self.cfg.request_timeout_s:g} s request timeout)",
            flush=True,
        )

    def decode_request(self, request) -> dict[str, Any]:
        # `request` is the parsed multipart form (Starlette FormData), already checked by the Guard
        # for structure and formats; here the image and the mesh are decoded in full.
        try:
            files, fields = split_form(request.multi_items())
            data = {}
            for name in (IMAGE_FIELD, MESH_FIELD):
                f = files[name].file
                f.seek(0)
                data[name] = f.read()
                check_part_size(name, len(data[name]), self.cfg.limits)
            params = parse_params(fields, self.cfg.defaults, self.cfg.limits, self.cfg.request_timeout_s)
            image = decode_image(data[IMAGE_FIELD], self.cfg.limits)
            mesh = decode_mesh(data[MESH_FIELD], self.cfg.limits)
        except RequestError as e:
            raise HTTPException(status_code=e.status, detail=e.detail()) from None
        return {"image": image, "mesh": mesh, "params": params}

    def predict(self, x: dict[str, Any]):
        import torch

        p = x["params"]
        self._deadline.start(p.timeout_s if p.timeout_s is not None else self.cfg.request_timeout_s)
        try:
            out = self.pipeline(
                x["image"],
                x["mesh"],
                steps=p.steps,
                guidance=p.guidance,
                octree_resolution=p.octree_resolution,
                seed=p.seed,
                image_name=IMAGE_FIELD,
                mesh_name=MESH_FIELD,
            )
            return out, dict(getattr(self.pipeline, "timings", {}) or {})
        except RefineTimeout as e:
            raise HTTPException(
                504,
                {"code": "timeout", "message": f"{e}; lower 'steps' or 'octree_resolution', or ask for a longer limit"},
            ) from None
        except ValueError as e:
            # ml.refine raises ValueError for inputs it cannot refine (its message says why and what to do).
            raise HTTPException(422, {"code": "unrefinable_input", "message": str(e)}) from None
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise HTTPException(
                503, {"code": "out_of_memory", "message": "GPU out of memory; retry with a lower 'octree_resolution'"}
            ) from None
        except RuntimeError as e:
            # ml.refine's one expected RuntimeError: the model predicted no surface for these inputs.
            # It is an answer about the inputs, not a server fault; anything else stays a 500.
            if "has no surface" in str(e):
                raise HTTPException(422, {"code": "empty_result", "message": str(e)}) from None
            raise
        finally:
            self._deadline.stop()

    def encode_response(self, output) -> Response:
        mesh, timings = output
        glb = mesh.export(file_type="glb")
        headers = {
            "Content-Disposition": 'attachment; filename="refined.glb"',
            "X-Mesh-Vertices": str(len(mesh.vertices)),
            "X-Mesh-Faces": str(len(mesh.faces)),
        }
        if "total_s" in timings:
            headers["X-Refine-Seconds"] = f"{timings['total_s']:.3f}"
        return Response(content=glb, media_type=GLB_MEDIA_TYPE, headers=headers)


# ---------------------------------------------------------------------------------------- server


def build_server(
    ckpt: str | Path,
    model_config: str | Path,
    cfg: ServeConfig,
    api_key: ApiKey | None,
) -> ls.LitServer:
    """The LitServer with our Guard, our /health and a documented OpenAPI schema. Not started."""
    api = RefineAPI(ckpt, model_config, cfg)
    settings = GuardSettings.create(cfg, api_key)
    server = ls.LitServer(
        api,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        workers_per_device=1,
        timeout=cfg.queue_timeout_s,
        middlewares=[(Guard, {"settings": settings})],
        # A worker that dies (segfault in a native library, OOM kill) is started again and its
        # in-flight request answered 500, instead of LitServe shutting the whole server down.
        restart_workers=True,
        model_metadata={"ckpt": Path(ckpt).name, "model_config": Path(model_config).name},
    )
    server.guard_settings = settings
    # LitServe adds GZipMiddleware (level 9) in front of everything. A refined GLB can be 100+ MB of
    # float32 that barely compresses, and GZip runs on the event loop: /health and every other
    # request would stall behind it. Clients that want compression can compress the GLB themselves.
    server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not GZipMiddleware]
    _replace_health(server, cfg, ckpt)
    _install_openapi(server, cfg, api_key is not None)
    return server


def _flat_devices(server: ls.LitServer) -> list[str]:
    out: list[str] = []
    for d in server.devices:
        out.extend(d if isinstance(d, (list, tuple)) else [d])
    return out


def _replace_health(server: ls.LitServer, cfg: ServeConfig, ckpt: str | Path) -> None:
    # LitServe's /health answers a bare "ok" and sits behind the same auth as everything else;
    # ours is open (load balancers and `fab serve` poll it without a key) and says what is loaded where.
    app = server.app
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
    devices = _flat_devices(server)
    started = time.time()

    @app.get("/health", tags=["service"], summary="Is the model loaded, and on which device (no key needed)")
    async def health() -> JSONResponse:
        status = dict(getattr(server, "workers_setup_status", None) or {})
        ready = bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
        failed = any(v == WorkerSetupStatus.ERROR for v in status.values())
        body = {
            "status": "ok" if ready else ("error" if failed else "loading"),
            "model_loaded": ready,
            "device": devices[0] if len(devices) == 1 else devices,
            "workers": {k: str(v) for k, v in status.items()},
            "ckpt": Path(ckpt).name,
            "queue": {"inflight": server.guard_settings.inflight.value, "max": cfg.max_queue},
            "uptime_s": round(time.time() - started, 1),
        }
        return JSONResponse(body, status_code=200 if ready else 503)


def _install_openapi(server: ls.LitServer, cfg: ServeConfig, auth: bool) -> None:
    """LitServe's route takes a raw Request, so FastAPI cannot describe its body; we do it here."""
    app = server.app
    lim, d = cfg.limits, cfg.defaults

    def error_response(desc: str) -> dict:
        return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=API_TITLE,
            version=API_VERSION,
            description=(
                "Refine a coarse 3-D mesh with UltraShape, guided by one reference image. "
                "Send `X-API-Key: <key>` on every call except `/health` and the docs."
            ),
            routes=app.routes,
        )
        comps = schema.setdefault("components", {})
        comps.setdefault("schemas", {})["Error"] = {
            "type": "object",
            "properties": {
                "detail": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string", "example": "empty_mesh"},
                        "message": {"type": "string"},
                        "field": {"type": "string", "example": "coarse_mesh"},
                    },
                    "required": ["code", "message"],
                }
            },
        }
        if auth:
            comps["securitySchemes"] = {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                if auth and path not in OPEN_PATHS:
                    op["security"] = [{"ApiKey": []}]
                    op.setdefault("responses", {})["401"] = error_response("Missing or wrong API key")
        infer = schema["paths"][INFER_PATH]["post"]
        infer["summary"] = "Refine a coarse mesh (multipart: image + coarse_mesh) and return a GLB"
        infer["tags"] = ["refine"]
        infer["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [IMAGE_FIELD, MESH_FIELD],
                        "properties": {
                            IMAGE_FIELD: {
                                "type": "string",
                                "format": "binary",
                                "description": f"Reference view: PNG (RGBA preferred), JPEG or WEBP; "
                                f"<= {lim.max_image_bytes} bytes, sides {lim.min_image_side}..{lim.max_image_side} px",
                            },
                            MESH_FIELD: {
                                "type": "string",
                                "format": "binary",
                                "description": f"Coarse mesh: GLB, OBJ, PLY, STL or OFF (by content); "
                                f"<= {lim.max_mesh_bytes} bytes, {lim.min_mesh_faces}..{lim.max_mesh_faces} faces",
                            },
                            "steps": {"type": "integer", "minimum": MIN_STEPS, "maximum": lim.max_steps, "default": d.steps},
                            "guidance": {
                                "type": "number",
                                "minimum": 0,
                                "maximum": lim.max_guidance,
                                "default": d.guidance,
                            },
                            "octree_resolution": {
                                "type": "integer",
                                "minimum": lim.min_octree_resolution,
                                "maximum": lim.max_octree_resolution,
                                "default": d.octree_resolution,
                            },
                            "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "default": d.seed},
                            "timeout_s": {
                                "type": "number",
                                "exclusiveMinimum": 0,
                                "maximum": cfg.request_timeout_s,
                                "description": "Give up (504) after this many seconds of refinement; "
                                f"default and maximum {cfg.request_timeout_s:g}",
                            },
                        },
                    }
                }
            },
        }
        infer["responses"] = {
            "200": {
                "description": "The refined mesh, in the coarse mesh's own frame and units",
                "content": {GLB_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            },
            "400": error_response("Malformed request: not multipart, missing/unknown/duplicate field"),
            "401": error_response("Missing or wrong API key"),
            "408": error_response("Upload not finished within the upload timeout"),
            "413": error_response("Body, file, image or mesh over its limit"),
            "415": error_response("Not multipart, or an image/mesh format this server does not read"),
            "422": error_response("Corrupt or unusable content, or a parameter out of range"),
            "503": error_response("Queue full (retry after Retry-After seconds), or GPU out of memory"),
            "504": error_response("Waited too long in the queue, or the refinement exceeded its time limit"),
        }
        if not auth:
            infer["responses"].pop("401")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def wait_until_ready(url: str, timeout_s: float, on_ready, stop: threading.Event | None = None) -> None:
    """Poll GET {url}/health until model_loaded, then call on_ready(body) once (used for the startup line)."""
    import json
    import urllib.request

    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end and not (stop and stop.is_set()):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                body = json.loads(r.read())
                if body.get("model_loaded"):
                    on_ready(body)
                    return
        except Exception:
            pass  # not listening yet, or 503 while loading
        time.sleep(0.25)
