"""One 4-bit kernel per model on the CPU.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for a faster inference kernel the
first time the layer runs without gradients. From then on its matmul passes no gradient to its input
(attribution patching differentiates through every layer, after clean runs made without gradients), it
rounds differently from the unpacked kernel, and bitsandbytes' own inverse of the repacking does not
restore the weights. So 4-bit models on the CPU keep the one kernel that serves both: 4-bit generation
takes about 1.7 times as long (6.9 s against 4.0 s for 32 prompts of 32 tokens on the organism).
"""

from __future__ import annotations

import torch


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> int:
    """Stop every 4-bit layer from repacking its weights for the CPU inference kernel; how many layers."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
