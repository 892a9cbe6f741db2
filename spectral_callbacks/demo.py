"""The demo: both halves of the mission in one short run on generated data.

1. **Edge of stability.** Full-batch gradient descent on a tanh MLP with MSE loss:
   ``SharpnessMonitor`` shows λ_max climbing to ``2/lr`` and hovering there (Cohen et al.
   2021), ``HessianSpectrumMonitor`` the top-5 eigenvalues, trace and density.
2. **Representations and weights.** A small classifier trained with Adam on a
   Gaussian-mixture task: ``RepresentationMonitor`` logs RankMe and α-ReQ of three encoder
   layers as they change, ``WeightSpectrumMonitor`` the heavy-tailed α, stable rank and the
   turn of each layer's top singular subspace.

The models and data are those of :mod:`spectral_callbacks.workloads`. Writes TensorBoard
logs under ``out/{run}/version_N``, a summary figure ``out/summary_version_N.png`` (``N``
numbers the demo's runs into one ``out``), and prints what it measured and the
``tensorboard`` command to run.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import time
from dataclasses import dataclass

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from .callbacks import (
    HessianSpectrumMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
    WeightSpectrumMonitor,
)
from .workloads import (
    FullBatch,
    MixtureClassifier,
    TanhRegressor,
    gaussian_mixture,
    teacher_regression,
)

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    """Sizes of the demo; ``fast()`` is a seconds-long smoke version."""

    eos_steps: int = 2000
    eos_every: int = 20
    spectrum_every: int = 250
    repr_epochs: int = 12
    repr_every: int = 24
    repr_samples: int = 4096

    @classmethod
    def fast(cls) -> DemoSettings:
        return cls(
            eos_steps=60,
            eos_every=20,
            spectrum_every=60,
            repr_epochs=1,
            repr_every=8,
            repr_samples=512,
        )


# -- the run ----------------------------------------------------------------------------------


RUNS = ("edge_of_stability", "representations")


def next_version(out: pathlib.Path) -> int:
    """The first ``N`` with no ``out/{run}/version_N`` for either run: each demo run logs to
    folders of its own, so runs into one ``--out`` never mix on the dashboard."""
    version = 0
    while any((out / run / f"version_{version}").exists() for run in RUNS):
        version += 1
    return version


def _trainer(
    out: pathlib.Path, name: str, version: int, callbacks, progress: bool, **kwargs
) -> L.Trainer:
    return L.Trainer(
        accelerator="auto",
        devices=1,
        logger=TensorBoardLogger(str(out), name=name, version=version, default_hp_metric=False),
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        **kwargs,
    )


def run_demo(
    out: str | pathlib.Path = "runs/demo", fast: bool = False, progress: bool = True
) -> dict:
    """Run both parts; return what was measured (also printed)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.fast() if fast else DemoSettings()
    version = next_version(out)
    started = time.perf_counter()

    lr = 0.3
    x, y = teacher_regression()
    torch.manual_seed(1)
    sharpness = SharpnessMonitor(every_n_steps=settings.eos_every)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=settings.spectrum_every, k=5, trace_hvps=60, density_steps=48
    )
    trainer = _trainer(out, RUNS[0], version, [sharpness, spectrum], progress, max_epochs=1)
    loader = torch.utils.data.DataLoader(FullBatch(x, y, settings.eos_steps), batch_size=None)
    trainer.fit(TanhRegressor(lr=lr), loader)

    torch.manual_seed(2)
    layers = ["encoder.1", "encoder.3", "encoder"]
    representation = RepresentationMonitor(
        layers=layers,
        every_n_steps=settings.repr_every,
        num_samples=min(2048, settings.repr_samples),
    )
    train_x, train_y = gaussian_mixture(settings.repr_samples, seed=1)
    val_x, val_y = gaussian_mixture(2048, seed=10)  # the same mixture, other samples
    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_x, train_y), batch_size=128, shuffle=True
    )
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(val_x, val_y), batch_size=512
    )
    weights = WeightSpectrumMonitor(every_n_steps=settings.repr_every, drift_rank=5)
    trainer = _trainer(
        out,
        RUNS[1],
        version,
        [representation, weights],
        progress,
        max_epochs=settings.repr_epochs,
    )
    trainer.fit(MixtureClassifier(), train_loader, val_loader)

    summary = {
        "seconds": time.perf_counter() - started,
        "lr": lr,
        "sharpness": [(s, v["spectral/hessian/lambda_max"]) for s, v in sharpness.history],
        "spectrum": spectrum.history,
        "representations": representation.history,
        "layers": layers,
        "weights": weights.history,
        "weight_layers": weights.layer_names,
        "figure": str(out / f"summary_version_{version}.png"),
        "logdir": str(out),
        "version": version,
    }
    save_summary_figure(summary, pathlib.Path(summary["figure"]))
    print(format_summary(summary))
    return summary


#: What the representation layers of the demo's classifier (``MixtureClassifier``) are.
LAYER_NAMES = {
    "encoder.1": "1st hidden layer (ReLU, 128)",
    "encoder.3": "2nd hidden layer (ReLU, 128)",
    "encoder": "encoder output (64)",
}


def tensorboard_command() -> str:
    """``tensorboard`` where it is on the PATH, else the one beside this Python (a virtual
    environment that is not activated), else ``python -m tensorboard.main``."""
    if shutil.which("tensorboard"):
        return "tensorboard"
    beside = pathlib.Path(sys.executable).parent / "tensorboard"
    if beside.exists():
        return str(beside)
    return f"{sys.executable} -m tensorboard.main"


