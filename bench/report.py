"""The report of ``bench/run.py``: markdown tables from its JSON results (no torch needed).

    python bench/report.py                      # rewrite every run's .md from its .json
    python bench/report.py bench/results/X.json # print one run's tables

The documentation site renders the same tables from the same files at build time
(``docs/hooks.py``), so no table of the comparison with the peers is copied by hand.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def keyed_merge(key: Callable[[dict], object]) -> Callable[[list[dict], list[dict]], list[dict]]:
    """A merge of rows for :func:`record_day`: new rows replace earlier rows of the same key."""

    def merge(earlier: list[dict], new: list[dict]) -> list[dict]:
        kept = {key(row): row for row in earlier}
        kept.update({key(row): row for row in new})
        return list(kept.values())

    return merge


def day_stem(study: str, meta: dict, out: str | pathlib.Path, suffix: str = "") -> pathlib.Path:
    """``out/{study}-{device}-{date}{suffix}``: the day file of a study on a device, without
    its ``.json`` / ``.md`` extension."""
    device = meta["device"].replace(" ", "-")
    return pathlib.Path(out) / f"{study}-{device}-{meta['date']}{suffix}"


def write_day_file(
    stem: pathlib.Path,
    results: dict,
    merge: Callable[[dict, dict], dict],
    markdown: Callable[[dict], str],
) -> dict:
    """Write ``results`` to ``stem.json`` and their markdown to ``stem.md``, merged
    (``merge(earlier, results)``) into the results already there: a day's runs of other
    workloads, figures or settings add to one file. Returns what was written."""
    path = stem.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        results = merge(json.loads(path.read_text()), results)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    return results


def record_day(
    study: str,
    meta: dict,
    rows: list[dict],
    out: str | pathlib.Path,
    merge: Callable[[list[dict], list[dict]], list[dict]],
    markdown: Callable[[list[dict], dict], str],
) -> list[dict]:
    """:func:`write_day_file` of a study whose results are rows: ``{**meta, "rows": rows}``,
    the earlier rows and the new ones merged by ``merge``. Returns the rows written."""
    written = write_day_file(
        day_stem(study, meta, out),
        {**meta, "rows": rows},
        lambda earlier, new: {**new, "rows": merge(earlier["rows"], new["rows"])},
        lambda results: markdown(results["rows"], meta),
    )
    return written["rows"]


def heading(title: str, meta: dict) -> str:
    """A day file's first line: ``# title (date, device, torch version)``."""
    return f"# {title} ({meta['date']}, {meta['device']}, torch {meta['torch']})"


def document(
    title: str, meta: dict, description: str, header: list[str], rows: list[list[str]]
) -> str:
    """A study's markdown: its heading (:func:`heading`), a description and one table."""
    return "\n".join([heading(title, meta), "", description, "", *table(header, rows)]) + "\n"


def is_peer_comparison(results: dict) -> bool:
    """Whether a results file was written by ``bench/run.py`` (the comparison with the peers)."""
    return {"workloads", "device", "repeats"} <= results.keys()


