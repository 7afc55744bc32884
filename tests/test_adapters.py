"""Every architecture adapter names the right modules, checked on tiny random models.

The strongest check there is: with hooks on the modules an adapter names, each decoder layer's
output must equal its input plus the attention contribution plus the MLP contribution, and the
adapter's readout of the last residual must reproduce the model's logits. A wrong module (Gemma 2's
post-norms, say) breaks the sum.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from refusal_lab.errors import ConfigError
from refusal_lab.models.adapters import adapter_for, known_model_types

SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
)


def tiny_text_model(config_class: str, model_class: str) -> torch.nn.Module:
    config = getattr(T, config_class)(**SIZES)
    torch.manual_seed(0)
    return getattr(T, model_class)(config).eval()


def tiny_gemma3_multimodal() -> torch.nn.Module:
    config = T.Gemma3Config(
        text_config=SIZES,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
    )
    torch.manual_seed(0)
    return T.Gemma3ForConditionalGeneration(config).eval()


FAMILIES = {
    "llama": lambda: tiny_text_model("LlamaConfig", "LlamaForCausalLM"),
    "mistral": lambda: tiny_text_model("MistralConfig", "MistralForCausalLM"),
    "qwen2": lambda: tiny_text_model("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": lambda: tiny_text_model("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": lambda: tiny_text_model("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": lambda: tiny_text_model("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": lambda: tiny_text_model("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "gemma3": tiny_gemma3_multimodal,
}


def test_every_registered_family_is_tested() -> None:
    assert set(FAMILIES) == set(known_model_types())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_decomposes_the_residual_stream(family: str) -> None:
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    assert adapter.n_layers == SIZES["num_hidden_layers"]
    assert (adapter.n_heads, adapter.n_kv_heads, adapter.d_head, adapter.d_model) == (4, 2, 16, 64)

    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, from_input: bool = False):
        def hook(module, args, kwargs, output):
            value = (args[0] if args else kwargs["hidden_states"]) if from_input else output
            captured[name] = (value[0] if isinstance(value, tuple) else value).detach().clone()

        return hook

    for i in range(adapter.n_layers):
        handles.append(adapter.layer(i).register_forward_hook(keep(f"in{i}", True), with_kwargs=True))
        handles.append(adapter.layer(i).register_forward_hook(keep(f"out{i}"), with_kwargs=True))
        handles.append(adapter.attn_output(i).register_forward_hook(keep(f"attn{i}"), with_kwargs=True))
        handles.append(adapter.mlp_output(i).register_forward_hook(keep(f"mlp{i}"), with_kwargs=True))
        handles.append(
            adapter.head_output_proj(i).register_forward_hook(keep(f"z{i}", True), with_kwargs=True)
        )
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()

    for i in range(adapter.n_layers):
        rebuilt = captured[f"in{i}"] + captured[f"attn{i}"] + captured[f"mlp{i}"]
        torch.testing.assert_close(rebuilt, captured[f"out{i}"], rtol=1e-5, atol=1e-5)
        assert captured[f"z{i}"].shape[-1] == adapter.n_heads * adapter.d_head
    last = captured[f"out{adapter.n_layers - 1}"]
    torch.testing.assert_close(adapter.logits_from_residual(last), logits, rtol=1e-5, atol=1e-5)
    assert adapter.describe()["n_layers"] == SIZES["num_hidden_layers"]


def test_unknown_architecture_lists_the_known_ones() -> None:
    config = T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = T.GPT2LMHeadModel(config)
    with pytest.raises(ConfigError, match="no architecture adapter for model_type 'gpt2'.*llama"):
        adapter_for(model)
