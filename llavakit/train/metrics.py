"""Training logs: a JSONL file (one line per logged step), TensorBoard when installed, a loss-curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class TrainLogger:
    """Writes metrics on the main process only; other ranks get a logger that does nothing."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "train_log.jsonl"
        self.tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.tb = _tensorboard(output_dir / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl (later lines for a step replace earlier ones, as after a resume)."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(log_path: Path, png_path: Path) -> bool:
    """Loss (and learning rate) against step as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss curve drawn", file=sys.stderr)
        return False
    records = read_log(log_path)
    if not records:
        return False
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    ax.set_title("llavakit training")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
