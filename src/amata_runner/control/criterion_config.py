"""Config node ``eval.criterion`` of the optimal-control criterion C (paper eq. 14), and its checks.

No torch import here: configs are checked before any work starts.

What C measures (Section 2.4): for the current inner-loop control u_t = (K_t, alpha_t),

    H(alpha, K) = || grad_theta loss(h_theta(A_{alpha,K}(x)), y) ||^2 - gamma * K
    C           = max_{(K, alpha) in G} H(alpha, K) - H(alpha_t, K_t)

G, the controllable space, is finite here. It is either an explicit list ``pairs`` of [K, alpha],
or the product ``steps`` x ``step_sizes``, or, with ``step_sizes: null``, the annealing family of
Algorithm 1 and Appendix E, {(K, tau / K) : K in steps}, where every control shares the budget
tau = K * alpha. The paper does not list its G; it gives gamma = 0.04, says G holds (alpha, K)
and that Bayesian optimisation (hyperopt's TPE) searched it. A finite G is searched exhaustively
by default (exact, and cheap: controls with the same alpha share one PGD path), or by TPE (optuna)
on request.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from amata_runner.checks import as_float, at_least, one_of, positive_budget, require
from amata_runner.errors import ConfigError

SEARCHES = ("exhaustive", "tpe")
# Methods whose inner loop is PGD with a control (K, alpha): the ones C can score.
CRITERION_METHODS = ("pgd", "amata")
NODE = "eval.criterion"


@dataclass
class CriterionConfig:
    """``eval.criterion``: when and how C is measured during a run (off the train clock).

    ``eps``, ``tau`` and ``probe_batch_size`` left null are filled in by :func:`normalise_criterion`
    (the run's eps, the threat model's K*alpha budget, the run's batch size) so the saved config
    records the values used.
    """

    enabled: bool = False
    every: int = 1  # epochs between measurements (at evaluation rows)
    gamma: float = 0.04  # cost of one inner step (Table 1)
    steps: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 40])  # K candidates
    step_sizes: list[Any] | None = None  # alpha candidates; null: alpha = tau / K
    tau: Any = None  # K * alpha of the tau / K family; null: dataset.threat.step_size * steps
    pairs: list[Any] | None = None  # explicit G as [[K, alpha], ...]; overrides steps/step_sizes
    eps: Any = None  # L-inf radius of the inner PGD; null: method.eps (else dataset.threat.eps)
    random_start: bool = True  # one fixed uniform start per probe example, shared by all controls
    search: str = "exhaustive"
    trials: int = 30  # TPE trials (search=tpe)
    probe_batches: int = 4
    probe_batch_size: int | None = None  # null: the run's batch_size (the update's gradient scale)
    seed: int = 0  # picks the probe examples and their random starts (own generator)


class InnerControl(NamedTuple):
    """One point of G: PGD with ``steps`` (K) sign steps of ``step_size`` (alpha)."""

    steps: int
    step_size: float


@dataclass(frozen=True)
class ControlGrid:
    """The finite set G; ``axes`` is (steps, step_sizes) when G is their product (TPE uses it)."""

    controls: tuple[InnerControl, ...]
    axes: tuple[tuple[int, ...], tuple[float, ...]] | None = None


def control_grid(node: Any) -> ControlGrid:
    """G from a checked ``eval.criterion`` node (or any object with the same fields)."""
    if node.pairs is not None:
        pairs = [InnerControl(int(k), float(a)) for k, a in node.pairs]
        return ControlGrid(tuple(dict.fromkeys(pairs)))
    steps = tuple(dict.fromkeys(int(k) for k in node.steps))
    if node.step_sizes is None:
        tau = float(node.tau)
        return ControlGrid(tuple(InnerControl(k, tau / k) for k in steps))
    sizes = tuple(dict.fromkeys(float(a) for a in node.step_sizes))
    controls = tuple(InnerControl(k, a) for k in steps for a in sizes)
    return ControlGrid(controls, axes=(steps, sizes))


def _int_list(cfg: DictConfig, key: str, values: Any) -> list[int]:
    require(
        isinstance(values, (list, tuple)) or OmegaConf.is_list(values),
        key,
        values,
        "a non-empty list of step counts K >= 1, e.g. [5, 10, 20, 40]",
    )
    items = list(values)
    ok = bool(items) and all(type(k) is int and k >= 1 for k in items)
    require(ok, key, items, "a non-empty list of step counts K >= 1, e.g. [5, 10, 20, 40]")
    return items


def _budget(key: str, value: Any) -> float:
    number = as_float(key, value)
    require(number > 0, key, value, "must be > 0")
    return number


def normalise_criterion(cfg: DictConfig) -> None:
    """Fill ``eval.criterion``'s null defaults and turn its budgets into floats, in place.

    eps: the run's ``method.eps`` (else the threat model's); tau: the threat model's K * alpha;
    probe_batch_size: the run's batch size.  Values that cannot be read as numbers raise here; the
    ranges are :func:`check_criterion`'s.
    """
    node = OmegaConf.select(cfg, NODE)
    if node is None:
        return
    if OmegaConf.is_list(node.step_sizes) and len(node.step_sizes) > 0:
        floats = [_budget(f"{NODE}.step_sizes", a) for a in node.step_sizes]
        OmegaConf.update(cfg, f"{NODE}.step_sizes", floats)
    if node.tau is None:
        threat = cfg.dataset.threat
        tau = as_float("dataset.threat.step_size", threat.step_size) * int(threat.steps)
        OmegaConf.update(cfg, f"{NODE}.tau", tau)
    else:
        OmegaConf.update(cfg, f"{NODE}.tau", as_float(f"{NODE}.tau", node.tau))
    if node.pairs is not None:
        OmegaConf.update(cfg, f"{NODE}.pairs", _pairs(node.pairs))
    eps = node.eps
    if eps is None:
        eps = OmegaConf.select(cfg, "method.eps", default=None)
        eps = cfg.dataset.threat.eps if eps is None else eps
    OmegaConf.update(cfg, f"{NODE}.eps", as_float(f"{NODE}.eps", eps))
    if node.probe_batch_size is None:
        OmegaConf.update(cfg, f"{NODE}.probe_batch_size", int(cfg.batch_size))


def check_criterion(cfg: DictConfig) -> None:
    """Validate ``eval.criterion`` of a normalised run config (reads only).

    Raises :class:`ConfigError` naming ``eval.criterion.<key>``. A config without the node (a
    checkpoint from before it existed) passes unchanged.
    """
    node = OmegaConf.select(cfg, NODE)
    if node is None:
        return
    require(isinstance(node.enabled, bool), f"{NODE}.enabled", node.enabled, "true or false")
    at_least(cfg, f"{NODE}.every", 1)
    gamma = node.gamma
    require(
        isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma >= 0,
        f"{NODE}.gamma",
        gamma,
        "must be a number >= 0 (the paper's Table 1 uses 0.04)",
    )
    _int_list(cfg, f"{NODE}.steps", node.steps)
    if node.step_sizes is not None:
        sizes = node.step_sizes
        require(
            OmegaConf.is_list(sizes) and len(sizes) > 0,
            f"{NODE}.step_sizes",
            sizes,
            "null (alpha = tau / K) or a non-empty list of step sizes, e.g. [0.01, 2/255]",
        )
    positive_budget(cfg, f"{NODE}.tau")
    positive_budget(cfg, f"{NODE}.eps", upper=1.0)
    require(
        isinstance(node.random_start, bool),
        f"{NODE}.random_start",
        node.random_start,
        "true or false",
    )
    one_of(cfg, f"{NODE}.search", SEARCHES)
    at_least(cfg, f"{NODE}.trials", 1)
    at_least(cfg, f"{NODE}.probe_batches", 1)
    at_least(cfg, f"{NODE}.probe_batch_size", 1)
    if not node.enabled:
        return
    method = OmegaConf.select(cfg, "method.name")
    require(
        method in CRITERION_METHODS,
        f"{NODE}.enabled",
        True,
        f"C scores a PGD control (K, alpha): use method=pgd or method=amata (got {method})",
    )
    if node.search == "tpe":
        require(
            importlib.util.find_spec("optuna") is not None,
            f"{NODE}.search",
            "tpe",
            "optuna is not installed; pip install 'amata-runner[criterion]' or use "
            f"{NODE}.search=exhaustive",
        )


def _pairs(pairs: Any) -> list[list[Any]]:
    key = f"{NODE}.pairs"
    allowed = "null or a non-empty list of [K, alpha] pairs, e.g. [[10, 0.04], [40, 0.01]]"
    require(OmegaConf.is_list(pairs) and len(pairs) > 0, key, pairs, allowed)
    checked: list[list[Any]] = []
    for pair in pairs:
        if not (OmegaConf.is_list(pair) and len(pair) == 2):
            raise ConfigError(key, OmegaConf.to_container(pairs), allowed)
        k, alpha = pair
        require(isinstance(k, int) and not isinstance(k, bool) and k >= 1, key, list(pair), allowed)
        checked.append([k, _budget(key, alpha)])
    return checked
