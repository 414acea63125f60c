"""ml.training: DeepSpeed fine-tuning of the UltraShape refine DiT (issue 4; several GPUs: issue 9).

    python -m ml.training --config configs/train_dit_refine.yaml [--resume [PATH|latest]] [key=value ...]
    deepspeed --num_gpus N --module ml.training --config configs/train_dit_refine.yaml

Modules:
    config      TrainConfig (the schema of configs/train_dit_refine*.yaml) and the keys a resume may not change
    data        RefineDataset over ml.processing's output, DataOrder (resumable, sharded), loaders
    step        TrainModels: frozen VAE + DINOv2 conditioner, the DiT's flow-matching loss, latent cache
    engine      DeepSpeed config and engine, LR schedule, activation checkpointing, LoRA, static graph for DP
    checkpoint  atomic checkpoints, --resume resolution, universal conversion across world sizes
    logs        metrics.jsonl / TensorBoard / W&B, loss-curve PNG
    export      the official {"vae", "dit", "conditioner"} file that ml.refine loads
    trainer     the loop (Trainer.fit)

A run writes outputs/<run_id>/: command.txt, config.json, metrics.jsonl, tb/, wandb/, checkpoints/, export/,
loss_curve.png, broken_samples.jsonl. See README "Training" for the measured H100 figures.
"""
