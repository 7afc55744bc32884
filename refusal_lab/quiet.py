"""Library notices a user should see only where they matter, and then in words that say what they mean.

bitsandbytes warns on import, in every run and at every precision, that it could not fetch an
optional fused CPU kernel for 4-bit matmuls from the Hugging Face hub (``kernels-community``). It
is unreachable offline and changes nothing but speed, and only for 4-bit models on the CPU; the
loader says so there (``cpu_4bit_notice``) instead.
"""

from __future__ import annotations

import logging

_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_seen: list[str] = []


class _HoldKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _KERNEL_NOTICE in message:
            _seen.append(message)
            return False
        return True


def install() -> None:
    """Hold back the notice; call before bitsandbytes is imported (the package's ``__init__`` does)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HoldKernelNotice())


def cpu_4bit_notice() -> str | None:
    """What the held-back notice means for a 4-bit model on the CPU, or None when bitsandbytes did not raise it."""
    if not _seen:
        return None
    return (
        "bitsandbytes could not fetch its optional fused CPU kernel for 4-bit matmuls (the `kernels` package "
        "and the Hugging Face hub); 4-bit layers use its built-in CPU path, which gives the same results more slowly"
    )