def peer_comparisons(folder: pathlib.Path = RESULTS) -> list[tuple[pathlib.Path, dict]]:
    """Every ``bench/run.py`` results file in ``folder``: CPU runs first, newest first."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        results = json.loads(path.read_text())
        if isinstance(results, dict) and is_peer_comparison(results):
            runs.append((path, results))
    runs.sort(key=lambda run: run[1]["date"], reverse=True)
    runs.sort(key=lambda run: not run[1]["device"].startswith("cpu"))
    return runs


def speed_up(rows: list[dict], target: float) -> str | None:
    """``"N.N× (ours s vs peer s)"``: each peer setting within ``target`` against the fastest
    of our settings within it timed in the same command (``ours_beside``; in files without
    it, our fastest row), the smallest such ratio; ``None`` when we have no setting within
    ``target``."""
    reached = [r for r in rows if "seconds" in r and r["max_rel_error"] <= target]
    ours = [r for r in reached if r["tool"].startswith("ours")]
    peers = [r for r in reached if not r["tool"].startswith("ours")]
    if not ours:
        return None
    fastest = min(ours, key=lambda r: r["seconds"])
    if not peers:
        return f"no peer setting reached it (ours {fastest['seconds']:.3f} s)"

    def ratio(peer: dict) -> tuple[float, dict]:
        beside = peer.get("ours_beside", fastest)
        return peer["seconds"] / beside["seconds"], beside

    peer = min(peers, key=lambda r: ratio(r)[0])
    value, best = ratio(peer)
    where = ", side by side in one command" if "ours_beside" in peer else ""
    return (
        f"{value:.1f}× ({best['seconds']:.3f} s, {best['tool']}, against "
        f"{peer['seconds']:.3f} s, {peer['tool']}{where})"
    )


def _as_list(rows: list | dict) -> list:
    """Files before 2026-12 hold one warm-tracking row as a dict (the ``auto`` path)."""
    return [rows] if isinstance(rows, dict) else rows


def _mib(value) -> str:
    return value if isinstance(value, str) else f"{value:.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, the separator and one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _cost(row: dict, key: str) -> str:
    value = row.get(key, "not run")
    return value if isinstance(value, str) else f"{value:.2f} ({value / row['grad_ms']:.1f}×)"


def markdown(results: dict) -> str:
    """The six figures as markdown tables."""
    workloads = results["workloads"]
    lines = [
        f"Device: {results['device']}, torch {results['torch']}, {results['date']}, "
        f"median of {results['repeats']}.",
        "",
        "**1. Gradient and HVP cost** (ms per vector; × gradient)",
        "",
    ]
    paths = [
        "fresh_double_backward_ms",
        "reuse_graph_ms",
        "forward_over_reverse_1_ms_per_vector",
        "forward_over_reverse_8_ms_per_vector",
        "compiled_1_ms_per_vector",
        "compiled_8_ms_per_vector",
    ]
    lines += table(
        [
            "workload",
            "gradient",
            "fresh double backward",
            "reused graph",
            "fwd-over-rev",
            "vmap 8",
            "compiled, 1",
            "compiled, vmap 8",
        ],
        [
            [name, f"{e['hvp_paths']['grad_ms']:.2f}"] + [_cost(e["hvp_paths"], k) for k in paths]
            for name, e in workloads.items()
            if "hvp_paths" in e
        ],
    )
    for figure, key, target in (
        ("2a. Top-1 to relative error ≤ 1e-3", "top1", 1e-3),
        ("2b. Top-10 to relative error ≤ 1e-2", "top10", 1e-2),
    ):
        rows, ratios = [], []
        for name, entry in workloads.items():
            for row in entry.get(key, []):
                if "status" in row:
                    rows.append([name, row["tool"], row["status"], "", "", ""])
                else:
                    rows.append(
                        [
                            name,
                            row["tool"],
                            f"{row['seconds']:.3f}",
                            f"{row['max_rel_error']:.1e}",
                            row.get("repeats", results["repeats"]),
                            row.get("host_syncs", "not counted"),
                        ]
                    )
            ratio = speed_up(entry.get(key, []), target)
            if ratio is not None:
                ratios.append(f"{name}: {ratio}")
        lines += [
            "",
            f"**{figure}**",
            "",
            *table(
                ["workload", "tool", "seconds", "max rel. error", "repeats", "host syncs"], rows
            ),
        ]
        if ratios:
            lines += [
                "",
                "Fastest of ours over the fastest peer, both within the target: "
                + "; ".join(ratios)
                + ".",
            ]
    compile_notes = [
        f"{name}: {e['hvp_paths'][f'compile_{w}_s']:.1f} s for blocks of {w}"
        for name, e in workloads.items()
        for w in (1, 8)
        if f"compile_{w}_s" in e.get("hvp_paths", {})
    ]
    if compile_notes:
        lines += ["", "One-time compilation (eager check included): " + "; ".join(compile_notes)]
    rows = [
        [
            name,
            w.get("hvp", "auto"),
            w["measurements"],
            f"{w['median_seconds']:.4f}",
            f"{w['median_gradient_times']:.1f}",
            w["median_hvps"],
        ]
        for name, e in workloads.items()
        for w in _as_list(e.get("warm_tracking", []))
    ]
    lines += ["", "**3. Warm-started tracking** (λ_max to 1e-3 from the previous eigenvector)", ""]
    lines += table(
        ["workload", "HVP path", "measurements", "median s", "gradient-times", "HVPs"], rows
    )
    memory = ", ".join(
        f"{n}: {_mib(e.get('peak_extra_memory_mib', 'not run'))} "
        f"(unbounded basis: {_mib(e.get('peak_extra_memory_unbounded_mib', 'not run'))})"
        for n, e in workloads.items()
    )
    o, r = results.get("training_overhead"), results.get("representation")
    paragraphs = [
        o
        and (
            f"**4. Training overhead** of `SharpnessMonitor(every_n_steps={o['every_n_steps']})`, "
            f"{o['model']}, {o['steps']} SGD steps: {o['plain_s']:.2f} s → "
            f"{o['monitored_s']:.2f} s ({100 * o['overhead']:+.1f} %)."
        ),
        f"**5. Peak extra device memory of a cold top-1 measurement**: {memory}",
        r
        and (
            f"**6. RankMe of {r['shape'][0]} × {r['shape'][1]} embeddings**: streaming float64 "
            f"covariance {r['ours_seconds']:.3f} s, `torch.linalg.svdvals` (float64) "
            f"{r['svdvals_seconds']:.3f} s; RankMe {r['rankme_ours']:.4f} vs "
            f"{r['rankme_svdvals']:.4f} (relative difference {r['relative_difference']:.1e})."
        ),
    ]
    lines += [line for text in paragraphs if text for line in ("", text)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    paths = [pathlib.Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if paths:
        for path in paths:
            print(markdown(json.loads(path.read_text())))
        return
    for path, results in peer_comparisons():
        path.with_suffix(".md").write_text(markdown(results))
        print(f"wrote {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
