"""Training: pretraining from scratch, continued pretraining / full fine-tuning, LoRA and chat SFT, with one loop.

    from gemma3.train import TrainConfig, train
    train(TrainConfig(data=["corpus/"], init="270m", model_overrides={"num_hidden_layers": 4}, steps=200))

Modules: `config` (TrainConfig, the learning-rate schedule), `data` (sources → token file → packed
sequences), `trainer` (the loop), `lora` (the LoRA modules; their files are gemma3.weights.lora's), `checkpoint` (atomic checkpoints),
`rundir` (what a new run may write over, what a resumed one reads back), `metrics` (JSONL, TensorBoard, loss
PNG) and `distributed` (DDP / FSDP2, the only multi-process code).
"""

from gemma3.train.config import TrainConfig
from gemma3.train.trainer import Trainer, TrainingError, TrainResult, train

from gemma3.weights.lora import LoraSettings

__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "Trainer", "TrainingError", "train"]
