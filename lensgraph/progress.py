"""A progress bar over the pass pipeline (tqdm on stderr; silent when disabled or not a TTY)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, enabled: bool = True, total: int | None = None, desc: str = "passes"):
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.desc, self.bar = total, desc, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="pass", leave=False, file=sys.stderr)
        return self

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
            self.bar.update(1)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
