"""UltraShapeConfig, model builder and checkpoint I/O in the official 3-part layout.

The released `ultrashape_v1.pt` (Hugging Face infinith/UltraShape; Tencent Hunyuan 3D 2.1
community licence) is a torch pickle of {"vae": state_dict, "dit": state_dict, "conditioner":
state_dict}. We read and write exactly that layout; files we write may carry one more top-level
key, "ultrashape_kit", with metadata (our config as a dict, step, ...), which the official loader
ignores because it only indexes the three parts.

Loading is always strict: a missing or unexpected key or a wrong shape is a CheckpointError that
lists them (never a silent partial load, which is how a wrong config turns into a grey blob).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ml.config import from_dict, to_dict
from ml.models.conditioner import ConditionerConfig, ImageConditioner
from ml.models.dit import RefineDiT, RefineDiTConfig
from ml.models.vae import ShapeVAE, ShapeVAEConfig

PARTS = ("vae", "dit", "conditioner")
META_KEY = "ultrashape_kit"


class CheckpointError(ValueError):
    """A checkpoint that does not match the models (names the file and the fix)."""


@dataclass
class UltraShapeConfig:
    vae: ShapeVAEConfig = field(default_factory=ShapeVAEConfig)  # the vecset VAE (official sizes by default)
    dit: RefineDiTConfig = field(default_factory=RefineDiTConfig)  # the refine DiT
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)  # DINOv2 image encoder

    def __post_init__(self):
        if self.dit.in_channels != self.vae.embed_dim:
            raise ValueError(f"dit.in_channels ({self.dit.in_channels}) must equal vae.embed_dim ({self.vae.embed_dim})")
        if self.dit.context_dim != self.conditioner.hidden_size:
            raise ValueError(f"dit.context_dim ({self.dit.context_dim}) must equal conditioner.hidden_size "
                             f"({self.conditioner.hidden_size})")


@dataclass
class UltraShapeModels:
    vae: ShapeVAE
    dit: RefineDiT
    conditioner: ImageConditioner

    def parts(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "dit": self.dit, "conditioner": self.conditioner}

    def to(self, *args, **kwargs) -> "UltraShapeModels":
        for m in self.parts().values():
            m.to(*args, **kwargs)
        return self


def build_models(cfg: UltraShapeConfig, device: str | torch.device = "cpu") -> UltraShapeModels:
    """Construct the three networks (random init). device="meta" builds them without memory."""
    with torch.device(device):
        return UltraShapeModels(ShapeVAE(cfg.vae), RefineDiT(cfg.dit), ImageConditioner(cfg.conditioner))


def materialize(models: UltraShapeModels, device: str | torch.device = "cpu") -> UltraShapeModels:
    """Give meta-built models real (uninitialised) storage on `device`, and recompute the
    non-persistent buffers; load weights next."""
    for m in models.parts().values():
        m.to_empty(device=device)
    models.vae.fourier_embedder.reset_buffers()
    return models


def official_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A part's state dict under the official key names."""
    if isinstance(module, ImageConditioner):
        return module.official_state_dict()
    return dict(module.state_dict())


def load_part(module: nn.Module, sd: dict[str, torch.Tensor], part: str, source: str = "<state dict>") -> None:
    """Strictly load official-named weights `sd` into `module`; CheckpointError on any mismatch."""
    own = official_state_dict(module)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(xs):
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
        lines = [f"{source}: the '{part}' weights do not match the model built from the config."]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {show(shapes)}")
        lines.append("  Fix: use the config the checkpoint was made with (configs/infer_dit_refine.yaml for the "
                     "released ultrashape_v1.pt, the *-tiny.yaml one for tiny test checkpoints).")
        raise CheckpointError("\n".join(lines))
    if isinstance(module, ImageConditioner):
        sd = module.to_module_keys(sd)
    module.load_state_dict(sd, strict=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw 3-part dict, validated: CheckpointError if the file is missing or not that layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found. Download ultrashape_v1.pt from Hugging Face "
                              f"infinith/UltraShape (licence: Tencent Hunyuan 3D 2.1 community licence), or "
                              f"make a tiny one with ml.models.write_random_checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling problem is the same user error
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict with keys {list(PARTS)}, got {type(ckpt).__name__}")
    return ckpt


def load_checkpoint(models: UltraShapeModels, path: str | os.PathLike, parts: tuple[str, ...] = PARTS,
                    base: str | os.PathLike | None = None) -> dict[str, Any]:
    """Strictly load `parts` from an official-layout file into `models`. Returns the metadata dict.

    A part missing from `path` is taken from `base` (e.g. a fine-tuned DiT-only file over the
    released checkpoint); without `base` that is an error naming the missing part.
    """
    ckpt = read_checkpoint(path)
    unknown = [k for k in ckpt if k not in PARTS and k != META_KEY]
    if unknown:
        raise CheckpointError(f"{path}: unexpected top-level keys {unknown}; an UltraShape checkpoint holds "
                              f"{list(PARTS)} (and optionally '{META_KEY}'). If this is a training state, "
                              f"export it with ml.models.export_official first.")
    base_ckpt = None
    for part in parts:
        if part in ckpt:
            src, sd = str(path), ckpt[part]
        else:
            if base is None:
                raise CheckpointError(f"{path}: has no '{part}' weights (it holds {sorted(k for k in ckpt if k in PARTS)}). "
                                      f"Pass the released checkpoint as the base to take '{part}' from it.")
            base_ckpt = base_ckpt or read_checkpoint(base)
            if part not in base_ckpt:
                raise CheckpointError(f"{base}: has no '{part}' weights either")
            src, sd = str(base), base_ckpt[part]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{src}: '{part}' must be a state dict, got {type(sd).__name__}")
        load_part(models.parts()[part], sd, part, src)
    return dict(ckpt.get(META_KEY) or {})


def _atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_official(models: UltraShapeModels | dict[str, nn.Module], path: str | os.PathLike,
                    config: UltraShapeConfig | None = None, meta: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write {"vae", "dit", "conditioner"} (+ our metadata) atomically; loadable by the official code.

    `models` may be an UltraShapeModels or a dict of some of the parts (e.g. {"dit": dit}).
    dtype casts floating tensors (e.g. torch.bfloat16 to halve the file)."""
    parts = models.parts() if isinstance(models, UltraShapeModels) else dict(models)
    out: dict[str, Any] = {}
    for name, module in parts.items():
        if name not in PARTS:
            raise ValueError(f"unknown part '{name}'; parts are {list(PARTS)}")
        sd = official_state_dict(module)
        out[name] = {k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
                     for k, v in sd.items()}
    m = dict(meta or {})
    if config is not None:
        m["config"] = to_dict(config)
    if m:
        out[META_KEY] = m
    _atomic_save(out, path)
    return Path(path)


def config_from_meta(meta: dict[str, Any], source: str = "<checkpoint>") -> UltraShapeConfig | None:
    """The UltraShapeConfig stored by export_official, if any."""
    c = meta.get("config")
    return None if c is None else from_dict(UltraShapeConfig, c, source=source)


def write_random_checkpoint(config: UltraShapeConfig, path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised checkpoint in the official layout (for tests: tiny configs take seconds).

    The weights are the modules' default init under torch.manual_seed(seed), with the few parameters
    that default to zero/one (norm affines, DINOv2 cls/mask tokens) perturbed so that a wrong key
    mapping cannot go unnoticed in a round trip."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = build_models(config)
    with torch.no_grad():
        for m in models.parts().values():
            for name, p in m.named_parameters():
                if p.ndim == 1 or "token" in name:
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
    return export_official(models, path, config=config, meta={"random_seed": seed})
