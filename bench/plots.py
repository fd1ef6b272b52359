"""PNG plots of a bench run: latency percentiles per path and test, CPU per request per path.

matplotlib is a bench-only dependency (bench/setup.sh installs it); without it no plot is drawn.
"""

from __future__ import annotations

import sys
from pathlib import Path

PERCENTILES = ("p50", "p90", "p99")


def _latency_panels(results) -> list[tuple[str, dict[str, dict]]]:
    """(title, {path: {p50, p90, p99}}) per test, paths that measured something only."""
    def lat(group):
        return {n: r.latency for n, r in group.items() if r.latency}
    panels = [("3 KB, 100 req/s", lat(results.main)), ("3 KB, 1,000 req/s", lat(results.fast)),
              ("600 KB, 100 req/s", lat(results.big))]
    for rate in ("100", "1000", 100, 1000):
        runs = {n: m[rate] for n, m in results.models.items() if rate in m}
        if runs:
            panels.append((f"model-aware, {int(rate):,} req/s", runs))
    return [(t, p) for t, p in panels if p]


def _bars(ax, groups: dict[str, dict], keys, log: bool) -> None:
    names = list(groups)
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [groups[n].get(key) or 0 for n in names], width, label=key)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")


def draw(results, out_dir: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib not installed (bash bench/setup.sh installs it); no PNG",
              file=sys.stderr)
        return []
    written = []
    panels = _latency_panels(results)
    if panels:
        cols = min(3, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.0 * rows), squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax, (title, groups) in zip(flat, panels):
            _bars(ax, groups, PERCENTILES, log=True)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("latency, us (log)")
        for ax in flat[len(panels):]:
            ax.set_visible(False)
        flat[0].legend(fontsize=8)
        fig.suptitle("Request latency by path (k6; lower is better)")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "latency.png", plt))
    cpu = [(title, {n: {"CPU us/req": r.median("cpu_us_per_req")} for n, r in g.items()
                    if r.median("cpu_us_per_req") is not None})
           for title, g in (("3 KB body, proxy on 1 core", results.main),
                            ("600 KB body, proxy on 1 core", results.big),
                            ("3 KB body, not pinned", results.workers))]
    grpc = {r["path"]: {"CPU us/req": r["us_per_request"]}
            for r in results.grpc.get("paths", []) if r["us_per_request"] is not None}
    cpu = [(t, g) for t, g in cpu if g] + ([("gRPC ModelInfer 3 KB, proxy on 1 core", grpc)]
                                           if grpc else [])
    if cpu:
        fig, axes = plt.subplots(1, len(cpu), figsize=(4.2 * len(cpu), 4.2), squeeze=False)
        for ax, (title, groups) in zip(axes[0], cpu):
            _bars(ax, groups, ["CPU us/req"], log=False)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("proxy CPU time per request, us")
        fig.suptitle("Proxy CPU per request (wrk, 32 connections; gRPC: h2load; lower is better)")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "cpu.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
