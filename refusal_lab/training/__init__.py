"""Supervised fine-tuning with LoRA: what the refusal model organism is built with."""

from refusal_lab.training.sft import LoraSettings, SFTExample, TrainingStats, build_examples, train_lora

__all__ = ["LoraSettings", "SFTExample", "TrainingStats", "build_examples", "train_lora"]
