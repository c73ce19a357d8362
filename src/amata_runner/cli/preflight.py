"""Compose and check a command line the way Hydra will, before Hydra touches the disk.

Hydra creates the run directory before the task function runs, and reports composition problems
(an unknown option, a wrong type) over several lines.  Doing the composition here first lets every
mistake surface as one :class:`ConfigError` line and keeps outputs/ clean.  Command lines that only
inspect (``--help``, ``--cfg``, ``--info``) or change where configs come from are left to Hydra.
Only Hydra's public API is used: the override parser, and each sweep's ``sweep_string_iterator``.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from amata_runner.cli.options import did_you_mean, type_message
from amata_runner.config import MOVED_KEYS, resolve_config
from amata_runner.data import check_available
from amata_runner.errors import ConfigError


def describe_options(group: str, conf_dir: str | None = None) -> str:
    """``amata-run --help``: each option of a config group with the first sentence of its file's
    leading comment, one line each (the ``${amata_options:GROUP}`` resolver of the help text)."""
    if conf_dir is None:
        from amata_runner.cli import config_dir

        conf_dir = config_dir()
    lines = []
    files = sorted(Path(conf_dir, group).glob("*.yaml"))
    width = max((len(f.stem) for f in files), default=0)
    for path in files:
        comment = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if not text.startswith("@package"):
                comment.append(text)
        text = " ".join(comment)
        # The first sentence: a full stop before a capital, not "et al." or "eq." or "e.g.".
        first = re.split(r"(?<!\bal)(?<!\beq)(?<!e\.g)[.;]\s+(?=[A-Z(])", text, maxsplit=1)[0]
        first = first.rstrip(".;")
        if len(first) > 84:
            first = first[:83].rstrip() + "…"
        lines.append(f"  {path.stem:<{width}}  {first}".rstrip().replace("$", ""))
    return "\n".join(lines)


OmegaConf.register_new_resolver("amata_options", describe_options, replace=True)

# The flags this check understands; any other flag (--help, --cfg, --info, --config-dir, ...)
# inspects or changes where configs come from, and the command line is left to Hydra.
_MULTIRUN_FLAGS = ("-m", "--multirun")
_RUN_FLAGS = ("-r", "--run")


def _split_argv(argv: list[str]) -> tuple[bool, list[str]] | None:
    """(multirun?, overrides), or None when a flag asks Hydra for something else."""
    multirun, overrides = False, []
    for token in argv:
        if token in _MULTIRUN_FLAGS:
            multirun = True
        elif token in _RUN_FLAGS:
            continue
        elif token.startswith("-"):
            return None
        else:
            overrides.append(token)
    return multirun, overrides


def _grid(parsed: list[Override]) -> list[list[str]]:
    """Every job of a sweep, as Hydra's basic sweeper forms them: one axis per key (a later
    override of a key replaces an earlier one in its place, so the command line beats the
    config's own ``hydra.sweeper.params``), and the product of the axes."""
    axes: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes[key] = [f"{key}={value}" for value in o.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*axes.values())]


def experiment_grid(conf_dir: str, parsed: list[Override]) -> list[str]:
    """The grid a config itself declares (``hydra.sweeper.params``, as the experiments do),
    which Hydra's sweeper puts before the command line's own overrides."""
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line]
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir, job_name="preflight"):
        try:
            cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
        except Exception:
            return []  # the per-job checks report the composition error
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    return [f"{key}={value}" for key, value in params.items()]


def job_overrides(argv: list[str], conf_dir: str | None = None) -> list[list[str]] | None:
    """The override list of every job the command line would run, or None to leave it to Hydra."""
    split = _split_argv(argv)
    if split is None:
        return None
    multirun, overrides = split
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError("override", " ".join(overrides), _first_line(exc)) from exc
    if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
        return None  # an interval sweep is for other sweepers (Optuna): Hydra says so
    if multirun:
        if conf_dir is not None:
            grid = experiment_grid(conf_dir, parsed)
            if grid:
                parsed = OverridesParser.create().parse_overrides(grid + overrides)
        return _grid(parsed)
    if any(o.is_sweep_override() for o in parsed):
        return None  # Hydra explains that sweeps need -m
    return [overrides]


