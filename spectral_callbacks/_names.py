"""Module and parameter names as users write them."""

from __future__ import annotations

#: The attribute under which ``torch.compile`` keeps the module it wraps (``OptimizedModule``).
COMPILED_WRAPPER_ATTRIBUTE = "_orig_mod"


def uncompiled_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments that ``torch.compile``'d submodules add.

    ``model.net = torch.compile(model.net)`` renames ``net.0.weight`` to
    ``net._orig_mod.0.weight`` in ``named_parameters()`` and ``named_modules()``. Users name
    layers and parameters as in their code, so selections match either spelling.
    """
    return ".".join(part for part in name.split(".") if part != COMPILED_WRAPPER_ATTRIBUTE)


def is_name_or_prefix(entry: str, name: str) -> bool:
    """Whether ``entry`` is ``name`` itself or a module prefix of it (``"encoder"`` of
    ``"encoder.0.weight"``, not of ``"encoder2.weight"``)."""
    return name == entry or name.startswith(entry + ".")
