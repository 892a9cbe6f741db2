"""Where the solvers make the host wait for the device, found without a GPU.

On CUDA a host synchronisation stalls the launch queue: ``.item()``, ``float(t)``,
``bool(t)`` and ``if t:`` (``aten._local_scalar_dense``), data-dependent shapes (``nonzero``,
masked indexing), decompositions that check their result on the host (``linalg.svd``,
``linalg.eigh``) and copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()``). These are
visible on the CPU too: a dispatch mode sees every aten op, and the host copies are
Tensor methods. DESIGN.md promises none inside the Krylov loop except at convergence
checks; these tests hold the code to it.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import DenseOperator, lanczos
from spectral_callbacks.linalg._krylov import BlockLanczos, IndependentLanczos, ThreeTermLanczos

from ..models import BasisSpy, cross_entropy_loss, make_case

#: aten ops that make the host wait for a CUDA device.
SYNCING_OPS = {
    "_local_scalar_dense",  # .item(), float(t), bool(t), if t
    "is_nonzero",
    "equal",
    "nonzero",  # data-dependent shapes: t[mask], torch.where(mask)
    "masked_select",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "bincount",
    "repeat_interleave",
    "_linalg_svd",  # checks its result on the host
    "_linalg_eigh",
    "linalg_eig",
    "_linalg_check_errors",
}

#: Tensor methods that copy to the host.
HOST_COPIES = ("cpu", "tolist", "numpy")


#: aten indexing ops that sync when an index is a boolean mask (it becomes ``nonzero``).
MASKABLE_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSyncs(TorchDispatchMode):
    """Counts, by name, the operations that would synchronise a CUDA device with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.counts[name] += 1
        elif name in MASKABLE_OPS and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if len(args) > 1 else ())
        ):
            self.counts[f"{name} with a mask"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_host_syncs():
    """Record aten syncing ops and Tensor host copies inside the ``with`` block."""
    recorder = HostSyncs()
    originals = {method: getattr(torch.Tensor, method) for method in HOST_COPIES}

    def counting(name, original):
        def counted(self, *args, **kwargs):
            recorder.counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for method, original in originals.items():
        setattr(torch.Tensor, method, counting(method, original))
    try:
        with recorder:
            yield recorder.counts
    finally:
        for method, original in originals.items():
            setattr(torch.Tensor, method, original)


def test_the_recorder_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with recording_host_syncs() as counts:
        float(x.sum())
        _ = x[x > 2]
        torch.linalg.eigh(torch.eye(3))
        x.tolist()
    assert counts == {
        "_local_scalar_dense": 1,
        "index with a mask": 1,
        "_linalg_eigh": 1,
        "tolist": 1,
    }


@pytest.mark.parametrize("recurrence_class", [IndependentLanczos, ThreeTermLanczos])
@pytest.mark.parametrize("degenerate", [False, True])
@pytest.mark.parametrize("width", [1, 4])
def test_a_lanczos_step_never_syncs(width, degenerate, recurrence_class):
    # The degenerate matrix (eigenvalue 2, multiplicity 10 of 12) makes the Krylov spaces
    # invariant after two steps, so the breakdown-and-restart branch runs too.
    spectrum = [2.0] * 10 + [1.0, -1.0] if degenerate else torch.linspace(-1, 3, 12).tolist()
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    operator = DenseOperator((q * torch.tensor(spectrum, dtype=torch.float64)) @ q.T)
    start = torch.randn(width, 12, generator=g, dtype=torch.float64)
    recurrence = recurrence_class(operator, start, max_steps=8, generator=g)
    with recording_host_syncs() as counts:
        for _ in range(8):
            recurrence.step()
    assert counts == {}
    if degenerate:  # the restart really ran: an exact zero coupling
        _, beta = recurrence.tridiagonal()
        assert bool((beta[:, :-1] == 0).any())


@pytest.mark.parametrize("case", ["mlp", "cnn", "attention"])
@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse"])
def test_hessian_vector_products_never_sync(case, hvp):
    model, batches = make_case(case)
    with HessianOperator(model, cross_entropy_loss, batches, hvp=hvp) as operator:
        vectors = torch.randn(3, operator.size, dtype=torch.float64)
        operator.matmat(vectors)  # the first product builds the graphs
        with recording_host_syncs() as counts:
            operator.matmat(vectors)
            operator.matvec(vectors[0])
    assert counts == {}


@pytest.mark.parametrize("max_basis", [None, 8])
def test_a_lanczos_solve_copies_to_the_host_only_at_its_checks(monkeypatch, max_basis):
    spectrum = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(-2, 8, 198)])
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    operator = DenseOperator((q * spectrum.double()) @ q.T)
    checks = []
    original = IndependentLanczos.tridiagonal

    def counted(self):
        checks.append(self.steps)
        return original(self)

    monkeypatch.setattr(IndependentLanczos, "tridiagonal", counted)
    spy = BasisSpy(monkeypatch)
    with recording_host_syncs() as counts:
        result = lanczos(operator, k=1, tol=1e-6, max_basis=max_basis)
    assert result.all_converged and result.num_iterations > 2 * len(checks)
    # Restarts happen at checks, from what the check copied: no copies of their own.
    assert bool(spy.restarts) == (max_basis is not None)
    # One copy of (alpha, beta) per check; the scalars read afterwards are host tensors.
    assert counts["cpu"] == len(checks)


def test_a_block_lanczos_step_syncs_only_in_its_small_svds():
    # The known exception (README, Limitations): the rank-revealing SVD of the p x p factor
    # checks its result on the host, twice per block step.
    spectrum = torch.linspace(-1, 3, 40)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    operator = DenseOperator((q * spectrum.double()) @ q.T)
    recurrence = BlockLanczos(
        operator, torch.randn(4, 40, generator=g, dtype=torch.float64), 5, generator=g
    )
    with recording_host_syncs() as counts:
        for _ in range(3):
            recurrence.step()
    assert counts == {"_linalg_svd": 6}
