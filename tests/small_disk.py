"""A small real filesystem that a test can fill and free: a tmpfs of a few MB (mounting needs root)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path


class SmallDisk:
    """A tmpfs of `size_kb` KiB mounted at `path` while in use; `fill()` takes every free byte, `free()` gives
    them back. A real ENOSPC from the kernel, for the code under test and for any process it starts."""

    def __init__(self, path: Path, size_kb: int = 4096) -> None:
        self.path = Path(path)
        self.size_kb = size_kb
        self._filler = self.path / ".filler"

    def __enter__(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k,mode=0755", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
            text=True,
        )
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "--lazy", str(self.path)], check=False, capture_output=True)

    def fill(self) -> int:
        """Write a file until the disk refuses another byte; the bytes it took."""
        taken = 0
        chunk = b"\0" * 65536
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    n = os.write(fd, chunk if len(chunk) > 1 else b"\0")
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        return taken
                    chunk = chunk[: len(chunk) // 2]
                    continue
                taken += n
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize
