"""A tqdm progress bar over training iterations that never forces a device sync.

The postfix (K, errors) is only updated at evaluation points, where the numbers are already on the
host; by default the bar is shown only when stderr is a terminal, so logs of batch jobs stay clean.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool | None, desc: str) -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm(
            total=total, initial=initial, disable=not show, desc=desc, unit="it", dynamic_ncols=True
        )

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def show(self, values: dict[str, Any]) -> None:
        self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self._bar.close()
