"""Forward hooks that exist only inside a `with` block.

Every hook cna adds goes through `attached`, which removes it in `finally`, so
an exception inside the block (or a Ctrl-C) never leaves a model modified. A hook with
its own `attach` is registered by that function: a tap of a fused mixture-of-experts module
(`cna.experts.expert_tap`) sees each block of expert rows between the gate and down_proj,
and goes the same way.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

TensorMap = Callable[[torch.Tensor], torch.Tensor]
# The taps attached to each fused experts module (cna.experts runs them): counted by `hook_count` like hooks.
TAPS: weakref.WeakKeyDictionary[nn.Module, list[Callable]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Hook:
    """A function to register on `module`: before its forward (`pre`) or after it; or by `attach(module, fn)`,
    which returns a handle with `remove()` (a tap inside a fused experts module: `cna.experts.expert_tap`)."""

    module: nn.Module
    fn: Callable
    pre: bool
    with_kwargs: bool = False
    attach: Callable | None = None


@contextmanager
def attached(hooks: Iterable[Hook]) -> Iterator[None]:
    handles = []
    try:
        for hook in hooks:
            if hook.attach is not None:
                handles.append(hook.attach(hook.module, hook.fn))
                continue
            register = hook.module.register_forward_pre_hook if hook.pre else hook.module.register_forward_hook
            handles.append(register(hook.fn, with_kwargs=hook.with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_tensor(output) -> torch.Tensor:
    """A decoder layer returns its hidden states alone or first in a tuple, by transformers version."""
    return output[0] if isinstance(output, tuple) else output


def read_input(module: nn.Module, read: Callable[[torch.Tensor], None]) -> Hook:
    """Call `read` with the module's first positional input."""
    return Hook(module, lambda _module, args: read(args[0]), pre=True)


def read_output(module: nn.Module, read: Callable[[torch.Tensor], None]) -> Hook:
    """Call `read` with the module's output hidden states."""
    return Hook(module, lambda _module, _args, output: read(first_tensor(output)), pre=False)


def map_input(module: nn.Module, transform: TensorMap) -> Hook:
    """Replace the module's first input (positional, or the `hidden_states` keyword) by `transform(input)`."""

    def hook(_module, args, kwargs):
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

    return Hook(module, hook, pre=True, with_kwargs=True)


def map_output(module: nn.Module, transform: TensorMap) -> Hook:
    """Replace the module's output hidden states by `transform(output)`, keeping any tuple around them."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (transform(output[0]), *output[1:])
        return transform(output)

    return Hook(module, hook, pre=False)


def hook_count(model: nn.Module) -> int:
    """How many forward hooks of any kind (and expert taps) are registered anywhere in `model` (for leak checks)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(TAPS.get(m, ()))  # torch has no public count
        for m in model.modules()
    )
