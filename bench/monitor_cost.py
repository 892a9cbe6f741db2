"""What one measurement of each monitor costs in a training run (CPU).

    python -m bench.monitor_cost                      # the demo's models A and B, ~2 minutes
    python -m bench.monitor_cost --workloads C1       # a CPU workload of bench/run.py
    python -m bench.monitor_cost --smoke              # 40 steps, 1 run (the test suite)

Model A is the demo's tanh MLP trained by full-batch gradient descent. Model B is the
demo's mixture classifier (Adam, batches of 128). C1 and G1 are the CPU workloads of
``bench/run.py`` (from their initialisation, SGD with learning rate 0.05 on their one batch)
with the monitors at their defaults: ``SharpnessMonitor(every_n_steps=100)`` and
``HessianSpectrumMonitor(every_n_steps=500)``. Each run trains the same steps with no callback
or with one monitor, interleaved over the repeats. Two overheads are reported: the extra wall
time of the run over the run without callbacks (medians), and the time spent in the
monitor's measurements over the rest of its own run (immune to drift between runs).
Products per measurement come from the monitors' own counts. Writes
``bench/results/monitor-cost-<device>-<date>.{json,md}``; runs of other workloads or
monitors on one day (one workload and monitor per command fits in ten minutes) add to it.
"""

from __future__ import annotations

import re
import statistics
import warnings

import torch

from bench.harness import bare_trainer, stopwatch
from bench.report import document, table
from bench.study import finish, study_parser
from spectral_callbacks import (
    HessianSpectrumMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
    WeightSpectrumMonitor,
)
from spectral_callbacks.workloads import (
    Classifier,
    FullBatch,
    MixtureClassifier,
    TanhRegressor,
    gaussian_mixture,
    initial_workload,
    teacher_regression,
)

CPU = torch.device("cpu")


