"""Typed training config: the schema of configs/train_dit_refine*.yaml.

    from ml.config import load_config
    from ml.training.config import TrainConfig
    cfg = load_config("configs/train_dit_refine.yaml", TrainConfig, {"train.max_steps": 100})

Every field has a comment; the YAML files repeat them. Defaults are the official UltraShape
refine-DiT recipe (configs/train_dit_refine.yaml of the official repo) where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ml.models.checkpoint import UltraShapeConfig


@dataclass
class RunConfig:
    output_dir: Path = Path("outputs")  # runs are written to <output_dir>/<run_id>/
    run_id: Optional[str] = None  # None: "<config stem>-<UTC time>"; one name in the dir, the logs and W&B
    seed: int = 0  # seeds data order, point/view choice, noise and timesteps (per rank and step)


@dataclass
class DataConfig:
    root: Path = Path("data/output")  # what `python -m ml.processing` wrote: samples/, renders/, render.json, data_list/
    train_list: str = "train"  # data_list/<train_list>.json
    val_list: str = "val"  # data_list/<val_list>.json; an empty or missing list disables validation
    pc_size: int = 163840  # surface points per sample given to the VAE encoder: half uniform, half near sharp edges
    sharpedge_label: bool = True  # append the 0/1 sharp-edge flag as a 7th point channel (official: true)
    image_size: int = 1022  # DINOv2 input side in pixels (1022 = 73 patches of 14)
    padding_ratio: float = 1.15  # square canvas side / object bbox side (official: 1.15, centred, white)
    num_workers: int = 4  # DataLoader worker processes per rank (0: load in the training process)
    # stop with an error once more than this share of the training samples failed to load (distinct uids, however
    # often drawn; broken validation samples are only logged)
    max_broken_fraction: float = 0.05
    latent_cache: bool = False  # cache the VAE posterior per sample on the first epoch; later epochs skip the encoder


@dataclass
class LoRAConfig:
    enabled: bool = False  # train low-rank adapters instead of every DiT weight (the 48 GB A40 path)
    rank: int = 64  # adapter rank r
    alpha: float = 64.0  # adapter scale is alpha / rank (official peft setup: alpha = rank)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "out_proj", "fc1", "fc2"])
    # ^ suffixes of nn.Linear names in the DiT that get adapters; checked against the model at start-up


@dataclass
class ModelConfig:
    # Architecture of the three networks (ml.models.UltraShapeConfig). Training differs from inference in one
    # place: vae.num_latents, the tokens per shape (official training 8192, inference 32768); the weights are
    # the same, so export/ loads in ml.refine with the inference config.
    arch: UltraShapeConfig = field(default_factory=UltraShapeConfig)
    weights: Optional[Path] = None  # released checkpoint (VAE + DiT + conditioner), loaded strictly; None: random init
    cfg_drop: float = 0.1  # probability of dropping the image condition (classifier-free guidance training)
    # The MoE load-balancing loss is added inside the DiT's backward with the weight of the model config's
    # moe_aux_loss_alpha (official 0.01), as the official trainer does; it is logged as moe_aux_loss.
    activation_checkpointing: bool = True  # recompute DiT blocks in backward: ~1/3 more compute, far less memory
    checkpoint_blocks: Optional[int] = None  # with activation_checkpointing: recompute only the first N blocks (null: all)
    compile: bool = False  # torch.compile each DiT block (fused norms, casts, residuals; ZeRO 0-2 only; compiles at the first steps)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class OptimConfig:
    lr: float = 1.0e-5  # peak learning rate (official base_lr)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas (official)
    eps: float = 1.0e-6  # AdamW epsilon (official)
    weight_decay: float = 1.0e-2  # AdamW weight decay (official)
    warmup_steps: int = 500  # linear warm-up in optimizer steps (official 500)
    warmup_start: float = 1.0e-6  # LR factor at step 0 (official f_start)
    min_lr_ratio: float = 1.0e-3  # LR factor at the end of the cosine (official f_min)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)


@dataclass
class TrainLoopConfig:
    max_steps: int = 20000  # optimizer steps; the cosine decays over exactly these
    micro_batch: int = 1  # samples per GPU per forward (official batch_size 1)
    grad_accum: int = 4  # micro-batches per optimizer step (official accumulate_grad_batches 4)
    overlap_encoders: bool = True  # next micro-batch's frozen encoders on a 2nd CUDA stream beside backward/optimizer
    ckpt_every: int = 1000  # write a resumable checkpoint every N optimizer steps (and always at the end)
    keep_checkpoints: int = 2  # keep the newest N checkpoints (each holds optimizer state: ~37-43 GB at full size)
    val_every: int = 500  # validation loss every N optimizer steps (0: only at the end)
    val_batches: int = 16  # micro-batches per validation (official limit_val_batches 16)
    log_every: int = 10  # one metrics.jsonl / TensorBoard line every N optimizer steps
    export: bool = True  # write export/ultrashape.pt (official inference layout) at the end
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float32 keeps small fine-tuning deltas


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2  # ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters sharded
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (stage >= 1; the A40 switch)
    offload_param: bool = False  # ZeRO-Infinity parameter offload to CPU (stage 3 only)
    precision: Literal["bf16", "autocast", "fp32"] = "autocast"
    # ^ bf16: bf16 weights; fp32 master copies inside DeepSpeed's ZeRO optimizer (zero_stage >= 1), or at
    #   zero_stage 0 in ml.training.master.MasterAdamW (one-pass update, matmuls under autocast: fastest on one GPU);
    #   autocast: fp32 weights, bf16 matmuls through torch.autocast (the official Lightning "bf16-mixed"); the
    #   optimizer is a plain fused AdamW over fp32 tensors; fp32: CPU runs
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    # ^ precision bf16 only: the dtype gradients are summed in over micro-batches and ranks. fp32 loses no bits but
    #   holds every gradient in 4 bytes instead of 2 (+6 GB at full size: the worst-case sample then needs recompute
    #   on an 80 GB H100); bf16 rounds each sum to 8 bits of mantissa, as DeepSpeed's bf16 default does.
    dist_backend: Optional[str] = None  # None: nccl with CUDA, gloo without
    overlap_comm: bool = True  # overlap gradient reduction with backward (ZeRO 2/3)
    reduce_bucket_size: int = 200_000_000  # elements per gradient reduction bucket


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # <run>/tb/
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with WANDB_API_KEY, else offline
    wandb_project: str = "ultrashape-refine"  # W&B project name
    peak_tflops: Optional[float] = None  # for MFU; None: looked up from the GPU name (H100 989, A40 150 bf16 dense)
    loss_curve: bool = True  # <run>/loss_curve.png at the end


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        t = self.train
        if t.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {t.max_steps}")
        if t.micro_batch < 1 or t.grad_accum < 1:
            raise ValueError("train.micro_batch and train.grad_accum must be >= 1")
        if self.optim.warmup_steps >= t.max_steps and t.max_steps > 1:
            # A warm-up longer than the run never reaches the peak LR: almost always a typo.
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be < train.max_steps ({t.max_steps})"
            )
        if self.model.compile and self.deepspeed.zero_stage == 3:
            raise ValueError("model.compile needs deepspeed.zero_stage <= 2: ZeRO-3 gathers each layer's weights in "
                             "hooks the compiled blocks would bypass; set model.compile: false for ZeRO-3")
        if self.deepspeed.offload_param and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage: 3")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1 (ZeRO-Offload)")
        if self.data.pc_size % 2:
            raise ValueError(f"data.pc_size must be even (half uniform, half sharp), got {self.data.pc_size}")


# Keys that fix what a checkpoint *is*; a resumed run must not change them. Everything else (max_steps,
# logging, checkpoint cadence, workers) may change on resume, as nanoGPT lets run settings change.
# train.micro_batch: the saved data position counts micro-batches (DataOrder converts only world-size changes),
# so another micro-batch size would land elsewhere in the epoch.
FROZEN_ON_RESUME = ("model.arch", "model.lora", "data.pc_size", "data.sharpedge_label", "deepspeed.zero_stage",
                    "deepspeed.precision", "train.micro_batch")
