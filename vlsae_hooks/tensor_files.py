"""Tensor files written as other files are: readable by whoever the user's umask lets read them.

safetensors' ``save_file`` (and ``tempfile.mkstemp``) make owner-only files (mode 0600, whatever
the umask): a space, readout or activation shard written so could not be read by the rest of a lab
sharing a data folder, while the config.json beside it could. Every tensor file the package writes
goes through ``save_tensors`` (a single file through ``save_tensors_atomically``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def user_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only be read by setting
    it, which another thread's file could catch half-way); 0o022 where the system does not
    say."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0o022
    found = re.search(r"^Umask:\s*([0-7]+)$", status, re.MULTILINE)
    return int(found.group(1), 8) if found else 0o022


def as_umask_allows(path: str | Path) -> None:
    """Give file ``path`` the permissions a newly created file gets under the umask."""
    os.chmod(path, 0o666 & ~user_umask())


def save_tensors(tensors: dict[str, Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, the file's permissions then set by the umask."""
    save_file(tensors, str(path), metadata=metadata)
    as_umask_allows(path)


def save_tensors_atomically(tensors: dict[str, Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """``save_tensors`` into a hidden file beside ``path`` (``.<name>.tmp``), then one rename:
    whoever reads ``path`` (a resumed run, another process) finds the previous file or the
    whole new one, never part of one, even when the process is killed mid-write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_tensors(tensors, tmp, metadata)
    os.replace(tmp, path)
