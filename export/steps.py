"""Progress lines on stderr, `[keras-bn] step ...` then `step: done in 1.2s`: what the command
line prints, and what `to_onnx(verbose=1)` prints."""

from __future__ import annotations

import sys
import time


def say(message):
    print(f"[keras-bn] {message}", file=sys.stderr, flush=True)


class Step:
    """Prints a step on stderr with its duration."""

    def __init__(self, message):
        self.message = message

    def __enter__(self):
        say(f"{self.message} ...")
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if exc[0] is None:
            say(f"{self.message}: done in {time.perf_counter() - self.start:.1f}s")


class Steps:
    """Called with each step's name: ends the step before it (printing its duration) and starts
    the next; leaving the `with` block ends the last one."""

    def __init__(self):
        self.current = None

    def __call__(self, message):
        self._end()
        self.current = Step(message)
        self.current.__enter__()

    def _end(self):
        if self.current is not None:
            self.current.__exit__(None, None, None)
            self.current = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self._end()
