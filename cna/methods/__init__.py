"""Steering methods as plug-ins: one module and one config each, found through a registry by `method.name`.

Built in: `cna` (the paper's neuron circuit), `random` (its control), `caa` (contrastive activation addition)
and `direction` (directional ablation). A new method is a `SteeringMethod` subclass decorated with
`register_method` and a config dataclass (its `config_type`, registered as a Hydra schema by cna.config;
conf/method/<name>.yaml gives its defaults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cna.plugins import import_package

if TYPE_CHECKING:
    from cna.methods.base import SteeringMethod

_REGISTRY: dict[str, type[SteeringMethod]] = {}


def register_method(cls: type[SteeringMethod]) -> type[SteeringMethod]:
    """Class decorator: make a method known by its `name` (a later class of the same name replaces it)."""
    _REGISTRY[cls.name] = cls
    return cls


def method_types() -> dict[str, type[SteeringMethod]]:
    """Every registered method by name, in their `order`; the modules of cna.methods register theirs on import."""
    import_package("cna.methods")
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


def make_method(config) -> SteeringMethod:
    """The method a config names (`config.name`)."""
    from cna.errors import ConfigError

    known = method_types()
    if config.name not in known:
        raise ConfigError(f"method.name: expected one of {', '.join(known)}, got {config.name!r}")
    return known[config.name](config)