def check_job(conf_dir: str, overrides: list[str]) -> None:
    """Compose one job's config and run every check a run would, raising ConfigError."""
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir, job_name="preflight"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except MissingConfigException as exc:
            raise _missing_option(exc) from exc
        except (HydraException, OmegaConfBaseException) as exc:
            error = _composition_error(exc)
            if isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
                error = _unknown_key(error, overrides)
            raise error from exc
    resolved = resolve_config(cfg)
    check_available(resolved.dataset)
    check_model_fits(resolved)
    check_writable("paths.output_dir", resolved.paths.output_dir)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
            check_writable(key, value)


def check_writable(key: str, path: str) -> None:
    """The directory can be created and written (a probe directory is made and removed at once).

    Walks up to the nearest existing ancestor: it must be a directory, writable, not on a read-only
    file system, and a directory must really be creatable in it (created and removed at once).
    """
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, path, f"{existing} is a file, not a directory: choose another path")
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            key, path, f"{existing} is not writable: choose a directory you can write"
        )
    try:  # permissions can say yes where the file system says no (/proc, a full disk, a quota)
        os.rmdir(tempfile.mkdtemp(prefix=".amata-write-check-", dir=existing))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            key, path, f"cannot create a directory in {existing} ({reason}): choose another path"
        ) from exc


def check_model_fits(cfg: DictConfig) -> None:
    """Build the model on the meta device: shape mismatches surface now, nothing is allocated."""
    import torch

    from amata_runner.models import build_model

    ds = cfg.dataset
    with torch.device("meta"):
        model = build_model(
            cfg.model.name,
            num_classes=ds.num_classes,
            channels=ds.channels,
            image_size=ds.image_size,
            mean=None,
            std=None,
        )
        model(torch.zeros(1, ds.channels, ds.image_size, ds.image_size))


def preflight(argv: list[str], conf_dir: str) -> None:
    jobs = job_overrides(argv, conf_dir)
    for overrides in jobs or []:
        check_job(conf_dir, overrides)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_option(exc: MissingConfigException) -> ConfigError:
    missing = exc.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    options = sorted(exc.options or [])
    if group == "hydra/launcher" and not options:  # a preset built on a plugin not installed
        return ConfigError(group, option, 'needs the cluster extra: pip install -e ".[cluster]"')
    if group and options:
        return ConfigError(group, option, "allowed: " + ", ".join(options))
    return ConfigError("config", missing, _first_line(exc))


def _composition_error(exc: BaseException) -> ConfigError:
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    key = getattr(cause, "full_key", None)
    message = getattr(cause, "msg", None) or _first_line(cause)
    message = type_message(message.strip().splitlines()[0])
    if key:
        return ConfigError(key, _override_value(exc, key), message)
    return ConfigError("override", "", f"{_first_line(exc)}: {message}")


def _unknown_key(error: ConfigError, overrides: list[str]) -> ConfigError:
    """``epoch=3``: say which key was meant (``epochs``), from the keys beside the mistyped one.

    Called inside check_job's config context: the config is composed again without the override
    that names the unknown key, and its siblings are the candidates."""
    key = str(error.key)
    if key in MOVED_KEYS:
        return ConfigError(key, error.value, f"unknown key; {MOVED_KEYS[key]}")
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        cfg = compose(config_name="config", overrides=rest)
    except Exception:
        return error
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return error
    keys = [str(k) for k in node]
    guess = did_you_mean(key, keys)
    where = f"{parent}." if parent else ""
    if guess:
        allowed = f"unknown key; did you mean {guess}?"
    else:
        allowed = f"unknown key; the keys of {parent or 'the run'}: " + ", ".join(
            where + k for k in keys
        )
    return ConfigError(key, error.value, allowed)


def _override_value(exc: BaseException, key: str) -> str:
    """The value the user typed for ``key``, recovered from Hydra's message."""
    text = str(exc)
    marker = f"{key}="
    if marker in text:
        return text.split(marker, 1)[1].split()[0]
    return ""
