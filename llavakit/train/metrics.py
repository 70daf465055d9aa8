"""Training logs: a JSONL file (one line per logged step), `log_history` in transformers' Trainer shape (for
trainer_state.json), TensorBoard and W&B when asked for (optional packages), a loss-curve PNG."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

TRAINER_STATE_FILE = "trainer_state.json"
EVAL_LOG = "eval_log.jsonl"


class TrainLogger:
    """Writes metrics on the main process only; other ranks get a logger that does nothing.

    `reporters`: "tensorboard", "wandb" or "all" (those installed); None: TensorBoard when it is installed.
    `history` is transformers' `log_history`: one entry per logged step, per evaluation, and the run's summary."""

    def __init__(self, output_dir: Path, enabled: bool, reporters: list[str] | None = None,
                 config: dict[str, Any] | None = None, run_name: str | None = None):
        self.enabled = enabled
        self.path = output_dir / "train_log.jsonl"
        self.eval_path = output_dir / EVAL_LOG
        self.history: list[dict[str, Any]] = []
        self.tb = self.wandb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            wanted = _reporters(reporters)
            if "tensorboard" in wanted:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            if "wandb" in wanted:
                import wandb

                self.wandb = wandb.init(project="llavakit", name=run_name, dir=str(output_dir), config=config)

    def log(self, record: dict[str, Any], epoch: float) -> None:
        """One training step's metrics (a StepInfo's fields)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.history.append({"epoch": epoch, "grad_norm": record["grad_norm"], "learning_rate": record["lr"],
                             "loss": record["loss"], "step": record["step"]})
        self._report("train", record, record["step"])

    def log_eval(self, metrics: dict[str, Any], step: int, epoch: float) -> None:
        """An evaluation's metrics (eval_loss, eval_runtime, ...)."""
        if not self.enabled:
            return
        with self.eval_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.history.append({"epoch": epoch, **metrics, "step": step})
        self._report("eval", {k.removeprefix("eval_"): v for k, v in metrics.items()}, step)

    def log_summary(self, metrics: dict[str, Any], step: int, epoch: float) -> None:
        if self.enabled:
            self.history.append({"epoch": epoch, "step": step, "total_flos": 0, **metrics})

    def _report(self, section: str, record: dict[str, Any], step: int) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"{section}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{section}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _reporters(asked: list[str] | None) -> set[str]:
    """The loggers to start; one asked for by name but not installed is an error that says what to install."""
    installed = {name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is not None}
    if asked is None:
        return installed & {"tensorboard"}
    if "all" in asked:
        return installed
    missing = set(asked) - installed
    if missing:
        name = sorted(missing)[0]
        raise ValueError(f"report_to {name} needs the {name} package: pip install {name} (or pip install "
                         f"'llavakit[{name}]'), or drop it from --report_to")
    return set(asked)


def trainer_state(history: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """trainer_state.json as transformers' Trainer writes it (the fields tools read: log_history, global_step,
    epoch, best_metric, best_model_checkpoint, ...)."""
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in e.items()}
             for e in history]
    return {"best_metric": None, "best_model_checkpoint": None, "is_hyper_param_search": False,
            "is_local_process_zero": True, "is_world_process_zero": True, "num_input_tokens_seen": 0,
            "total_flos": 0, "trial_name": None, "trial_params": None, **fields, "log_history": clean}


def read_trainer_state(directory: Path) -> dict[str, Any] | None:
    path = directory / TRAINER_STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl (later lines for a step replace earlier ones, as after a resume)."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(log_path: Path, png_path: Path, eval_path: Path | None = None) -> bool:
    """Loss (and learning rate) against step as a PNG, with the eval loss when `eval_path` (eval_log.jsonl) has
    any; False when matplotlib is missing."""
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
    evals = read_log(eval_path) if eval_path is not None and eval_path.is_file() else []
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], color="tab:green", marker="o",
                label="eval loss")
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
