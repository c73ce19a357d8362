"""``key=value`` command lines for the tools that work on finished runs (amata-eval, ...).

They take the same override syntax as ``amata-run`` (``ckpt=PATH attacks=[pgd20,cw_inf]``) but
create no Hydra output directory: they write beside the checkpoint they read. Arguments are merged
into a dataclass schema, so a misspelt key or a wrong type is one line naming the key, the value
and what is allowed (the nearest key for a misspelt one: ``atacks`` -> ``attacks``). ``--help``
lists every key of the schema with its default and the meaning written beside its field.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
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
        allowed = type_message(str(exc).strip().splitlines()[0])
        if "not in struct" in allowed or "Key '" in allowed:
            allowed = unknown_key_message(str(key), [str(k) for k in base])
        raise ConfigError(key, value.split("=", 1)[-1], allowed) from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(missing[0], "???", "required: pass " + missing[0] + "=...")
    return merged


_TYPE_WORDS = {
    "Integer": "an integer (e.g. 3)",
    "Float": "a number (e.g. 0.1)",
    "Boolean": "true or false",
}


def type_message(message: str) -> str:
    """OmegaConf's "Value 'abc' of type 'str' could not be converted to Integer" in our words."""
    if "is not a valid bool" in message:
        return "must be " + _TYPE_WORDS["Boolean"]
    found = re.search(r"could not be converted to (\w+)", message)
    if found is None:
        return message
    what = _TYPE_WORDS.get(found.group(1), found.group(1).lower())
    return f"must be {what}"


def did_you_mean(key: str, keys: Sequence[str]) -> str | None:
    """The closest known key to a mistyped one (``epoch`` -> ``epochs``), if any is close."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(keys), n=1, cutoff=0.6)
    if not close:
        return None
    prefix = key[: -len(leaf)]
    return prefix + close[0]


def unknown_key_message(key: str, keys: Sequence[str]) -> str:
    guess = did_you_mean(key, keys)
    hint = f"did you mean {guess}? " if guess else ""
    return f"unknown key; {hint}keys: " + ", ".join(keys)


def _field_comments(schema: type) -> dict[str, str]:
    """``name: type = default  # meaning`` comments of a dataclass (continuation lines too)."""
    try:
        source = inspect.getsource(schema)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    last: str | None = None
    for line in source.splitlines():
        field_match = re.match(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        comment_only = re.match(r"^\s+#\s*(.*)$", line)
        if comment_only and last is not None:
            comments[last] = (comments.get(last, "") + " " + comment_only.group(1)).strip()
        elif field_match:
            last = field_match.group(1)
            if field_match.group(2):
                comments[last] = field_match.group(2).strip()
        else:
            last = None
    return comments


def _default_text(item: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "(required)"
    if value == "???":
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def options_help(tool: str, schema: type, doc: str | None) -> str:
    """``--help``: the tool's description, then every key with its default and meaning."""
    comments = _field_comments(schema)
    fields = dataclasses.fields(schema)  # type: ignore[arg-type]
    rows = [(f.name, _default_text(f), comments.get(f.name, "")) for f in fields]
    width_key = max(len(r[0]) for r in rows)
    width_default = min(max(len(r[1]) for r in rows), 24)
    lines = [f"usage: {tool} key=value ...", ""]
    if doc:
        lines += [inspect.cleandoc(doc).replace("``", ""), ""]
    lines.append("keys (key=value; default; meaning):")
    for name, default, meaning in rows:
        lines.append(f"  {name:<{width_key}}  {default:<{width_default}}  {meaning}".rstrip())
    return "\n".join(lines)


def help_requested(argv: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help", "help") for arg in argv)


def fail(tool: str, exc: ConfigError) -> NoReturn:
    print(f"{tool}: error: {exc}", file=sys.stderr)
    sys.exit(2)


def run_tool(
    tool: str,
    body: Callable[[list[str]], Any],
    argv: Sequence[str] | None = None,
    *,
    schema: type | None = None,
    doc: str | None = None,
) -> Any:
    """Run a tool's body; a ConfigError becomes one ``tool: error: ...`` line and exit status 2.

    ``-h``/``--help`` prints the tool's help (``doc`` and every key of ``schema``) and exits 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    if schema is not None and help_requested(args):
        print(options_help(tool, schema, doc))
        sys.exit(0)
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
