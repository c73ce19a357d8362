"""TensorBoard, optional (``logger=tensorboard``): the only module that imports it.

Event files go to ``<run dir>/tensorboard/`` (``tensorboard --logdir outputs/`` shows every run).
Each metric is written twice, because TensorBoard's x axis is an integer step:

- ``vs_passes/<metric>``: step = forward + backward passes so far (the work done);
- ``vs_train_ms/<metric>``: step = milliseconds on the train-only clock (the time axis of the
  paper's figures; ``train_seconds`` x 1000, so the axis reads in ms).

The run's resolved config is logged as hyperparameters (the HParams tab), with the final
accuracies (``final/clean_accuracy``, ``final/<attack>_accuracy``), train seconds and passes as
its metrics, written when the run completes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

TB_DIR = "tensorboard"
# Row keys plotted as scalars (anything else numeric in a row is plotted under ``other/``).
SCALARS = (
    "clean_error",
    "robust_error",
    "val_clean_error",
    "val_robust_error",
    "train_loss",
    "train_error",
    "lr",
    "K",
    "alpha",
    "m",
    "tau",
    "c",
    "epoch",
    "train_seconds",
)
_NOT_PLOTTED = {
    "iteration",
    "examples",
    "forward_passes",
    "backward_passes",
    "eval_examples",
    "val_examples",
}


def _passes(row: dict[str, Any]) -> int:
    return int(row.get("forward_passes", 0)) + int(row.get("backward_passes", 0))


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(value)


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The config as ``a.b.c -> scalar`` pairs (lists as text), skipping paths and provenance."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in ("paths", "provenance", "logger"):
            continue
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        else:
            flat[name] = _hparam_value(value)
    return flat


class TensorBoardSink:
    def __init__(self, run_dir: Path, *, config: dict[str, Any]) -> None:
        self.run_id: str | None = None
        self.log_dir = run_dir / TB_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._hparams = flat_hparams(config)

    def log(self, row: dict[str, Any]) -> None:
        by_passes = _passes(row)
        by_ms = round(float(row.get("train_seconds", 0.0)) * 1000)
        for key, value in row.items():
            if key in _NOT_PLOTTED or isinstance(value, bool) or value is None:
                continue
            if not isinstance(value, (int, float)):
                continue
            name = key if key in SCALARS else f"other/{key}"
            self._writer.add_scalar(f"vs_passes/{name}", value, global_step=by_passes)
            self._writer.add_scalar(f"vs_train_ms/{name}", value, global_step=by_ms)
        self._writer.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        metrics: dict[str, float] = {
            "final/train_seconds": float(summary.get("train_seconds", 0.0)),
            "final/passes": float(_passes(summary)),
        }
        final = summary.get("final")
        if final:
            metrics["final/clean_accuracy"] = float(final["clean_accuracy"])
            for attack, accuracy in final["robust_accuracy"].items():
                metrics[f"final/{attack}_accuracy"] = float(accuracy)
        step = _passes(summary)
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, global_step=step)
        # The HParams tab: this run's settings beside its final numbers (same event file).
        experiment, start, end = hparams(self._hparams, metrics)
        file_writer = self._writer._get_file_writer()
        for event in (experiment, start, end):
            file_writer.add_summary(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
