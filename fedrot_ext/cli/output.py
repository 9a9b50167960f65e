"""Write the aggregated adapter atomically: a temporary directory next to OUT_DIR, then one rename.

What the command may replace is decided here, once: with ``--overwrite``, only an OUT_DIR that is an
adapter directory (the files this command or peft's ``save_pretrained`` write, nothing else) and none
of the inputs, nor holding one. Replacing it is one atomic exchange of the two directories
(``renameat2(RENAME_EXCHANGE)``), so OUT_DIR holds the old or the new adapter at every instant; where
the file system cannot exchange, the old adapter is moved aside to ``.OUT_DIR.old-*`` first, and a
later run puts a leftover of an interrupted swap back before anything else. An interrupted run leaves
at most a hidden ``.OUT_DIR.tmp-*`` directory, never a half-written OUT_DIR.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

import torch

from ..peft.io import ADAPTER_FILE
from .adapters import CONFIG_FILE, InputError

BASE_DELTAS_FILE = "base_deltas.safetensors"


# What an adapter directory holds (peft's save_pretrained adds a README.md): all that --overwrite may remove.
ADAPTER_DIR_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", BASE_DELTAS_FILE, "README.md"})


def _parent(out: Path) -> Path:
    return out.parent if str(out.parent) else Path(".")


def _inside(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or lies under it (both resolved)."""
    return path == root or root in path.parents


def recover_interrupted_swap(out: Path) -> Optional[str]:
    """Put back an OUT_DIR that an interrupted swap left in ``.OUT_DIR.old-*`` (only when OUT_DIR is
    missing); returns what was done, for one line on stderr, or None."""
    leftovers = sorted(_parent(out).glob(f".{out.name}.old-*/{out.name}"))
    if not leftovers or out.exists():
        return None
    os.replace(leftovers[-1], out)
    shutil.rmtree(leftovers[-1].parent, ignore_errors=True)
    return f"{out}: restored the previous adapter from an interrupted run ({leftovers[-1].parent.name})"


def check_writable(out: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse before any work: an existing OUT_DIR (unless `overwrite`, and then only an adapter directory
    that is none of the `inputs` and holds none of them), a missing or unwritable parent."""
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory")
        target = out.resolve()
        for path in inputs:
            if _inside(Path(path).resolve(), target):
                raise InputError(f"{out}: holds the input {path}; --overwrite replaces only an adapter directory that is "
                                 "none of the inputs")
        entries = sorted(p.name for p in out.iterdir())
        foreign = [name for name in entries if name not in ADAPTER_DIR_FILES or not (out / name).is_file()]
        if foreign or "adapter_model.safetensors" not in entries:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "") if foreign else "no adapter_model.safetensors"
            raise InputError(f"{out}: not an adapter directory ({shown}); --overwrite replaces only a directory holding "
                             f"{', '.join(sorted(ADAPTER_DIR_FILES))}")
    parent = _parent(out)
    if not parent.is_dir():
        raise InputError(f"{parent}: parent directory of --out does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: not writable (needed for {out})")


def check_report_path(report: Path, overwrite: bool, inputs: Iterable[Path], out: Path) -> None:
    """Refuse a --report path that exists (unless `overwrite`), lies in an input directory or in OUT_DIR,
    or cannot be written."""
    target = report.resolve()
    for root in [*inputs, out]:
        if _inside(target, Path(root).resolve()):
            raise InputError(f"{report}: lies in {root}; write the report outside the input and output directories")
    if report.exists() and not overwrite:
        raise InputError(f"{report}: already exists (pass --overwrite to replace it)")
    if report.exists() and not report.is_file():
        raise InputError(f"{report}: exists and is not a file")
    if not _parent(report).is_dir() or not os.access(_parent(report), os.W_OK | os.X_OK):
        raise InputError(f"{_parent(report)}: not a writable directory (needed for {report})")


def stage_text_file(path: Path, text: str) -> Path:
    """`text` in a temporary file beside `path`, to be put in place with os.replace; returns that file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=_parent(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _contiguous(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_adapter(out: Path, state: Mapping[str, torch.Tensor], config: dict, base_deltas: Mapping[str, torch.Tensor], overwrite: bool) -> None:
    """OUT_DIR with adapter_config.json, adapter_model.safetensors and, when non-empty, base_deltas.safetensors
    ({module path: ΔW in the base weight's layout, already scaled}; fold with fedrot_ext.fold_into_base)."""
    from safetensors.torch import save_file

    parent = _parent(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; OUT_DIR follows the umask like mkdir
        save_file(_contiguous(state), str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if base_deltas:
            save_file(_contiguous(base_deltas), str(tmp / BASE_DELTAS_FILE), metadata={"format": "pt"})
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):  # --overwrite: old and new swap places in one step; tmp now holds the old one
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # no atomic exchange here: the old one moves aside first (recover_interrupted_swap puts it back)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise InputError(f"{out}: could not write ({err})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