def monitors(steps: int) -> dict:
    every = max(1, steps // 10)
    return {
        "none": lambda: None,
        f"SharpnessMonitor(every_n_steps={every})": lambda: SharpnessMonitor(every_n_steps=every),
        f"HessianSpectrumMonitor(every_n_steps={every * 5}, k=5)": lambda: HessianSpectrumMonitor(
            every_n_steps=every * 5, k=5
        ),
        f"RepresentationMonitor(every_n_steps={every * 5})": lambda: RepresentationMonitor(
            layers=["encoder.1", "encoder"], every_n_steps=every * 5, num_samples=1024
        ),
    }


#: The default monitors the targets of docs/benchmarks.md are stated for (C1, G1).
def default_monitors() -> dict:
    return {
        "none": lambda: None,
        "SharpnessMonitor(every_n_steps=100)": lambda: SharpnessMonitor(every_n_steps=100),
        # A residual one decade looser: λ_max within about 1e-3 at fewer products
        # (bench/warm_mixing.py).
        "SharpnessMonitor(every_n_steps=100, tol=0.01)": lambda: SharpnessMonitor(
            every_n_steps=100, tol=0.01
        ),
        "HessianSpectrumMonitor(every_n_steps=500)": lambda: HessianSpectrumMonitor(
            every_n_steps=500
        ),
    }


def timed_measurements(callback) -> list[float]:
    """Wrap ``callback.measure`` (this instance only) to record the seconds of each call."""
    seconds: list[float] = []
    measure = callback.measure

    def timed(*args, **kwargs):
        elapsed, result = stopwatch(lambda: measure(*args, **kwargs), CPU)
        seconds.append(elapsed)
        return result

    callback.measure = timed
    return seconds


def run(model_name: str, make_callback, steps: int) -> tuple[float, list, list[float]]:
    """Train ``model_name`` for ``steps`` with the callbacks ``make_callback()`` returns (one,
    a list, or ``None``): (wall seconds, the callbacks, seconds of each measurement)."""
    made = make_callback()
    callbacks = [] if made is None else made if isinstance(made, list) else [made]
    for callback in callbacks:
        callback._bench_seconds = timed_measurements(callback)
    torch.manual_seed(0)
    if model_name in WORKLOAD_MODELS:
        network, batch = initial_workload(WORKLOAD_MODELS[model_name], torch.device("cpu"))
        # SGD on the workload's one batch; AdamW for the AdamW workload.
        optimizer, lr = ("adamw", 1e-3) if model_name == "adamw" else ("sgd", 0.05)
        model = Classifier(network, lr=lr, optimizer=optimizer)
        loader = torch.utils.data.DataLoader(FullBatch(*batch, steps), batch_size=None)
    elif model_name == "A":
        x, y = teacher_regression()
        model = TanhRegressor(lr=0.3)
        loader = torch.utils.data.DataLoader(FullBatch(x, y, steps), batch_size=None)
    else:
        x, y = gaussian_mixture(4096)
        model = MixtureClassifier()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True
        )
    trainer = bare_trainer(CPU, callbacks, max_steps=steps, max_epochs=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        elapsed, _ = stopwatch(lambda: trainer.fit(model, loader), CPU)
    measured = [s for callback in callbacks for s in callback._bench_seconds]
    return elapsed, callbacks, measured


def choices_for(model_name: str, steps: int, budget: bool = False) -> dict:
    if budget:
        return budget_monitors(model_name)
    if model_name in WORKLOAD_MODELS:
        return default_monitors()
    choices = monitors(steps)
    if model_name == "A":
        choices.pop(next(k for k in choices if k.startswith("Representation")))
    else:
        choices = {k: v for k, v in choices.items() if not k.startswith("Hessian")}
    return choices


def measure_model(
    model_name: str, steps: int, repeats: int, pattern: str | None, budget: bool = False
) -> list[dict]:
    choices = choices_for(model_name, steps, budget)
    if pattern is not None:
        choices = {k: v for k, v in choices.items() if k == "none" or re.search(pattern, k)}
    run(model_name, lambda: None, min(steps, 20))  # warm-up: imports, kernels, allocator
    times: dict[str, list[float]] = {name: [] for name in choices}
    inside: dict[str, list[float]] = {name: [] for name in choices}
    last: dict[str, object] = {}
    for _ in range(repeats):  # interleaved: machine drift hits every setting alike
        for name, make in choices.items():
            seconds, callback, measured = run(model_name, make, steps)
            times[name].append(seconds)
            inside[name].append(sum(measured) / (seconds - sum(measured)))
            last[name] = callback
    base = statistics.median(times["none"])
    rows = []
    for name in choices:
        if name == "none":
            continue
        callbacks = last[name]
        history = callbacks[0].history
        products = _products(callbacks[0])
        rows.append(
            {
                "model": model_name,
                "monitor": name,
                "measurements": len(history),
                "median_products": statistics.median(products) if products else 0.0,
                "first_products": products[0] if products else 0.0,
                "overhead": statistics.median(times[name]) / base - 1.0,
                "measurement_share": statistics.median(inside[name]),
                "seconds": statistics.median(times[name]),
                "base_seconds": base,
                "monitors": [_monitor_summary(callback) for callback in callbacks],
            }
        )
    return rows


def _products(callback) -> list[float]:
    """Hessian-vector products of each of a monitor's measurements (none for the monitors
    that make no products)."""
    counts = [
        v.get("spectral/hessian/num_hvps", v.get("spectral/hessian/spectrum_num_hvps"))
        for _, v in callback.history
    ]
    return [count for count in counts if count is not None]


def _monitor_summary(callback) -> dict:
    """What one monitor of a run did: its measurements, when, at what cost, and the share of
    training time it reports having spent."""
    steps = [step for step, _ in callback.history]
    seconds = callback._bench_seconds
    products = _products(callback)
    return {
        "monitor": type(callback).__name__,
        "measurements": len(steps),
        "steps": steps,
        "first_step": steps[0] if steps else None,
        "first_seconds": seconds[0] if seconds else None,
        "median_seconds": statistics.median(seconds) if seconds else None,
        "first_products": products[0] if products else None,
        "median_products": statistics.median(products) if products else None,
        "reported_share": callback.overhead,
    }


MODELS = {
    "adamw": "bench/run.py's MLP 784-128-128-10 (118,282 parameters; AdamW, lr 1e-3, on one "
    "batch of 256)",
    "A": "the demo's tanh MLP (1,377 parameters), full-batch GD",
    "B": "the demo's mixture classifier (29,642 parameters; Adam, batches of 128)",
    "C1": "bench/run.py's BatchNorm CNN (539,178 parameters; SGD on one batch of 128)",
    "G1": "bench/run.py's small GPT (4,242,944 parameters; SGD on one batch of 8 × 128)",
    "tiny": "bench/run.py's smoke MLP (SGD on one batch of 128)",
}
#: Models that are workloads of ``spectral_callbacks.workloads`` (the others are the demo's):
#: name here -> name there.
WORKLOAD_MODELS = {"C1": "C1", "G1": "G1", "tiny": "tiny", "adamw": "mlp-128"}
#: A layer for RepresentationMonitor in each workload (inside Classifier's ``model``).
REPRESENTATION_LAYERS = {
    "C1": "model.16",  # the pooled 256 features before the head
    "G1": "model.blocks.1",
    "tiny": "model.1",
    "adamw": "model.3",
}
#: Samples in a workload's one batch (the representation probe: the batch itself).
BATCH_SAMPLES = {"C1": 128, "G1": 8, "tiny": 128, "adamw": 256}


def budget_monitors(model_name: str) -> dict:
    """The monitors at their defaults (the overhead budget, 5 % each): SharpnessMonitor
    alone, and all four together (the representation probe is the workload's one batch)."""
    layer = REPRESENTATION_LAYERS[model_name]
    samples = BATCH_SAMPLES[model_name]

    def four():
        return [
            SharpnessMonitor(),
            HessianSpectrumMonitor(),
            RepresentationMonitor(layers=[layer], num_samples=samples),
            WeightSpectrumMonitor(),
        ]

    return {"none": lambda: None, "SharpnessMonitor()": SharpnessMonitor, "all four": four}


DETAIL_HEADER = ["model", "run", "steps", "monitor", "measurements", "first at step"]
DETAIL_HEADER += ["first s", "median s", "products (first; median)", "reported share"]


def _counts_cells(row: dict) -> list:
    """Measurements and products of a run with one monitor; those of each monitor of a run
    with several are in the second table."""
    if len(row.get("monitors", [])) > 1:
        return ["each below", "each below"]
    return [row["measurements"], f"{row['first_products']:.0f}; {row['median_products']:.0f}"]


def markdown(rows: list[dict], meta: dict) -> str:
    models = list(dict.fromkeys(row["model"] for row in rows))
    description = "\n".join(f"{name}: {MODELS[name]}." for name in models) + (
        "\n\nEach row: steps trained, and interleaved runs (median) with no callback and with "
        "the monitor. Overhead: the run's wall time over the run without callbacks. In "
        "measurements: the seconds inside the monitor's measurements over the rest of the "
        "same run."
    )
    header = ["model", "monitor", "steps; runs", "measurements", "products (first; median)"]
    header += ["run time", "overhead", "in measurements"]
    cells = [
        [
            row["model"],
            f"`{row['monitor']}`",
            f"{row.get('steps', 1000)}; {row.get('repeats', 3)}",
            *_counts_cells(row),
            f"{row['seconds']:.2f} s (vs {row['base_seconds']:.2f} s)",
            f"{100 * row['overhead']:+.1f} %",
            f"{100 * row['measurement_share']:.1f} %",
        ]
        for row in rows
    ]
    text = document("Cost of the monitors in training", meta, description, header, cells)
    detail = [
        [
            row["model"],
            f"`{row['monitor']}`",
            row["steps"],
            entry["monitor"],
            entry["measurements"],
            entry["first_step"],
            f"{entry['first_seconds']:.2f}" if entry["first_seconds"] is not None else "",
            f"{entry['median_seconds']:.2f}" if entry["median_seconds"] is not None else "",
            (
                f"{entry['first_products']:.0f}; {entry['median_products']:.0f}"
                if entry.get("first_products") is not None
                else ""
            ),
            f"{100 * entry['reported_share']:.1f} %",
        ]
        for row in rows
        for entry in row.get("monitors", [])
    ]
    if not detail:
        return text
    lines = [
        "",
        "Each monitor of the runs with the budget: its measurements, the step and seconds of "
        "the first, the median seconds of one, its products (first; median; empty where not "
        "recorded) and the share of training time it reports.",
        "",
        *table(DETAIL_HEADER, detail),
    ]
    return text + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = study_parser(__doc__, repeats=3)
    parser.add_argument("--workloads", nargs="+", choices=list(MODELS), default=["A", "B"])
    parser.add_argument("--monitors", default=None, help="regular expression: only these")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--budget",
        action="store_true",
        help="the monitors at their defaults (the overhead budget): Sharpness alone, all four",
    )
    args = parser.parse_args(argv)
    steps, repeats = (40, 1) if args.smoke else (args.steps, args.repeats)
    rows = [
        {**row, "steps": steps, "repeats": repeats, "budget": args.budget}
        for model_name in args.workloads
        for row in measure_model(model_name, steps, repeats, args.monitors, args.budget)
    ]

    def key(row: dict) -> tuple:
        return (row["model"], row["monitor"], row["steps"], row.get("budget", False))

    return finish("monitor-cost", rows, args, markdown, key=key)


if __name__ == "__main__":
    main()
