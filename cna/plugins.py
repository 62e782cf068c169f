"""Plug-ins register themselves when their module is imported: the registries (cna.methods, cna.evaluation.metric)
import every module of their package once before they are read."""

from __future__ import annotations

import importlib
import pkgutil


def import_package(package: str) -> None:
    """Import every module of a package (submodules included); a module already imported costs nothing."""
    module = importlib.import_module(package)
    for found in pkgutil.walk_packages(module.__path__, f"{package}."):
        importlib.import_module(found.name)
