"""Writing files so that no work is lost and nothing is half-written: atomic replaces, the user's file
permissions for safetensors files, and one rule for output folders.

- `write_atomically` writes beside the target and renames over it, so a reader sees the old file or the new
  one, never a truncated one (the feature cache, results JSON, heads, converted datasets).
- safetensors writes its files with mode 0600 whatever the umask; `save_safetensors` and
  `match_umask` give them the permissions every other file gets.
- `check_output_folder`: a command that writes a folder refuses a non-empty one that is not its own unless
  told to overwrite, and says which files it would replace.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .validation import CopaValueError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def match_umask(*paths: str | os.PathLike[str]) -> None:
    """Give files the permissions a newly created file gets under the process umask (0644 by default)."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """`write(temporary)` beside `path`, then rename it over `path` (atomic on POSIX and Windows); the
    result has the umask's permissions. A failure leaves `path` as it was and no temporary file behind."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        match_umask(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, written atomically and with the umask's permissions."""
    from safetensors.torch import save_file

    write_atomically(
        path, lambda temporary: save_file(dict(tensors), str(temporary), metadata=dict(metadata or {}))
    )


def check_output_folder(
    folder: str | os.PathLike[str], writes: Iterable[str], overwrite: bool, flag: str = "--overwrite"
) -> Path:
    """The output folder of a command that writes the files `writes` into it.

    A folder that does not exist or is empty is fine. A non-empty one is refused (before any work is done)
    unless `overwrite`, naming what is in it; with `overwrite`, only the command's own files are replaced
    and anything else in the folder is left alone.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CopaValueError(f"The output path {str(folder)!r} is a file; give a folder to write into.")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present and not overwrite:
        replaced = sorted(set(present) & set(writes))
        what = f"; it would replace {', '.join(replaced)}" if replaced else ""
        raise CopaValueError(
            f"The output folder {str(folder)!r} is not empty (it holds {_few(present)}{what}). Give a new or "
            f"empty folder, or pass {flag} to replace the files this command writes (other files are kept)."
        )
    return folder


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
