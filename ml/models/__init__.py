"""UltraShape 1.0-compatible networks, in our own code, weight-compatible with the released
checkpoint `ultrashape_v1.pt` (Hugging Face infinith/UltraShape; Tencent Hunyuan 3D 2.1 community
licence: non-commercial, excludes the EU, UK and South Korea -- read it before downloading).

API (stable; other areas build on these names)
------------------------------------------------
Configs and building
    UltraShapeConfig(vae=ShapeVAEConfig(), dit=RefineDiTConfig(), conditioner=ConditionerConfig())
        defaults are the official sizes; configs/infer_dit_refine*.yaml hold them under `model:`
        (load with ml.config.load_config(path, ml.refine.InferConfig).model).
    build_models(cfg, device="cpu"|"cuda"|"meta") -> UltraShapeModels(vae, dit, conditioner)
    materialize(models, device)      storage for meta-built models (then load weights)

Checkpoints (official 3-part layout {"vae", "dit", "conditioner"} + optional "ultrashape_kit" metadata)
    load_checkpoint(models, path, parts=("vae","dit","conditioner"), base=None) -> metadata dict
        strict: CheckpointError (a ValueError) lists missing / unexpected keys and shape mismatches;
        parts absent from `path` come from `base` (e.g. a DiT-only fine-tune over the release).
    load_part(module, state_dict, part, source)   strict load of one part (official key names)
    official_state_dict(module)                   a part's weights under the official key names
    export_official(models_or_dict_of_parts, path, config=None, meta=None, dtype=None)  atomic write
    config_from_meta(meta)                        the UltraShapeConfig that export_official stored
    write_random_checkpoint(cfg, path, seed)      random tiny checkpoint for tests (seconds)

ShapeVAE (ml/models/vae.py)
    z, voxel_idx = vae.encode(surface, sample_posterior=True, generator=None)
        surface (B, P, 3 + point_feats): xyz in [-1, 1], normal, sharp-edge label (0/1)
        z (B, K, embed_dim) is already in the DiT's space (x scale_factor); voxel_idx (B, K, 3) long,
        K = min(num_latents, fewest occupied voxels in the batch) -- may be < num_latents.
    tokens = vae.decode(z)                    (B, K, width)
    logits = vae.query(tokens, points)        occupancy logits, > 0 inside
    verts, faces = vae.to_mesh(tokens[:1], octree_resolution=1024, bounds=1.0, flashvdm=False)
        closed, outward-facing mesh in [-bounds, bounds]^3; flashvdm=True is the official decoding
        (top third of the tokens per chunk of queries: ~2x faster, slightly different numbers)
    voxelize(points, max_tokens, resolution, generator) -> (centres, voxel_idx)

RefineDiT (ml/models/dit.py)
    v = dit(x, t, cond, voxel_idx, cond_mask=None)
        x (B, N, 64) noisy latents, t (B,) in [0, 1] (0 = noise, 1 = data), cond (B, S, 1024)
        image tokens, voxel_idx (B, N, 3) integer RoPE positions, cond_mask (B, S) bool (True =
        real token; None: rows that are all -1 are padding, the official convention).
    dit.moe_aux_loss()  sum of the last training forward's MoE load-balancing losses (detached,
        for logging). Its gradient is already injected through the MoE outputs, as officially:
        do not add it to the loss yourself.
    block.moe.every_expert = True   call experts that got no tokens too (zero gradients), so every
        data-parallel rank fires the same gradient hooks
    dit.compile_kernels()   torch.compile the q/k norm + RoPE (same numbers)
    Rows whose context is all zeros (unconditional / CFG-dropped) skip the cross-attention, whose
    output there is exactly out_proj.bias.
    dit.skip_zero_context = False   compute that cross-attention anyway (same output; its weights then
        get a zero gradient instead of none: what data-parallel training needs)
    Under bf16 autocast q/k RMS norm and RoPE run in bf16 (fused rms_norm kernel, one roll + addcmul)
    and the MoE dispatches tokens sorted by expert with gather-only backward (bf16-noise changes only).

ImageConditioner (ml/models/conditioner.py)
    tokens, token_mask = conditioner(image, mask=None, disable_drop=True, generator=None)
        image (B, 3, H, W) in [-1, 1]; mask (B, 1, H, W) in {-1, 1}; background patches removed
        (padding rows are -1 and False in token_mask); disable_drop=False applies the CFG drop
        (cfg.drop_ratio) per sample.
    conditioner.unconditional(tokens) -> zeros (the official unconditional context)

Flow matching (ml/models/flow_matching.py), t = 0 noise, t = 1 data
    flow_matching_loss(velocity_fn, x1, generator=None, t=None, noise=None) -> scalar
        velocity_fn(x_t, t) -> v;  x_t = t x1 + (1 - t) x0, target x1 - x0, t ~ U[0, 1]
    sample_euler(cond_fn, noise, steps=50, guidance=5.0, batched_cfg=True) -> x1
    euler_sigmas(steps), interpolate(x0, x1, t)

Refine pipeline: ml/refine.py (RefinePipeline.from_checkpoint(ckpt, config_path, device=...);
pipeline(image, mesh, steps=50, guidance=5.0, octree_resolution=1024, seed=42) -> trimesh.Trimesh
in the input mesh's frame; bad inputs raise ValueError naming the file and the fix).
"""

from ml.models.checkpoint import (
    META_KEY,
    PARTS,
    CheckpointError,
    UltraShapeConfig,
    UltraShapeModels,
    build_models,
    config_from_meta,
    export_official,
    load_checkpoint,
    load_part,
    materialize,
    official_state_dict,
    read_checkpoint,
    write_random_checkpoint,
)
from ml.models.conditioner import ConditionerConfig, ImageConditioner
from ml.models.dit import RefineDiT, RefineDiTConfig
from ml.models.flow_matching import euler_sigmas, flow_matching_loss, interpolate, sample_euler
from ml.models.vae import ShapeVAE, ShapeVAEConfig, voxelize

__all__ = [
    "META_KEY", "PARTS", "CheckpointError", "UltraShapeConfig", "UltraShapeModels", "build_models",
    "config_from_meta", "export_official", "load_checkpoint", "load_part", "materialize",
    "official_state_dict", "read_checkpoint", "write_random_checkpoint", "ConditionerConfig",
    "ImageConditioner", "RefineDiT", "RefineDiTConfig", "euler_sigmas", "flow_matching_loss",
    "interpolate", "sample_euler", "ShapeVAE", "ShapeVAEConfig", "voxelize",
]
