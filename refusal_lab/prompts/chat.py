"""Chat formatting: the tokenizer's own template, so prompts look exactly as in deployment."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from refusal_lab.errors import ConfigError


def require_chat_template(tokenizer: PreTrainedTokenizerBase, model_name: str) -> str:
    """The template text; a base model without one cannot be studied as a chat model."""
    template = tokenizer.chat_template
    if not template:
        raise ConfigError(
            f"{model_name}'s tokenizer has no chat template; refusal_lab studies chat (instruct) models. "
            "Use the model's -Instruct/-chat variant, or add a template to its tokenizer_config.json"
        )
    return template if isinstance(template, str) else str(template)


def format_chat(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None = None) -> str:
    """The templated text up to the first response token (generation prompt added)."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
