"""What one measurement of each monitor costs on the demo's models (CPU, about 2 minutes).

    python bench/monitor_cost.py            # 1,000 steps, medians of 3 interleaved runs
    python bench/monitor_cost.py --smoke    # 40 steps, 1 run (the test suite runs this)

Model A is the demo's tanh MLP trained by full-batch gradient descent. Model B is the
demo's mixture classifier (Adam, batches of 128). Each run trains the same steps with no
callback or with one monitor; the overhead is the extra wall time of the run over the run
without callbacks. Products and gradients per measurement come from the monitors' own
counts. Writes ``bench/results/monitor-cost-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import platform
import statistics
import sys
import time
import warnings

import lightning.pytorch as L
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spectral_callbacks import (  # noqa: E402
    HessianSpectrumMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
)
from spectral_callbacks.demo import (  # noqa: E402
    FullBatch,
    MixtureClassifier,
    TanhRegressor,
    gaussian_mixture,
    teacher_regression,
)


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


def run(model_name: str, make_callback, steps: int) -> tuple[float, object]:
    callback = make_callback()
    torch.manual_seed(0)
    if model_name == "A":
        x, y = teacher_regression()
        model = TanhRegressor(lr=0.3)
        loader = torch.utils.data.DataLoader(FullBatch(x, y, steps), batch_size=None)
    else:
        x, y = gaussian_mixture(4096, seed=0)
        model = MixtureClassifier()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True
        )
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        callbacks=[] if callback is None else [callback],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return time.perf_counter() - start, callback


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    steps, repeats = (40, 1) if args.smoke else (1000, 3)
    rows = []
    for model_name in ("A", "B"):
        choices = monitors(steps)
        if model_name == "A":
            choices.pop(next(k for k in choices if k.startswith("Representation")))
        else:
            choices = {k: v for k, v in choices.items() if not k.startswith("Hessian")}
        times: dict[str, list[float]] = {name: [] for name in choices}
        last: dict[str, object] = {}
        for _ in range(repeats):  # interleaved: machine drift hits every setting alike
            for name, make in choices.items():
                seconds, callback = run(model_name, make, steps)
                times[name].append(seconds)
                last[name] = callback
        base = statistics.median(times["none"])
        for name in choices:
            if name == "none":
                continue
            callback = last[name]
            history = callback.history
            products = [
                v.get("spectral/hessian/num_hvps", v.get("spectral/hessian/spectrum_num_hvps"))
                for _, v in history
            ]
            products = [p for p in products if p is not None]
            rows.append(
                {
                    "model": model_name,
                    "monitor": name,
                    "measurements": len(history),
                    "median_products": statistics.median(products) if products else 0.0,
                    "first_products": products[0] if products else 0.0,
                    "overhead": statistics.median(times[name]) / base - 1.0,
                    "seconds": statistics.median(times[name]),
                    "base_seconds": base,
                }
            )
    device = f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    lines = [
        f"# Cost of one measurement on the demo models ({dt.date.today()}, {device}, "
        f"torch {torch.__version__}, {steps} steps, median of {repeats} interleaved runs)",
        "",
        "A: the demo's tanh MLP (1,377 parameters), full-batch GD. B: the demo's mixture "
        "classifier (29,642 parameters; Adam, batches of 128).",
        "",
        "| model | monitor | measurements | products (first; median) | run time | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | `{row['monitor']}` | {row['measurements']} | "
            f"{row['first_products']:.0f}; {row['median_products']:.0f} | "
            f"{row['seconds']:.2f} s (vs {row['base_seconds']:.2f} s) | "
            f"{100 * row['overhead']:+.0f} % |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        (pathlib.Path(args.out) / f"monitor-cost-{dt.date.today()}.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
