"""Prompt sets, their validation and chat formatting."""

from refusal_lab.prompts.chat import format_chat, require_chat_template
from refusal_lab.prompts.dataset import LABELS, SPLITS, PromptRecord, PromptSet, load_prompt_set

__all__ = ["LABELS", "SPLITS", "PromptRecord", "PromptSet", "format_chat", "load_prompt_set", "require_chat_template"]
