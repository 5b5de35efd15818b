"""The trainer that resumes a published run (``retrace train``); the recipe it follows is retrace.pythia.

    scaler        DeepSpeed's dynamic loss scalers: ZeRO-1's (2^12, window 1000, hysteresis 2, min 1) and
                  stage 0's FP16_Optimizer rules (14m/31m)
    optim         weight-decay groups, flat buffers, overflow check, clip norm, apex FusedAdam (chunked)
    zero1         the optimizer state partitioned across data-parallel ranks
    engine        the builtin engine (DeepSpeed ZeRO-1 arithmetic in plain PyTorch; CPU fp16 too)
    ds_engine     the DeepSpeed engine (optional dependency)
    state         resume states (safetensors + JSON, atomic, newest two kept)
    tensorfile    safetensors written streamed from any device, hashed while written
    distributed   torchrun / srun+submitit / local launcher
    device        the rank's device; a GPU cell's GPU checked against its gpu_type
    determinism   deterministic mode (deterministic algorithms, cuBLAS workspace, NCCL Ring/Simple)
    environment   run.json's record of what changes GPU numerics (SDPA kernel, TF32, NCCL, driver, GPU)
    deadline      the SLURM job's end time: stop and save before the limit
    trainer       ``train(TrainConfig) -> TrainResult``

Which engine matches what:
    builtin     the arithmetic of GPT-NeoX v1.0 on DeeperSpeed eb7f5cff + apex a651e2c2 (reference §7):
                fp16 module and gradients (accumulated in fp16 over gas), fp16 gradient sum across ranks
                then ×1/dp (the pipeline engine's all-reduce: with Pythia's pp = 1 nothing is
                reduce-scattered), the overflow check in every precision, the loss-scale rules of the
                recipe's ZeRO stage, the clip norm per weight-decay group, apex FusedAdam's float
                arithmetic with the ZeRO constructor's init step (update k runs with t = k + 1), LR
                stepped only after applied updates. Optimizer state replicated, or partitioned across
                the ranks (ZeRO-1, zero1=True: bitwise the same values). Runs on CPU in fp16 too.
    deepspeed   today's DeepSpeed ZeRO-1 with Pythia's ds_config; FusedAdam on GPU (the apex formula),
                torch AdamW on CPU; fp16 only on GPU. It differs from the original where §7 item 4 says:
                gradients divided by dp before the reduce-scatter, and no init Adam step (t = k).
Starting from a Hugging Face checkpoint (weights only), Adam starts from zero moments with apex's counter
at 1 (the init step) and the LR counter at the start step; from a GPT-NeoX checkpoint with ZeRO files the
moments, master and LR counter continue, and Adam's counter either continues or restarts as GPT-NeoX's
elastic checkpoint makes it (retrace.train.engine, ``adam_t_mode``).
"""

from retrace.train.trainer import TrainConfig, TrainingInterrupted, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train"]
