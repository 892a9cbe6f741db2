"""Our weight spectra against weightwatcher 0.7.7 on ResNet-18 (timm) and GPT-2 small (Hugging
Face), randomly initialised and after some training, and the cost of one measurement.

    pip install torch==2.14.1 weightwatcher==0.7.7 timm transformers   # its own venv
    python -m bench.weightwatcher_crosscheck [--steps 20] [--out bench/results]

Both tools see the same weights. Per layer: the largest relative difference of the sorted
eigenvalues (over eigenvalues ≥ 1e-6 λ_max; the smaller ones are SVD round-off for both
tools), and the differences of α, xmin, α̂, log norm, log spectral norm, stable rank and
log α-norm. Writes ``weightwatcher-crosscheck-<device>-<date>.json`` and ``.md`` (the run of
2026-12-02: ``weightwatcher-crosscheck-<date>``).
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F

from bench.harness import run_meta, stopwatch, timed
from bench.report import day_stem, table, write_day_file
from bench.study import study_parser
from spectral_callbacks.weights import weight_spectra

CPU = torch.device("cpu")

COMPARED = (
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "log_alpha_norm",
)


def resnet18() -> torch.nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())


#: The models compared, by their ``--models`` name.
MODELS = {"resnet18": resnet18, "gpt2": gpt2}


def train(name: str, model: torch.nn.Module, steps: int) -> None:
    """``steps`` SGD steps on one fixed random batch (lr 0.05 / 1e-3), as the peer benchmark
    does, so the spectra are not those of initialisation."""
    generator = torch.Generator().manual_seed(0)
    model.train()
    if name == "resnet18":
        x = torch.randn(32, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (32,), generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def loss() -> torch.Tensor:
            return F.cross_entropy(model(x), y)

    else:
        tokens = torch.randint(0, 50257, (2, 64), generator=generator)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def loss() -> torch.Tensor:
            return model(input_ids=tokens, labels=tokens).loss

    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()


def weightwatcher_layers(model: torch.nn.Module) -> dict[str, dict]:
    import weightwatcher as ww

    watcher = ww.WeightWatcher(model=model)
    seconds, details = stopwatch(lambda: watcher.analyze(randomize=False), CPU)
    layers = {}
    for _, row in details.iterrows():
        layers[row["longname"]] = {
            "row": row.to_dict(),
            "evals": torch.as_tensor(analysed_esd(watcher, int(row["layer_id"]))),
        }
    return {"layers": layers, "seconds": seconds}


def analysed_esd(watcher, layer_id: int):
    """The eigenvalues ``analyze`` fits, from weightwatcher's own steps (``get_ESD`` skips
    the ``conv2d_norm`` scaling that ``analyze`` applies)."""
    from weightwatcher.weightwatcher import DEFAULT_PARAMS, WWLayerIterator

    params = watcher.normalize_params(DEFAULT_PARAMS.copy())
    layer = next(
        WWLayerIterator(
            model=watcher.model, framework=watcher.framework, filters=[layer_id], params=params
        )
    )
    watcher.apply_normalize_Wmats(layer, params)
    watcher.apply_esd(layer, params)
    return layer.evals


def compare(ours: dict, theirs: dict) -> list[dict]:
    rows = []
    for name, peer in theirs["layers"].items():
        if name not in ours:
            rows.append({"layer": name, "status": "not measured by us"})
            continue
        mine = ours[name]
        a = mine.eigenvalues.sort().values
        b = peer["evals"].to(torch.float64).sort().values
        row = {"layer": name, "shape": list(mine.shape), "num_evals": int(b.numel())}
        if a.numel() != b.numel():
            row["status"] = f"{a.numel()} eigenvalues against {b.numel()}"
            rows.append(row)
            continue
        row["small_sample"] = int((b > 1e-5).sum()) < 20  # weightwatcher's small-N estimator
        kept = b >= 1e-6 * float(b.max())
        row["eig_rel_diff"] = float(((a - b).abs() / b.abs())[kept].max())
        peer_row = peer["row"]
        row["xmin_ours"], row["xmin_ww"] = mine.metrics["xmin"], float(peer_row["xmin"])
        row["same_xmin"] = math.isclose(row["xmin_ours"], row["xmin_ww"], rel_tol=1e-9)
        row["comparable"] = row["same_xmin"] and not row["small_sample"]
        for metric in COMPARED:
            theirs_value = float(peer_row[metric])
            mine_value = mine.metrics[metric]
            row[f"{metric}_ours"], row[f"{metric}_ww"] = mine_value, theirs_value
            row[f"{metric}_rel_diff"] = abs(mine_value - theirs_value) / max(
                abs(theirs_value), 1e-300
            )
        rows.append(row)
    return rows


def timed_spectra(model: torch.nn.Module, farms: bool, repeats: int) -> float:
    return timed(lambda: weight_spectra(model, farms=farms), CPU, repeats, warm_up=False)[0]


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}, {results['threads']} threads, torch {results['torch']}, "
        f"weightwatcher {results['weightwatcher']}, {results['date']}.",
        "",
    ]
    header = ["model", "state", "layers", "same xmin, ≥ 20 eigenvalues", "max eig. rel. diff"]
    header += ["max α rel. diff (those)", "max α̂", "max log norm", "max log spectral norm"]
    header += ["max stable rank", "max log α-norm"]
    cells = []
    for run in results["runs"]:
        rows = [r for r in run["layers"] if "eig_rel_diff" in r]
        same = [r for r in rows if r["comparable"]]

        def worst(metric: str, subset: list[dict]) -> str:
            values = [r[f"{metric}_rel_diff"] for r in subset]
            return f"{max(values):.1e}" if values else "n/a"

        cells.append(
            [
                run["model"],
                run["state"],
                len(rows),
                len(same),
                f"{max(r['eig_rel_diff'] for r in rows):.1e}",
                worst("alpha", same),
                worst("alpha_weighted", same),
                worst("log_norm", rows),
                worst("log_spectral_norm", rows),
                worst("stable_rank", rows),
                worst("log_alpha_norm", same),
            ]
        )
    lines += table(header, cells)
    lines += [
        "",
        "Layers left out of the α columns: weightwatcher fits fewer than 20 eigenvalues with "
        "a bias-corrected small-sample estimator (α = 1 + (n − 1)/Σ ln(x/xmin), xmin by "
        "D − 0.868/√n over tails of at least 8) where we keep the plain maximum-likelihood "
        "fit; and layers whose xmin differs:",
        "",
    ]
    differing = [
        f"{run['model']} ({run['state']}) {r['layer']}: xmin {r['xmin_ours']:.6g} (ours) vs "
        f"{r['xmin_ww']:.6g}, α {r['alpha_ours']:.4f} vs {r['alpha_ww']:.4f}"
        + (f" ({r['num_evals']} eigenvalues: small-sample estimator)" if r["small_sample"] else "")
        for run in results["runs"]
        for r in run["layers"]
        if "comparable" in r and not r["comparable"]
    ]
    lines += [f"- {d}" for d in differing] or ["- none"]
    ours_only = sorted(
        {f"{run['model']} {name}" for run in results["runs"] for name in run.get("ours_only", [])}
    )
    if ours_only:
        lines += [
            "",
            "Layers weightwatcher does not analyse (more than its `max_N` = 50,000 rows): "
            + ", ".join(ours_only)
            + ".",
        ]
    lines += [
        "",
        "**Cost of one measurement** (median of "
        f"{results['repeats']}; weightwatcher `analyze(randomize=False)` timed once):",
        "",
    ]
    lines += table(
        ["model", "layers", "ours, all metrics", "ours, without FARMS", "weightwatcher"],
        [
            [
                cost["model"],
                cost["layers"],
                f"{cost['ours_s']:.2f} s",
                f"{cost['ours_no_farms_s']:.2f} s",
                f"{cost['weightwatcher_s']:.2f} s",
            ]
            for cost in results["cost"]
        ],
    )
    return "\n".join(lines) + "\n"


def merge_by_model(earlier: dict, new: dict) -> dict:
    """A later run of the day replaces the rows of its models and keeps the others'."""
    models = {row["model"] for row in new["cost"]}
    merged = dict(new)
    for part in ("runs", "cost"):
        merged[part] = [row for row in earlier[part] if row["model"] not in models] + new[part]
    return merged


def main(argv: list[str] | None = None) -> dict:
    parser = study_parser(__doc__, repeats=3, smoke=None)  # weightwatcher has no tiny model
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args(argv)
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    results = {
        **run_meta(CPU),
        "weightwatcher": ww.__version__,
        "repeats": args.repeats,
        "runs": [],
        "cost": [],
    }
    for name in args.models:
        model = MODELS[name]()
        for state in ("initialised", f"after {args.steps} steps"):
            if state != "initialised":
                train(name, model, args.steps)
            theirs = weightwatcher_layers(model)
            ours = weight_spectra(model, farms=False)
            results["runs"].append(
                {
                    "model": name,
                    "state": state,
                    "layers": compare(ours, theirs),
                    "ours_only": [n for n in ours if n not in theirs["layers"]],
                }
            )
            print(name, state, "done", flush=True)
        results["cost"].append(
            {
                "model": name,
                "layers": len(ours),
                "ours_s": timed_spectra(model, True, args.repeats),
                "ours_no_farms_s": timed_spectra(model, False, args.repeats),
                "weightwatcher_s": theirs["seconds"],
            }
        )
    stem = day_stem("weightwatcher-crosscheck", results, args.out)
    write_day_file(stem, results, merge_by_model, markdown)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
