"""Loading DeepSpeed's JIT-compiled ops without hanging on a dead build.

DeepSpeed compiles its CPU ops on first use through `torch.utils.cpp_extension.load`, which
guards each build directory with a bare `lock` file: the builder creates it, every other
process polls until it disappears. A builder killed mid-build leaves the file behind and every
later load waits forever. `load_op` removes such a lock when no process is building in that
directory (ninja runs with the build directory as its working directory), bounds the wait on
a live one, and otherwise hands over to the builder; callers turn any exception into their
pure-Python fallback.

`python -m stalwart.offload.ops` builds both ops ahead of time (`make setup` runs it), so a
first training step or test never pays the 1-4 minute compile.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# A lock younger than this is assumed to belong to a builder still starting up (it writes the
# ninja file between creating the lock and starting ninja).
_LOCK_GRACE_S = 60.0
_POLL_S = 1.0


def build_directory(name: str) -> Path:
    """Where torch builds (and caches) the extension `name`."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, False))


def _build_running_in(directory: Path) -> bool | None:
    """Whether a process works in `directory` (ninja does during a build); None if unknowable."""
    target = os.path.realpath(directory)
    readable = False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        readable = True
        if cwd == target:
            return True
    return False if readable else None


def clear_stale_lock(directory: Path, *, grace_s: float = _LOCK_GRACE_S) -> bool:
    """Remove `directory/lock` if its builder is gone; True when one was removed."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < grace_s:
        return False
    running = _build_running_in(directory)
    if running is None:
        # Without /proc the only evidence is age: no build here takes an hour.
        running = age < 3600.0
    if running:
        return False
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    logger.warning("removed a stale build lock %s (%.0f s old, no build running there)", lock, age)
    return True


def clear_stale_locks(root: Path | None = None) -> list[Path]:
    """Clear stale locks in every extension build directory under `root` (torch's default)."""
    if root is None:
        root = build_directory("_probe").parent
    removed = []
    if root.is_dir():
        for directory in sorted(root.iterdir()):
            if directory.is_dir() and clear_stale_lock(directory):
                removed.append(directory / "lock")
    return removed


def load_op(builder, *, max_wait_s: float | None = None):
    """`builder.load()` once no live or dead build blocks its directory.

    Waits at most `max_wait_s` (default `$STALWART_OP_BUILD_WAIT_S`, else 900 s) for another
    process's build to finish, then raises TimeoutError instead of waiting forever.
    """
    if max_wait_s is None:
        max_wait_s = float(os.environ.get("STALWART_OP_BUILD_WAIT_S", "900"))
    directory = build_directory(builder.name)
    deadline = time.monotonic() + max_wait_s
    while (directory / "lock").exists():
        if clear_stale_lock(directory):
            break
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"another process has held {directory / 'lock'} for over {max_wait_s:.0f} s "
                "(raise STALWART_OP_BUILD_WAIT_S to wait longer)"
            )
        time.sleep(_POLL_S)
    return builder.load(verbose=False)


def prebuild() -> dict[str, str]:
    """Build DeepSpeed's CPU Adam and libaio ops now; returns name -> 'ok' or the failure."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder
    except Exception as error:  # DeepSpeed absent or broken: the fallbacks take over
        return {"deepspeed": f"{type(error).__name__}: {error}"}
    for builder_class in (CPUAdamBuilder, AsyncIOBuilder):
        builder = builder_class()
        try:
            if hasattr(builder, "is_compatible") and not builder.is_compatible(verbose=False):
                raise RuntimeError("not compatible with this machine (libaio-dev missing?)")
            load_op(builder)
            results[builder.name] = "ok"
        except Exception as error:
            results[builder.name] = f"{type(error).__name__}: {error}"
    return results


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    for name, outcome in prebuild().items():
        print(f"{name}: {outcome}")
    print(
        f"DeepSpeed ops ready in {time.monotonic() - started:.1f} s (failures fall back to Python)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
