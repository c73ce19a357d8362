"""``key=value`` command lines for the tools that work on finished runs (amata-eval, ...).

They take the same override syntax as ``amata-run`` (``ckpt=PATH attacks=[pgd20,cw_inf]``) but
create no Hydra output directory: they write beside the checkpoint they read. Arguments are merged
into a dataclass schema, so a misspelt key or a wrong type is one line naming the key, the value
and what is allowed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from amata_runner.errors import ConfigError

T = TypeVar("T")


def parse_options(schema: type[T], argv: Sequence[str]) -> DictConfig:
    """Merge ``key=value`` arguments into ``schema``; raise ConfigError on anything else."""
    base = OmegaConf.structured(schema)
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError("argument", arg, "key=value (keys: " + ", ".join(base.keys()) + ")")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "argument"
        value = " ".join(a for a in argv if a.split("=", 1)[0] == key) or " ".join(argv)
        allowed = str(exc).strip().splitlines()[0]
        if "not in struct" in allowed or "Key '" in allowed:
            allowed = "unknown key; keys: " + ", ".join(base.keys())
        raise ConfigError(key, value.split("=", 1)[-1], allowed) from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(missing[0], "???", "required: pass " + missing[0] + "=...")
    return merged


def fail(tool: str, exc: ConfigError) -> NoReturn:
    print(f"{tool}: error: {exc}", file=sys.stderr)
    sys.exit(2)


def run_tool(tool: str, body: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """Run a tool's body; a ConfigError becomes one ``tool: error: ...`` line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(args)
    except ConfigError as exc:
        fail(tool, exc)
    except (ConfigAttributeError, ConfigKeyError) as exc:
        # A checkpoint's stored config (another version's, or edited) lacks a key the tool reads.
        key = getattr(exc, "full_key", None) or str(exc).splitlines()[0]
        allowed = f"a checkpoint whose stored config is complete (it has no {key})"
        ckpt = next((a.partition("=")[2] for a in args if a.startswith("ckpt=")), "")
        fail(tool, ConfigError("ckpt", ckpt, allowed))
