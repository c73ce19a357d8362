"""``amata-run``: train one configured run, or a grid of them with ``-m``.

Before Hydra creates any directory, the command line is composed and checked here (every job of a
``-m`` grid), so a bad override stops with one line naming the key, the value and what is allowed,
exit status 2, and nothing written under outputs/.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from amata_runner.cli import config_dir
from amata_runner.cli.preflight import preflight
from amata_runner.config import register_schemas, resolve_config
from amata_runner.data import check_available
from amata_runner.distributed import from_env, init_process_group
from amata_runner.errors import ConfigError, StorageError
from amata_runner.interrupts import PREEMPTED_EXIT, ForcedStop, Preempted
from amata_runner.nonfinite import NonFiniteLoss

register_schemas()


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """status.json marks each job running / completed / failed, so a sweep records every job.

    Under torchrun only rank 0 writes it."""
    if not from_env().is_main:
        return
    payload: dict[str, Any] = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if error is not None:
        payload["error"] = error
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / "status.json")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _task(cfg: DictConfig) -> float | None:
    from amata_runner.engine import train  # torch-heavy: not needed for --help / --cfg

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job = from_env()
    if job.enabled:  # every rank works in rank 0's run directory (only rank 0 writes to it)
        init_process_group(job, use_cuda=cfg.device != "cpu" and _cuda_available())
        run_dir = Path(job.broadcast_text(str(run_dir) if job.is_main else None))
    write_status(run_dir, "running")
    try:
        resolved = resolve_config(cfg)
        check_available(resolved.dataset)
        if job.is_main:
            OmegaConf.save(resolved, run_dir / "config_resolved.yaml")
        summary = train(resolved, run_dir)
    except ConfigError as exc:
        write_status(run_dir, "failed", str(exc))
        if multirun:
            raise
        print(f"amata-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Preempted as exc:  # a checkpoint was written: the whole sweep stops, to be resumed
        write_status(run_dir, "preempted", str(exc))
        print(f"amata-run: {exc}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except ForcedStop as exc:
        write_status(run_dir, "interrupted", str(exc))
        print(f"amata-run: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted")
        raise
    except (NonFiniteLoss, StorageError) as exc:
        write_status(run_dir, "failed", str(exc))
        if multirun:
            raise
        print(f"amata-run: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}")
        raise
    write_status(run_dir, "completed")
    final = summary.get("final")
    if final:  # the number a sweeper (e.g. Optuna) maximises
        return float(next(iter(final["robust_accuracy"].values())))
    return float(summary["best"]["robust_accuracy"])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _torchrun_setup(argv: list[str]) -> list[str]:
    """Under torchrun, ranks other than 0 let Hydra write into a scratch dir they delete at exit:
    rank 0 alone creates the run directory (its path is broadcast once training starts)."""
    job = from_env()
    if not job.enabled:
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError(
            "--multirun", "-m", "one run per torchrun job: launch one torchrun per grid point"
        )
    if job.is_main:
        return argv
    scratch = tempfile.mkdtemp(prefix=f"amata-rank{job.rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [*argv, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def main() -> None:
    try:
        preflight(sys.argv[1:], config_dir())
        sys.argv[1:] = _torchrun_setup(sys.argv[1:])
    except ConfigError as exc:
        print(f"amata-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _task()


if __name__ == "__main__":
    main()
