"""Supervised fine-tuning with LoRA: what the refusal model organism is built with."""

from refusal_lab.training.adapter_files import merge_adapter, save_adapter
from refusal_lab.training.sft import LoraSettings, SFTExample, TrainedLora, TrainingStats, build_examples, train_lora

__all__ = ["LoraSettings", "SFTExample", "TrainedLora", "TrainingStats", "build_examples", "merge_adapter", "save_adapter", "train_lora"]
