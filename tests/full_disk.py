"""A spill directory whose disk can be made full, for unit tests: an opener with `open`'s signature."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path


class FullDisk:
    """Opens real files; while `full` is set every write raises ENOSPC, after taking `partial` bytes."""

    def __init__(self, error: int = errno.ENOSPC) -> None:
        self.error = error  # what a refused write raises: ENOSPC, or EIO for a failing disk
        self.full = False
        self.partial = 0  # bytes a write still takes before the disk is full: leaves a torn line to clean
        self.refused = 0  # writes refused

    def __call__(self, path: Path | str, mode: str = "r", buffering: int = -1, **kwargs):
        f = open(path, mode, buffering=buffering, **kwargs)  # noqa: SIM115 - the caller closes it
        return _Writes(f, self) if "a" in mode or "w" in mode else f


class _Writes(io.RawIOBase):
    def __init__(self, f, disk: FullDisk) -> None:
        self._f = f
        self._disk = disk

    def write(self, data) -> int:
        if self._disk.full:
            if self._disk.partial:
                taken = self._f.write(bytes(data)[: self._disk.partial])
                self._disk.partial = 0
                return taken
            self._disk.refused += 1
            raise OSError(self._disk.error, f"{os.strerror(self._disk.error)} (test)")
        return self._f.write(data)

    def fileno(self) -> int:
        return self._f.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        return self._f.truncate(size)

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()
        super().close()
