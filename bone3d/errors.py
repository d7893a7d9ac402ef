"""The one error type for bad input.

Every problem with what a user hands bone3d (a file that cannot be read, a volume with the wrong
number of dimensions, NaN voxels, missing spacing, an empty mask, ...) raises `InputError`, whose
message names the offending file (or argument) and the reason. The CLI turns it into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad user input. ``str(err)`` is ``"<source>: <reason>"``."""

    def __init__(self, source: str | os.PathLike | None, reason: str):
        self.source = None if source is None else str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}" if self.source else reason)
