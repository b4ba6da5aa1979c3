"""``jackpot-plot WORKDIR [--out DIR] [--smooth N]``: training curves from ``WORKDIR/metrics.jsonl``.

One PNG per metric group, the part of the name before the first ``/`` (``reward``, ``obrs``,
``mismatch``, ``loss``, ``time``, ``eval``, ...; names without a ``/``, such as ``lr``, go to
``misc``), with one subplot per metric against the step. ``--smooth N`` draws a trailing moving
average over the last N logged values on top of the faded raw curve. NaN and infinite values
are left out of the curves (a subplot's title counts them); metrics without a single finite
number get no subplot.
"""
from __future__ import annotations

import argparse
import math
import os
import re

import numpy as np
from matplotlib.figure import Figure

from jackpot_jax.train.metrics import read_metrics

MISC_GROUP = "misc"
COLUMNS = 3


def group_of(key: str) -> str:
    """The metric group of ``key``: its prefix before the first ``/``, else ``misc``."""
    return key.split("/", 1)[0] if "/" in key else MISC_GROUP


def series(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (steps, values)}`` for every metric with at least one finite number; rows where a
    metric is missing or not a number are left out of its curve (NaN and infinities are kept)."""
    points: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                points.setdefault(key, []).append((row["step"], float(value)))
    out = {}
    for key, pts in points.items():
        steps, values = np.array(pts).T
        if np.isfinite(values).any():
            out[key] = (steps, values)
    return out


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start). Each window is summed
    on its own, so rounding errors do not pile up along a long run as with a running sum."""
    sums = np.convolve(values, np.ones(window))[:len(values)]
    return sums / np.minimum(np.arange(1, len(values) + 1), window)


def plot_group(group: str, curves: dict, path: str, smooth: int) -> None:
    """One figure for ``group``, a subplot per ``{key: (steps, values)}``, saved as PNG at ``path``."""
    cols = min(COLUMNS, len(curves))
    nrows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (key, (steps, values)) in zip(axes, sorted(curves.items())):
        finite = np.isfinite(values)
        steps, values, n_bad = steps[finite], values[finite], int((~finite).sum())
        if smooth > 1:
            ax.plot(steps, values, color="C0", alpha=0.3, linewidth=1)
            ax.plot(steps, moving_average(values, smooth), color="C0", linewidth=1.5)
        else:
            ax.plot(steps, values, color="C0", linewidth=1.5)
        ax.set_title(f"{key} ({n_bad} NaN/inf left out)" if n_bad else key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    fig.suptitle(group)
    fig.savefig(path, dpi=100)


def plot_metrics(workdir, out_dir=None, *, smooth: int = 1) -> list[str]:
    """Writes one PNG per metric group of ``WORKDIR/metrics.jsonl`` into ``out_dir`` (default
    ``WORKDIR/plots``) and returns their paths. FileNotFoundError when there is no metrics file,
    ValueError when it holds no numeric metric."""
    if smooth < 1:
        raise ValueError(f"smooth must be a window of at least 1 value, got {smooth}.")
    workdir = os.fspath(workdir)
    rows = read_metrics(workdir)
    curves = series(rows)
    if not curves:
        raise ValueError(f"The metrics of {workdir} hold no numeric metric to plot ({len(rows)} rows).")
    groups: dict[str, dict] = {}
    for key, curve in curves.items():
        groups.setdefault(group_of(key), {})[key] = curve
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for group, group_curves in sorted(groups.items()):
        path = os.path.join(out_dir, re.sub(r"[^\w.-]", "_", group) + ".png")
        plot_group(group, group_curves, path, smooth)
        written.append(path)
    return written


def main(argv=None) -> None:
    """The ``jackpot-plot`` command: prints the path of each PNG it writes."""
    parser = argparse.ArgumentParser(prog="jackpot-plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a training run's directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: WORKDIR/plots)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="trailing moving average over N values, drawn over the raw curve (default: 1, none)")
    args = parser.parse_args(argv)
    try:
        written = plot_metrics(args.workdir, args.out, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"jackpot-plot: {err}") from err
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
