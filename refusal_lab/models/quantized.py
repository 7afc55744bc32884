"""What bitsandbytes' quantized layers need before a backward pass.

On a CPU with AVX512-BF16, a 4-bit layer repacks its weights for a faster inference kernel the first time
it runs without gradients, and from then on its matmul passes no gradient to its input. Attribution
patching differentiates through every layer after the clean runs have been made without gradients, so it
unpacks them first; the next forward pass without gradients repacks them.
"""

from __future__ import annotations

import torch


def unpack_4bit_for_gradients(model: torch.nn.Module) -> int:
    """Return the weights of every repacked 4-bit layer to the format whose matmul has a gradient; how many were."""
    try:
        from bitsandbytes.nn import modules
    except ImportError:
        return 0
    inverse = getattr(modules, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # a bitsandbytes without the CPU repacking
        return 0
    unpacked = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, modules.Linear4bit) and state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = inverse(module.weight.data, state)
            unpacked += 1
    return unpacked
