"""The trainer that resumes a published run (``retrace train``); the recipe it follows is retrace.pythia.

    scaler        DeepSpeed's dynamic loss scaler (2^12, window 1000, hysteresis 2, min 1)
    optim         weight-decay groups, flat buffers, apex-FusedAdam (AdamW mode) update
    engine        the builtin engine (DeepSpeed ZeRO-1 arithmetic in plain PyTorch; CPU fp16 too)
    ds_engine     the DeepSpeed engine (optional dependency)
    state         resume states (safetensors + JSON, atomic, newest two kept)
    distributed   torchrun / srun+submitit / local launcher
    trainer       ``train(TrainConfig) -> TrainResult``

Which engine matches what:
    builtin     the arithmetic of GPT-NeoX v1.0 on DeeperSpeed's ZeRO-1 optimizer: fp16 module and
                gradients (accumulated in fp16 over gas), fp16 gradient sum across ranks then ×1/world,
                DeepSpeed's overflow check / loss-scale update / unscale-and-clip order, apex FusedAdam
                (AdamW mode) on an fp32 master, LR stepped only after applied updates. Runs on CPU in fp16
                too (slowly). Differs from the original only in summation order (all-reduce, norms) and in
                where the master copy lives (replicated instead of partitioned: no value changes).
    deepspeed   today's DeepSpeed ZeRO-1 with Pythia's ds_config. Same order of operations; FusedAdam on
                GPU (the apex formula), torch AdamW on CPU (equal up to rounding); fp16 only on GPU.
Starting from a Hugging Face checkpoint (weights only), Adam starts from zero moments at step 0 and the
LR counter at the start step; from a GPT-NeoX checkpoint with ZeRO files, both continue where it stopped.
"""

from retrace.train.trainer import TrainConfig, TrainingInterrupted, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train"]
