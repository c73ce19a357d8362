"""The final evaluation: clean accuracy and every ``eval.final_attacks`` on the whole test set.

It runs after training, in fp32, and it can be long (CW-L2 with 100 Adam steps on ImageNet), so
it must survive a stop signal like training does: its per-batch progress is written as it goes and
a resumed run finishes it with the numbers an uninterrupted one would give.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from amata_runner.attacks.suite import merge_results, run_suite
from amata_runner.build import Run
from amata_runner.data import ImageSet, eval_batches
from amata_runner.logging.metrics import write_json_atomic
from amata_runner.runtime.interrupts import Preempted, StopRequests

FINAL_EVAL_PARTIAL = "final_eval.partial.json"
FINAL_EVAL_CHUNK = 4096  # test images decoded at once for the folder datasets' final evaluation


def final_attack_names(cfg: DictConfig) -> list[str]:
    """``clean`` first, then each final attack once."""
    return ["clean", *(n for n in cfg.eval.final_attacks if n != "clean")]


def final_evaluation(
    cfg: DictConfig,
    run: Run,
    run_dir: Path,
    iteration: int,
    stop: StopRequests,
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Clean accuracy and each of ``eval.final_attacks`` on the whole test set (fp32), for the
    model trained for ``iteration`` iterations; ``should_stop`` is asked after every batch."""
    names = final_attack_names(cfg)
    # Small sets are one chunk already on the device; folder sets are decoded in chunks.
    chunk = len(run.test_set) if isinstance(run.test_set, ImageSet) else FINAL_EVAL_CHUNK
    store = FinalEvalStore(
        run_dir / FINAL_EVAL_PARTIAL,
        iteration,
        stop,
        should_stop,
        write=run.job.is_main,
    )
    parts, offset = [], 0
    for images, labels in eval_batches(run.test_set, chunk, run.device):
        store.offset = offset
        parts.append(
            run_suite(
                run.model,
                images,
                labels,
                names,
                run.final_options,
                batch_size=cfg.eval.batch_size,
                seed=cfg.eval.seed,
                offset=offset,
                store=store,
            )
        )
        offset += int(labels.shape[0])
    store.discard()
    results = {name: merge_results([part[name] for part in parts]) for name in names}
    robust = {name: r for name, r in results.items() if name != "clean"}
    return {
        "examples": results["clean"]["examples"],
        "clean_accuracy": results["clean"]["accuracy"],
        "robust_accuracy": {name: r["accuracy"] for name, r in robust.items()},
        "attacks": {name: r["params"] for name, r in robust.items()},
    }


class FinalEvalStore:
    """The final evaluation's per-batch progress, so a stop signal during it loses nothing.

    After every batch the counts so far are written to ``final_eval.partial.json`` (atomically);
    then, if a stop was requested, the run ends as preempted. ``resume=true`` reloads the last
    checkpoint (training is complete), and the suite continues each attack at the batch where it
    stopped: every batch is seeded on its own, so the result equals an uninterrupted one. Entries
    belong to one model (the checkpoint's iteration); others are ignored.
    """

    def __init__(
        self,
        path: Path,
        iteration: int,
        stop: StopRequests,
        should_stop: Callable[[], bool],
        *,
        write: bool,
    ) -> None:
        self.path, self.iteration, self.write = path, iteration, write
        self.stop, self.should_stop = stop, should_stop
        self.offset = 0
        saved = _read_json(path) if write else None
        ok = isinstance(saved, dict) and saved.get("iteration") == iteration
        self.partial: dict[str, Any] = saved["partial"] if ok else {}

    def load(self, name: str) -> dict[str, Any] | None:
        return self.partial.get(f"{self.offset}:{name}")

    def save(self, name: str, state: dict[str, Any]) -> None:
        self.partial[f"{self.offset}:{name}"] = state
        if self.write:
            with self.stop.deferred():
                write_json_atomic(self.path, {"iteration": self.iteration, "partial": self.partial})
        if self.should_stop():
            raise Preempted(
                self.stop.signum or 0,
                "during the final evaluation (training is complete and saved; the evaluation "
                "continues where it stopped)",
            )

    def discard(self) -> None:
        if self.write:
            self.path.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
