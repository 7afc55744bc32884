"""The one place that owns hooks: every experiment reads and changes activations through here.

``intervene`` registers a function per site for the length of a ``with`` block and removes every
hook on the way out, also when the block raises. A function gets the site's tensor
([batch, positions, width]) and returns a replacement, or None to leave it as it is. It must not
change the tensor in place: ``capture`` keeps the tensors themselves (detached, not copied), so an
in-place change would also change what was captured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from refusal_lab.interventions.sites import Site
from refusal_lab.models.adapters import ArchitectureAdapter

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]


@contextmanager
def intervene(adapter: ArchitectureAdapter, functions: Mapping[Site, SiteFn]) -> Iterator[None]:
    handles = []
    try:
        for site, fn in functions.items():
            module = site.module(adapter)
            if site.reads_input:
                handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_output_hook(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(adapter: ArchitectureAdapter, sites: list[Site], store: dict[Site, torch.Tensor], *, detach: bool = True) -> Iterator[None]:
    """Fill ``store`` with each site's tensor during the block; ``detach=False`` keeps it in the autograd graph (gradients)."""

    def keep(site: Site) -> SiteFn:
        def fn(tensor: torch.Tensor) -> None:
            store[site] = tensor.detach() if detach else tensor
            return None

        return fn

    with intervene(adapter, {site: keep(site) for site in sites}):
        yield


def _input_hook(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _output_hook(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        # Attention modules return (output, weights); the tensor that reaches the residual is first.
        tensor = output[0] if isinstance(output, tuple) else output
        new = fn(tensor)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook
