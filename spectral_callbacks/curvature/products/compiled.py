"""Path ``"compiled"``: the vmapped forward-over-reverse product under ``torch.compile``.

Compiling takes seconds to minutes, once per model, loss, parameter selection, block width
and batch shape; a bounded cache (:data:`COMPILED_CACHE_SIZE` entries) serves every later
operator, since a measurement builds a new one. The first product of each block width and
batch shape is checked against the eager one: compiled dropout draws other masks than eager
dropout, so a model with active dropout fails that check and stays eager (measure it in eval
mode to use compiled products). If compilation fails the product warns once and stays eager.

A failure the check cannot catch is a crash of the process: torch's ``inductor`` before
2.14, on the CPU, generates code that ends the process with a segmentation fault for a vmapped
forward-over-reverse product through an inner product of two vectors (``torch.dot``,
``torch.vdot``, ``torch.inner``, ``@`` of two 1-D tensors; ``spectral_norm`` computes one).
There the eager product is watched for such a call first, and one makes the product stay
eager (:data:`INNER_PRODUCT_CRASHES`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..isolation import compiled_code_allowed

__all__ = ["COMPILED_CACHE_SIZE", "clear_compiled_products", "compiled_block_product"]

logger = logging.getLogger("spectral_callbacks")

#: Compiled block products keyed by ``(id(model), loss_fn, parameter names, backend)``, the
#: most recently used last. An entry closes over its model and keeps it alive (which also
#: keeps its ``id`` unique), so the cache holds at most :data:`COMPILED_CACHE_SIZE` entries
#: and :func:`clear_compiled_products` empties it. A failed entry stays, marked, so later
#: operators go straight to the eager path.
_COMPILED: collections.OrderedDict[tuple, CompiledProduct] = collections.OrderedDict()
COMPILED_CACHE_SIZE = 8

#: Whether this torch's compiler crashes the process on a product through an inner product
#: of two vectors on the CPU (module docstring): seen in 2.5.1 and 2.13.0, not in 2.14.1.
INNER_PRODUCT_CRASHES = torch.__version__ < "2.14"


def clear_compiled_products() -> None:
    """Forget every compiled Hessian-vector product (and release the models they hold)."""
    _COMPILED.clear()


def compiled_entries(model: nn.Module) -> list[CompiledProduct]:
    """The cached compiled products of ``model``."""
    return [entry for key, entry in _COMPILED.items() if key[0] == id(model)]


def cache_size() -> int:
    """Entries in the cache of compiled products."""
    return len(_COMPILED)


def compiled_block_product(
    eager: Callable,
    model: nn.Module,
    loss_fn: Callable,
    names: list[str],
    backend: str | Callable,
) -> Callable:
    """The cached compiled version of ``eager`` (:func:`.forward_over_reverse.block_product`
    of ``model``, ``loss_fn`` and ``names``), or ``eager`` itself once compiling failed."""
    key = (id(model), loss_fn, tuple(names), backend)
    entry = _COMPILED.get(key)
    if entry is None:
        entry = _COMPILED[key] = CompiledProduct(eager, backend)
        while len(_COMPILED) > COMPILED_CACHE_SIZE:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return eager if entry.failed else entry


_fresh_code_ids = itertools.count()


def _with_own_code_object(function: Callable) -> Callable:
    """A copy of ``function`` with a code object of its own.

    ``torch.compile`` keeps its compiled variants, and its limit on recompilations, per code
    object: every closure of one ``def`` would share them, so products of unrelated models
    would evict each other's compilations. A copy per cache entry keeps them apart.
    """
    code = function.__code__.replace(co_name=f"{function.__name__}_{next(_fresh_code_ids)}")
    return types.FunctionType(
        code, function.__globals__, code.co_name, function.__defaults__, function.__closure__
    )


class CompiledProduct:
    """A block product under ``torch.compile``, checked against the eager product.

    The first call of each block width computes the eager product first (an error there is
    the eager path's to report: nothing is compiled), then compiles (logged, since it can
    take a minute) and compares. An exception from the compiler, or a compiled product that
    disagrees with the eager one beyond rounding, marks the entry failed with one warning;
    from then on the eager function answers. Later calls of a checked width run compiled.
    """

    def __init__(self, eager: Callable, backend: str | Callable) -> None:
        self.eager = eager
        self.backend = backend
        # Static shapes: one graph per block width and batch shape. (Symbolic batch sizes fail
        # to trace through convolution + BatchNorm under torch.func in torch 2.13.)
        self.compiled = torch.compile(_with_own_code_object(eager), backend=backend, dynamic=False)
        self.failed = False
        self._checked: set[tuple] = set()

    def __call__(self, primals: tuple, tangents: tuple, batch: Any) -> tuple[torch.Tensor, ...]:
        if self.failed:
            return self.eager(primals, tangents, batch)
        signature = _shape_signature(tangents, batch)
        if signature in self._checked:
            with compiled_code_allowed():
                return self.compiled(primals, tangents, batch)
        inner_product = None
        if (
            INNER_PRODUCT_CRASHES
            and self.backend == "inductor"
            and tangents[0].device.type == "cpu"
        ):
            with _InnerProductWatch() as watch:
                expected = self.eager(primals, tangents, batch)
            inner_product = watch.seen
        else:
            expected = self.eager(primals, tangents, batch)
        if inner_product is not None:
            self.failed = True
            warnings.warn(
                f"the loss computes an inner product of two vectors ({inner_product}), whose "
                f"compiled Hessian-vector product crashes the process in torch "
                f"{torch.__version__} on the CPU: using the eager forward-over-reverse path",
                RuntimeWarning,
                stacklevel=3,
            )
            return expected
        logger.info(
            "compiling the Hessian-vector product for blocks of %d (torch.compile, backend "
            "%r): once per model, block width and batch shape",
            tangents[0].shape[0],
            self.backend,
        )
        graphs_before = _graphs_compiled()
        try:
            with compiled_code_allowed():
                products = self.compiled(primals, tangents, batch)
            problem = _disagreement(products, expected)
            if (
                problem is None
                and graphs_before is not None
                and _graphs_compiled() == graphs_before
            ):
                problem = (
                    "it compiled no graph: a graph break inside the product (in the loss or "
                    "the model) made torch.compile run it eagerly"
                )
        except Exception as error:  # any compiler failure means: run eagerly
            problem = f"{type(error).__name__}: {str(error)[:200]}"
        if problem is not None:
            self.failed = True
            warnings.warn(
                f"torch.compile of the Hessian-vector product failed ({problem}); using the "
                "eager forward-over-reverse path",
                RuntimeWarning,
                stacklevel=3,
            )
        self._checked.add(signature)
        return expected


class _InnerProductWatch(TorchFunctionMode):
    """Notes the first inner product of two vectors computed under it (``seen``: its name)."""

    _INNER = frozenset(
        [
            torch.dot,
            torch.vdot,
            torch.inner,
            torch.matmul,
            torch.Tensor.dot,
            torch.Tensor.vdot,
            torch.Tensor.inner,
            torch.Tensor.matmul,
            torch.Tensor.__matmul__,
            torch.Tensor.__rmatmul__,
        ]
    )

    def __init__(self) -> None:
        super().__init__()
        self.seen: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (
            self.seen is None
            and func in self._INNER
            and len(args) >= 2
            and all(isinstance(a, torch.Tensor) and a.dim() == 1 for a in args[:2])
        ):
            self.seen = getattr(func, "__name__", repr(func))
        return func(*args, **(kwargs or {}))


def _graphs_compiled() -> int | None:
    """Graphs dynamo has compiled in this process (``None`` where torch does not count
    them). None more after a compiled call means that dynamo ran the whole product eagerly:
    a graph break it cannot split inside the torch.func transforms, such as a loss under
    ``torch.compiler.disable``, or a training step whose ``functional_call`` context
    breaks the graph (torch 2.9)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without dynamo's counters
        return None
    return int(counters["stats"]["unique_graphs"])


def _shape_signature(tangents: tuple, batch: Any) -> tuple:
    """Block width plus the shapes and dtypes of the batch's tensors (what a recompile sees)."""
    leaves = torch.utils._pytree.tree_leaves(batch)
    shapes = tuple(
        (tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else type(leaf)
        for leaf in leaves
    )
    return (tangents[0].shape[0], shapes)


def _disagreement(products: tuple, expected: tuple) -> str | None:
    """``None`` if the compiled products equal the eager ones up to rounding, else why not.

    Rounding differs (fused kernels reorder sums), so the bound is relative to the block's
    norm: ``‖compiled - eager‖ <= sqrt(eps) ‖eager‖`` in the parameters' dtype.
    """
    pairs = zip(products, expected, strict=True)
    difference = sum(float((a - b).double().pow(2).sum()) for a, b in pairs)
    scale = sum(float(b.double().pow(2).sum()) for b in expected)
    eps = torch.finfo(expected[0].dtype).eps
    if not math.isfinite(difference) or difference > eps * scale:
        return f"compiled products differ from eager ones by {math.sqrt(difference):.3g}"
    return None
