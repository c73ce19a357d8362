"""``amata-run``: train one configured run, or a grid of them with ``-m``.

Before Hydra creates any directory, the command line is composed and checked here (every job of a
``-m`` grid), so a bad override stops with one line naming the key, the value and what is allowed,
exit status 2, and nothing written under outputs/.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from amata_runner.cli import config_dir
from amata_runner.cli.preflight import preflight
from amata_runner.config import register_schemas, resolve_config
from amata_runner.data import check_available
from amata_runner.errors import ConfigError, StorageError
from amata_runner.logging import progress
from amata_runner.runtime.distributed import from_env, init_process_group
from amata_runner.runtime.interrupts import PREEMPTED_EXIT, ForcedStop, Preempted, StopRequests
from amata_runner.runtime.nonfinite import NonFiniteLoss
from amata_runner.runtime.run_dir import (
    RunDirBusy,
    RunLock,
    read_status,
    result_files,
    storage_error,
    write_status,
)

HYDRA_SUBDIR = ".hydra"

try:  # at import: Hydra's launchers unpickle _task in fresh worker processes, which compose too
    register_schemas()
except ConfigError as _exc:  # a plugin named in AMATA_RUNNER_PLUGINS that cannot be imported
    print(f"amata-run: error: {_exc}", file=sys.stderr)
    sys.exit(2)


def _record(run_dir: Path, status: str, error: str | None = None, *, quiet: bool = False) -> None:
    """status.json marks each job running / completed / preempted / interrupted / failed, so a
    sweep records every job. Under torchrun only rank 0 writes it. A failure to write it (a full
    disk that even an in-place rewrite cannot use) is said, not raised: the job's own outcome is
    the message that matters."""
    if not from_env().is_main:
        return
    try:
        write_status(run_dir, status, error)
    except StorageError as exc:
        if not quiet:  # quiet: the job's own error already says the disk failed
            print(f"amata-run: warning: {exc}", file=sys.stderr)


def _write_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """What Hydra would write to ``.hydra/`` (composed config, Hydra's config, overrides); written
    here, once the run directory is ours and the start is accepted, so a refused start changes no
    file (conf/hydra/default.yaml sets ``output_subdir: null``)."""
    hydra_cfg = HydraConfig.instance().cfg
    files = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    }
    out = run_dir / HYDRA_SUBDIR
    try:
        out.mkdir(exist_ok=True)
        for name, text in files.items():
            tmp = out / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out / name)
    except OSError as exc:
        raise storage_error(out, exc, "nothing else was changed") from exc


def _save_resolved(run_dir: Path, resolved: DictConfig) -> None:
    path = run_dir / "config_resolved.yaml"
    tmp = run_dir / ".config_resolved.yaml.tmp"
    try:
        tmp.write_text(OmegaConf.to_yaml(resolved), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from exc


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _task(cfg: DictConfig) -> float | None:
    # Stop signals are requests for the whole life of the job (start-up, training, evaluation).
    with StopRequests() as stop:
        return _job(cfg, stop)


def _fail(message: str, code: int, multirun: bool, exc: BaseException) -> NoReturn:
    """One line and an exit status; in a grid the job fails and the sweep goes on, except when
    the sweep itself must stop: a stop signal, or a job directory another live run holds (two
    sweeps sharing one hydra.sweep.dir would collide on every job)."""
    if multirun and not isinstance(exc, (Preempted, ForcedStop, RunDirBusy)):
        raise exc
    print(f"amata-run: {message}", file=sys.stderr)
    sys.exit(code)


def _job(cfg: DictConfig, stop: StopRequests) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job = from_env()
    if job.enabled:  # every rank works in rank 0's run directory (only rank 0 writes to it)
        init_process_group(job, use_cuda=cfg.device != "cpu" and _cuda_available())
        run_dir = Path(job.broadcast_text(str(run_dir) if job.is_main else None))
    if job.is_main:  # the first line of every run: where to look (nothing is written there yet)
        progress.say(f"run dir: {run_dir}")
    lock = RunLock(run_dir)
    try:
        if job.is_main:
            lock.acquire()
    except (RunDirBusy, StorageError) as exc:
        _fail(f"error: {exc}", 2 if isinstance(exc, RunDirBusy) else 1, multirun, exc)
    try:
        return _locked_job(cfg, stop, run_dir, multirun, lock)
    finally:
        lock.release()


def _locked_job(
    cfg: DictConfig, stop: StopRequests, run_dir: Path, multirun: bool, lock: RunLock
) -> float | None:
    """Check, then train: nothing is written to the directory until the start is accepted."""
    from amata_runner.engine import prepare_start, train  # torch-heavy: not for --help / --cfg

    is_main = from_env().is_main
    new_job = read_status(run_dir) is None and not result_files(run_dir)
    try:
        resolved = resolve_config(cfg)
        check_available(resolved.dataset)
        start = prepare_start(resolved, run_dir)
    except ConfigError as exc:
        if new_job:  # a job of its own that could not start: say so in its directory
            _record(run_dir, "failed", str(exc))
        else:  # a refusal leaves another run's directory exactly as it was
            lock.restore()
        _fail(f"error: {exc}", 2, multirun, exc)
    try:
        if is_main:
            _write_hydra_files(run_dir, cfg)
            write_status(run_dir, "running")
            _save_resolved(run_dir, resolved)
        summary = train(resolved, run_dir, start=start, stop=stop)
    except ConfigError as exc:
        _record(run_dir, "failed", str(exc))
        _said_in_log(run_dir, is_main, f"failed: {exc}")
        _fail(f"error: {exc}", 2, multirun, exc)
    except Preempted as exc:  # a checkpoint was written: the whole sweep stops, to be resumed
        _record(run_dir, "preempted", str(exc))
        message = exc.continue_with(_continue_command(run_dir, multirun))
        _said_in_log(run_dir, is_main, f"preempted: {message}")
        _fail(message, PREEMPTED_EXIT, multirun, exc)
    except ForcedStop as exc:
        _record(run_dir, "interrupted", str(exc))
        message = f"{exc}; the last complete checkpoint was kept"
        message += f"; to continue: {_continue_command(run_dir, multirun)}"
        _said_in_log(run_dir, is_main, f"interrupted: {message}")
        _fail(message, 128 + exc.signum, multirun, exc)
    except KeyboardInterrupt:  # SIGINT where our handlers could not be installed (a thread)
        _record(run_dir, "interrupted")
        raise
    except StorageError as exc:
        _record(run_dir, "failed", str(exc), quiet=True)
        _fail(f"error: {exc} (free some space, then resume=true)", 1, multirun, exc)
    except NonFiniteLoss as exc:
        _record(run_dir, "failed", str(exc))
        _said_in_log(run_dir, is_main, f"failed: {exc}")
        _fail(f"error: {exc}", 1, multirun, exc)
    except Exception as exc:
        _record(run_dir, "failed", f"{type(exc).__name__}: {exc}")
        _said_in_log(run_dir, is_main, f"failed: {type(exc).__name__}: {exc}")
        raise
    _record(run_dir, "completed")
    if is_main:
        progress.finish(run_dir, "completed", summary)
    return _objective(summary)


def _objective(summary: dict[str, Any]) -> float | None:
    """The number a sweeper (e.g. Optuna) maximises: the best robust accuracy on the validation
    split, so a hyper-parameter search never selects on the test set; only a run without a
    validation split (eval.validation.size=0, the paper protocol) falls back to its final test
    accuracy under the first final attack."""
    best = summary.get("best") or {}
    if best.get("selected_on") == "validation" and best.get("robust_accuracy") is not None:
        return float(best["robust_accuracy"])
    final = summary.get("final")
    if final:
        return float(next(iter(final["robust_accuracy"].values())))
    value = best.get("robust_accuracy")
    return None if value is None else float(value)


def _said_in_log(run_dir: Path, is_main: bool, message: str) -> None:
    """How a started run ended, in its train.log (stderr has the line already)."""
    if is_main:
        progress.ended(run_dir, message)


def _continue_command(run_dir: Path, multirun: bool) -> str:
    return progress.continue_command(
        HydraConfig.get(), run_dir, multirun=multirun, world=from_env().world
    )


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
