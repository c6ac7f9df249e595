"""Loss (training and held-out) and learning-rate curves of every stage of a run, as one PNG."""

from __future__ import annotations

import csv
from pathlib import Path

from mllm_kit.errors import ConfigError
from mllm_kit.training.state import RunState


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key != "step" and value not in (None, ""):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = RunState.load(run_dir)
    stages = [(name, run_dir / name / "logs" / "metrics.csv") for name in state.stages]
    stages = [(n, p) for n, p in stages if p.is_file()]
    if not stages:
        raise ConfigError(f"{run_dir}: no stage has logs/metrics.csv yet.")
    fig, axes = plt.subplots(2, len(stages), figsize=(4.5 * len(stages), 6), squeeze=False)
    for col, (name, path) in enumerate(stages):
        metrics = read_metrics(path)
        # LearningRateMonitor logs "lr" (one parameter group) or "lr/pg1", "lr/pg2", ...
        lr_keys = sorted(k for k in metrics if k == "lr" or k.startswith("lr/"))
        rows = [("lm_loss", ["train/lm_loss", "val/loss"]), ("lr", lr_keys)]
        for row, (title, keys) in enumerate(rows):
            ax = axes[row][col]
            for key in keys:
                points = metrics.get(key, [])
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="o" if key.startswith("val/") else None)
            if len([k for k in keys if metrics.get(k)]) > 1:
                ax.legend(fontsize="small")
            ax.set_title(f"{name}: {title}")
            ax.set_xlabel("step")
    fig.tight_layout()
    out = out or run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
