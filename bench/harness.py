"""Timing, synchronisation and naming shared by the benchmarks (no workload knowledge)."""

from __future__ import annotations

import datetime as dt
import math
import platform
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as L
import torch


def device_label(device: torch.device) -> str:
    """A results file's device name: the GPU's name, or ``cpu-<arch>-<threads>threads``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def run_meta(device: torch.device) -> dict:
    """What a day file records of its runs: date, device label, torch version, threads."""
    return {
        "date": dt.date.today().isoformat(),
        "device": device_label(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def bare_trainer(device: torch.device, callbacks: list, **kwargs) -> L.Trainer:
    """A Trainer on one ``device`` that writes nothing (no logger, checkpoints, progress bar
    or model summary), so that a timed ``fit`` is training and callbacks alone."""
    return L.Trainer(
        accelerator=device.type,
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stopwatch(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds of one synchronised call of ``fn``, and its result."""
    sync(device)
    began = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - began, result


def timed(
    fn: Callable[[], object], device: torch.device, repeats: int, warm_up: bool = True
) -> tuple[float, object]:
    """Median seconds of ``repeats`` synchronised calls after one warm-up call, and the last
    result."""
    if warm_up:
        fn()
    result, times = None, []
    for _ in range(repeats):
        seconds, result = stopwatch(fn, device)
        times.append(seconds)
    return statistics.median(times), result


def max_relative_error(values, reference) -> float:
    """``max_i |v_i - r_i| / |r_i|`` over the first ``len(values)`` references; infinite when
    values are missing or not finite."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    reference = torch.as_tensor(reference, dtype=torch.float64).flatten()[: values.numel()]
    if values.numel() < reference.numel() or not torch.isfinite(values).all():
        return math.inf
    return float(((values - reference).abs() / reference.abs()).max())


def gradient_ms(model, batch, loss_fn, device: torch.device, repeats: int) -> float:
    """Milliseconds of one gradient of the batch loss (the unit of "gradient-times")."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_s, _ = timed(lambda: torch.autograd.grad(loss_fn(model, batch), params), device, repeats)
    return grad_s * 1e3
