"""A tqdm progress bar over training iterations that never forces a device sync.

The postfix (K, errors) is only updated at evaluation points, where the numbers are already on the
host; by default the bar is shown only when stderr is a terminal, so logs of batch jobs stay clean
(they get plain lines instead: :mod:`amata_runner.logging.progress`).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool | None, desc: str) -> None:
        self.shown = sys.stderr.isatty() if enabled is None else bool(enabled)
        self._bar = tqdm(
            total=total,
            initial=initial,
            disable=not self.shown,
            desc=desc,
            unit="it",
            dynamic_ncols=True,
        )

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def show(self, values: dict[str, Any]) -> None:
        self._bar.set_postfix(values, refresh=False)

    def evaluating(self, what: str) -> None:
        """Training is done: say what the bar, sitting at 100%, is waiting for."""
        self._bar.set_description_str(f"evaluating {what}", refresh=True)

    def close(self) -> None:
        self._bar.close()
