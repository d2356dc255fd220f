"""Model families: one module per architecture family, found through this registry.

A family (a :class:`~megavlm.families.base.Family` subclass, one module each: ``llava.py``) holds everything that
is specific to it: its config sections and the mapping from/to the HF config, what it builds from the shared
blocks in ``megavlm/models``, its parameter mappings for the converter (declared as data), its image processing
(crops per image and tokens per crop) and image text, its default conversation template, and the shapes
``megavlm plan`` counts. The CLI, trainer, converter, ``generate``, ``eval`` and ``plan`` reach a family only
through the functions here. docs/families.md says how to add one.

Torch-free: the config checks and ``plan`` use the registry on a login node.
"""

from __future__ import annotations

import difflib

from .base import Family, HFImport

__all__ = ["Family", "HFImport", "register", "get", "of", "names", "for_model_type", "image_tokens", "template"]

_REGISTRY: dict[str, Family] = {}


def register(family: Family | type[Family], *, overwrite: bool = False) -> Family:
    """Add a family (an instance, or a class that is instantiated) under its ``name``; usable as a class decorator.
    Its ``model_types`` must not be claimed by another family."""
    fam = family() if isinstance(family, type) else family
    if not fam.name:
        raise ValueError(f"{type(fam).__name__} has no name")
    if fam.name in _REGISTRY and not overwrite:
        raise ValueError(f"model family {fam.name!r} is already registered")
    for other in _REGISTRY.values():
        if other.name != fam.name and set(other.model_types) & set(fam.model_types):
            raise ValueError(f"model family {fam.name!r} claims HF model_type(s) "
                             f"{sorted(set(other.model_types) & set(fam.model_types))} of {other.name!r}")
    _REGISTRY[fam.name] = fam
    return family


def unregister(name: str) -> None:
    """Remove a family (tests that register a throw-away one clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str, key: str = "model.family") -> Family:
    """The family registered as ``name``; ConfigError naming ``key`` and the known families otherwise."""
    fam = _REGISTRY.get(name)
    if fam is None:
        from ..config import ConfigError

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}={name!r} is not a known model family{hint} (known: {', '.join(_REGISTRY)})")
    return fam


def of(cfg) -> Family:
    """The family of a config (``cfg.model.family``)."""
    return get(cfg.model.family)


def for_model_type(model_type: str | None) -> Family | None:
    """The family that converts HF checkpoints of ``model_type`` (config.json), or None."""
    for fam in _REGISTRY.values():
        if model_type in fam.model_types:
            return fam
    return None


def image_tokens(cfg) -> int:
    """Sequence positions one image takes in the config's model (what the data layer expands ``<image>`` to)."""
    return of(cfg).image_tokens(cfg)


def template(cfg) -> str:
    """The conversation template of a config: ``data.template``, or the family's default when it is null."""
    return cfg.data.template or of(cfg).default_template


def _register_builtin() -> None:
    from . import internvl, llava, phi4mm, qwen2_vl

    register(llava.LlavaFamily())
    register(internvl.InternVLFamily())
    register(qwen2_vl.Qwen2VLFamily())
    register(qwen2_vl.Qwen25VLFamily())
    register(phi4mm.Phi4MMFamily())


_register_builtin()