def save_summary_figure(summary: dict, path: pathlib.Path) -> None:
    """λ_max against 2/lr over steps, and RankMe per layer over steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), dpi=100)
    left, right = figure.subplots(1, 2)
    steps = [s for s, _ in summary["sharpness"]]
    left.plot(steps, [v for _, v in summary["sharpness"]], label="λ_max, top Hessian eigenvalue")
    left.axhline(
        2 / summary["lr"], color="tab:red", linestyle="--", label=f"2/lr = {2 / summary['lr']:.2f}"
    )
    left.set_xlabel("step")
    left.set_ylabel("λ_max")
    left.set_title(
        f"1. tanh MLP, full-batch gradient descent (lr {summary['lr']:g}):\n"
        "λ_max rises to the edge of stability 2/lr",
        fontsize=10,
    )
    left.legend(fontsize=8)
    for layer in summary["layers"]:
        history = summary["representations"]
        right.plot(
            [s for s, _ in history],
            [v[f"spectral/repr/{layer}/rankme"] for _, v in history],
            label=f"{layer}: {LAYER_NAMES.get(layer, layer)}",
        )
    right.set_xlabel("step")
    right.set_ylabel("RankMe (effective dimension)")
    right.set_title(
        "2. MLP classifier, Adam on mini-batches:\nrank of each encoder layer's outputs",
        fontsize=10,
    )
    right.legend(fontsize=8)
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))  # Agg canvas: the user's backend is untouched


def format_summary(summary: dict) -> str:
    """A plain-text table of what the demo measured."""
    lr = summary["lr"]
    lines = [
        "",
        "spectral-callbacks demo",
        "=" * 23,
        "",
        f"1. Edge of stability (full-batch GD, lr = {lr}, 2/lr = {2 / lr:.3f})",
        "",
    ]
    lines.append(f"   {'step':>6}  {'λ_max':>8}  {'λ_max·lr/2':>10}")
    history = summary["sharpness"]
    shown = sorted({0, *[s for s, _ in history][:: max(1, len(history) // 8)], history[-1][0]})
    for step, value in history:
        if step in shown:
            lines.append(f"   {step:>6}  {value:>8.3f}  {value * lr / 2:>10.3f}")
    if summary["spectrum"]:
        step, last = summary["spectrum"][-1]
        eigs = ", ".join(f"{last[f'spectral/hessian/eig_{i}']:.3f}" for i in range(1, 6))
        lines += [
            "",
            f"   top-5 eigenvalues at step {step}: {eigs}",
            f"   trace {last['spectral/hessian/trace']:.2f} "
            f"± {last['spectral/hessian/trace_stderr']:.2f}, "
            f"spectral mass below -1% of the radius {last['spectral/hessian/negative_mass']:.2f}, "
            f"within ±1% of zero {last['spectral/hessian/near_zero_mass']:.2f}, "
            f"λ_min {last['spectral/hessian/lambda_min']:.4f}",
        ]
        overlaps = [
            f"{values['spectral/hessian/gradient_overlap']:.2f} (step {at})"
            for at, values in summary["spectrum"]
        ]
        if len(overlaps) > 4:  # the first two and the last: where it goes, and where it ends
            overlaps = [*overlaps[:2], "…", overlaps[-1]]
        lines.append("   gradient in the top-5 eigenspace: " + " → ".join(overlaps))
        counts = [
            f"{values['spectral/hessian/outliers']:.0f} (step {at})"
            for at, values in summary["spectrum"]
        ]
        if len(counts) > 4:
            counts = [*counts[:2], "…", counts[-1]]
        lines.append("   outliers above the bulk (of the top 5): " + " → ".join(counts))
    history = summary["representations"]
    lines += ["", "2. Representations (Adam on a 10-class Gaussian mixture)", ""]
    lines.append(f"   {'layer':<10}  {'RankMe':>15}  {'α-ReQ':>15}  {'effective rank':>15}")
    (first_step, first), (last_step, last) = history[0], history[-1]
    for layer in summary["layers"]:
        cells = []
        for metric in ("rankme", "alpha_req", "effective_rank"):
            key = f"spectral/repr/{layer}/{metric}"
            cells.append(f"{first[key]:6.2f} → {last[key]:6.2f}")
        lines.append(f"   {layer:<10}  " + "  ".join(f"{c:>15}" for c in cells))
    lines.append(f"   (steps {first_step} → {last_step})")
    lines += [
        f"   {layer}: {LAYER_NAMES[layer]}" for layer in summary["layers"] if layer in LAYER_NAMES
    ]
    history = summary["weights"]
    (first_step, first), (last_step, last) = history[0], history[-1]
    lines += ["", f"   weight spectra (steps {first_step} → {last_step})", ""]
    lines.append(f"   {'layer':<10}  {'α':>15}  {'stable rank':>15}  {'top-5 turn (rad)':>16}")
    for layer in summary["weight_layers"]:
        prefix = f"spectral/weights/{layer}/"
        cells = [
            f"{first[prefix + m]:6.2f} → {last[prefix + m]:6.2f}" for m in ("alpha", "stable_rank")
        ]
        cells.append(f"{last[prefix + 'left_subspace_angle']:.2f}")
        lines.append(f"   {layer:<10}  {cells[0]:>15}  {cells[1]:>15}  {cells[2]:>16}")
    lines += [
        "",
        f"summary figure: {summary['figure']}",
        f"logs of this run: {summary['logdir']}/{{{','.join(RUNS)}}}/version_{summary['version']}",
        f"took {summary['seconds']:.0f} s. Open the dashboard with:",
        "",
        f"   {tensorboard_command()} --logdir {summary['logdir']}",
        "",
    ]
    return "\n".join(lines)
