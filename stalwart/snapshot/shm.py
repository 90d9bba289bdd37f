"""Named shared-memory regions that outlive the processes writing into them.

A region is a file under `/dev/shm` (a RAM-backed tmpfs; elsewhere a directory under the temp
dir, or `$STALWART_SHM_DIR`, which `snapshot.shm_dir` sets for a job's processes) mapped with
`mmap`. On a tmpfs mounted with `huge=within_size` (or `always`) a region is made of 2 MiB pages:
creating and freeing one then cost a few hundredths of what 4 KiB pages cost, and reading it
back about half (`describe_dir` says which kind a directory has). The snapshot manager creates a job's regions and
trainers attach to them. Unlike `multiprocessing.shared_memory`, attaching registers nothing with
a resource tracker: when a trainer dies (even by SIGKILL) the region and the snapshot in it stay,
which is the whole point. Only `Region.unlink()` or `remove_regions(prefix)` deletes one.

Region names carry the job id as a prefix (`region_name(job_id, ...)`) so every region of a job
can be listed and removed after it ends or crashes.

On CUDA hosts a mapping can be page-locked with `cudaHostRegister` so device-to-host copies into
it run asynchronously at full PCIe bandwidth, without a second staging copy.
"""

from __future__ import annotations

import mmap
import os
import re
import tempfile
from pathlib import Path

import numpy as np

NAME_PREFIX = "stalwart-"
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CUDA_HOST_REGISTER_PORTABLE = 1
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only


SHM_DIR_ENV = "STALWART_SHM_DIR"


def shm_dir() -> Path:
    """Where regions live: $STALWART_SHM_DIR, else /dev/shm, else <tmp>/stalwart-shm."""
    configured = os.environ.get(SHM_DIR_ENV)
    if configured:
        path = Path(configured)
    elif os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = Path("/dev/shm")
    else:
        path = Path(tempfile.gettempdir()) / "stalwart-shm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def env_vars(configured: str = "") -> dict[str, str]:
    """The environment a job's remote processes need to find its regions: `configured`
    (`snapshot.shm_dir`) or this process's $STALWART_SHM_DIR; empty for the default."""
    directory = configured or os.environ.get(SHM_DIR_ENV, "")
    return {SHM_DIR_ENV: directory} if directory else {}


def check_dir(directory: str | Path) -> Path:
    """`directory` if it exists, this process may create files in it, and it is not on a disk
    filesystem (per `describe_dir`; an unknown one passes); else a ValueError that names
    `snapshot.shm_dir` and the fix."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(
            f"snapshot.shm_dir={str(directory)!r} is not a directory on this node: create it on "
            "every node (a tmpfs: mount -t tmpfs -o huge=within_size,size=<bytes> tmpfs <dir>) "
            "or leave snapshot.shm_dir empty for /dev/shm"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(
            f"snapshot.shm_dir={str(directory)!r} is not writable by this process (uid "
            f"{os.getuid()}): change its permissions or choose another directory"
        )
    backing = describe_dir(path)
    if backing["in_memory"] is False:
        # Regions there would be file mappings of a disk: every snapshot written back to it,
        # and writers throttled while it catches up (training stalls).
        raise ValueError(
            f"snapshot.shm_dir={str(directory)!r} is on {backing['fs_type']}, not "
            "in memory: use a tmpfs directory (/dev/shm, or mount -t tmpfs -o "
            "huge=within_size,size=<bytes> tmpfs <dir>)"
        )
    return path


# Filesystems whose files live in memory: a region elsewhere is paged to a disk.
_RAM_FILESYSTEMS = {"tmpfs", "ramfs", "hugetlbfs"}


def describe_dir(directory: str | Path | None = None, mountinfo: str | None = None) -> dict:
    """What backs `directory` (default `shm_dir()`): {"path", "fs_type", "in_memory",
    "huge_pages"}. `huge_pages` is the tmpfs `huge=` mount option ("never" when absent; a
    hugetlbfs mount counts as "always"), None when unknown. `mountinfo`: the text of
    /proc/self/mountinfo (read when None; on a system without it, everything is unknown)."""
    path = os.path.realpath(directory if directory is not None else shm_dir())
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as handle:
                mountinfo = handle.read()
        except OSError:
            mountinfo = ""
    best: tuple[str, str, str] | None = None  # mount point, fs type, super options
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        _, _, tail = line.partition(" - ")
        tail_fields = tail.split()
        if len(tail_fields) < 3:
            continue
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        # The longest mount point holding the path wins; of equal ones, the last (on top).
        if inside and (best is None or len(mount_point) >= len(best[0])):
            best = (mount_point, tail_fields[0], tail_fields[2])
    if best is None:
        return {"path": path, "fs_type": None, "in_memory": None, "huge_pages": None}
    _, fs_type, options = best
    huge = None
    if fs_type == "tmpfs":
        huge = "never"
        for option in options.split(","):
            if option.startswith("huge="):
                huge = option.partition("=")[2]
    elif fs_type == "hugetlbfs":
        huge = "always"
    return {
        "path": path,
        "fs_type": fs_type,
        "in_memory": fs_type in _RAM_FILESYSTEMS,
        "huge_pages": huge,
    }


def describe_text(description: dict) -> str:
    """One line for the job's log: where the regions live and whether that is the fast kind."""
    path, fs_type = description["path"], description["fs_type"]
    if fs_type is None:
        return f"snapshot regions in {path} (filesystem unknown)"
    if not description["in_memory"]:
        return (
            f"snapshot regions in {path} ({fs_type}): NOT in memory, so snapshots are paged to "
            "disk; set snapshot.shm_dir to a tmpfs (e.g. /dev/shm)"
        )
    huge = description["huge_pages"]
    if huge in ("always", "within_size", "force"):
        return f"snapshot regions in {path} ({fs_type}, 2 MiB pages: huge={huge})"
    return (
        f"snapshot regions in {path} ({fs_type}, 4 KiB pages); a tmpfs mounted with "
        "huge=within_size allocates and reads them faster (snapshot.shm_dir)"
    )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _VALID_NAME.match(name):
        raise ValueError(
            f"shared-memory region name {name!r} is invalid: use letters, digits, '.', '_' and "
            "'-' only, starting with a letter or digit (it becomes a file name)"
        )


def job_prefix(job_id: str) -> str:
    """The name prefix every region of `job_id` carries."""
    _check_name(str(job_id))
    return f"{NAME_PREFIX}{job_id}-"


def region_name(job_id: str, *parts: object) -> str:
    """`stalwart-<job_id>-<part>-<part>...`, e.g. region_name("run7", "rank3", "slot1")."""
    name = job_prefix(job_id) + "-".join(str(part) for part in parts)
    _check_name(name)
    return name


class Region:
    """One mapped region. `buffer` is a writable memoryview, `array` a numpy uint8 view of it."""

    def __init__(self, name: str, path: Path, nbytes: int, mapping: mmap.mmap, owner: bool):
        self.name = name
        self.path = path
        self.nbytes = nbytes
        self.owner = owner
        self._mapping: mmap.mmap | None = mapping
        self.buffer: memoryview | None = memoryview(mapping)
        self.array: np.ndarray | None = np.frombuffer(mapping, dtype=np.uint8)
        self.cuda_registered = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes"
        return f"Region({self.name!r}, {state}, owner={self.owner})"

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def register_cuda(self) -> bool:
        """Page-lock the mapping for CUDA (async D2H copies). False when no CUDA device is present."""
        if self.cuda_registered:
            return True
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            return False
        if not torch.cuda.is_available():
            return False
        error = torch.cuda.cudart().cudaHostRegister(
            self.array.ctypes.data, self.nbytes, _CUDA_HOST_REGISTER_PORTABLE
        )
        if int(error) != 0:
            raise RuntimeError(
                f"cudaHostRegister of region {self.name!r} ({self.nbytes} bytes) failed with CUDA "
                f"error {int(error)}; check the memlock limit (ulimit -l)"
            )
        self.cuda_registered = True
        return True

    def close(self) -> None:
        """Unmap (never unlinks). Views handed out earlier keep the mapping alive until they go."""
        if self._mapping is None:
            return
        if self.cuda_registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.array.ctypes.data)
            self.cuda_registered = False
        mapping, self._mapping = self._mapping, None
        self.buffer.release()
        self.buffer = None
        self.array = None
        try:
            mapping.close()
        except BufferError:
            # Someone still holds a view (a restored tensor): the mmap object unmaps itself when
            # the last view is garbage-collected, so dropping our reference is enough.
            pass

    def rename(self, name: str) -> None:
        """Give the region a new name (the same memory, still mapped): a standby's reserved
        region becomes a position's slot without a copy. Fails if the name exists."""
        path = _path_of(name)
        if path.exists():
            raise FileExistsError(f"shared-memory region {name!r} already exists at {path}")
        os.rename(self.path, path)
        self.name, self.path = name, path

    def unlink(self) -> None:
        """Delete the region's name; the memory goes once every mapping of it is closed."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Memory reserved ahead of a failure (standby slots, standby optimizer state) must leave at
# least this fraction of the host's memory available: a reservation never causes an OOM.
RESERVE_HEADROOM_FRACTION = 0.25


def can_reserve(nbytes: int) -> bool:
    """Whether `nbytes` more can be set aside on this host and still leave
    RESERVE_HEADROOM_FRACTION of its memory available (Linux /proc/meminfo; True elsewhere)."""
    try:
        fields = {}
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, _, value = line.partition(":")
                fields[key] = int(value.split()[0]) * 1024
        total, available = fields["MemTotal"], fields["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return True
    return available - nbytes >= RESERVE_HEADROOM_FRACTION * total


def _path_of(name: str) -> Path:
    _check_name(name)
    return shm_dir() / name


def create_region(name: str, nbytes: int, *, register_cuda: bool = False) -> Region:
    """Create, size and map a new region (fails if the name exists).

    The pages are reserved up front with posix_fallocate: a full /dev/shm then fails here with a
    clear error instead of killing a later writer with SIGBUS.
    """
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"region {name!r}: nbytes must be a positive int, got {nbytes!r}")
    path = _path_of(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"shared-memory region {name!r} already exists at {path}; attach to it, or remove "
            "the job's stale regions with remove_regions(prefix)"
        ) from None
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as error:
            raise MemoryError(
                f"cannot reserve {nbytes} bytes for region {name!r} in {path.parent}: "
                f"{error.strerror}; free memory there or lower the snapshot size"
            ) from None
        mapping = mmap.mmap(
            fd,
            nbytes,
            flags=mmap.MAP_SHARED | _MAP_POPULATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)  # the mapping keeps the file open
    region = Region(name, path, nbytes, mapping, owner=True)
    if register_cuda:
        region.register_cuda()
    return region


def attach_region(name: str, *, register_cuda: bool = False) -> Region:
    """Map an existing region read-write. Closing it, or dying, never removes it."""
    path = _path_of(name)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"shared-memory region {name!r} does not exist in {path.parent}; the snapshot "
            "manager creates it (is it running on this node?)"
        ) from None
    try:
        nbytes = os.fstat(fd).st_size
        if nbytes == 0:
            raise ValueError(f"shared-memory region {name!r} at {path} is empty")
        # Populated now (as at creation): a trainer copies its whole state into the region, and
        # 4 KiB page faults on first touch would otherwise land in that copy.
        mapping = mmap.mmap(
            fd,
            nbytes,
            flags=mmap.MAP_SHARED | _MAP_POPULATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    finally:
        os.close(fd)
    region = Region(name, path, nbytes, mapping, owner=False)
    if register_cuda:
        region.register_cuda()
    return region


class RegionReader:
    """Reads a region's bytes with pread, without mapping it: a restore that reads the region
    once into its own tensors saves setting up (and tearing down) a page-table entry per 4 KiB
    of the mapping. A context manager; closing it never removes the region."""

    def __init__(self, name: str):
        path = _path_of(name)
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shared-memory region {name!r} does not exist in {path.parent}; the snapshot "
                "manager creates it (is it running on this node?)"
            ) from None
        self.name = name
        self.nbytes = os.fstat(self.fd).st_size

    def read_into(self, offset: int, target: memoryview) -> None:
        """Fill `target` with the bytes at `offset` (all of them, or EOFError)."""
        done, total = 0, len(target)
        while done < total:
            moved = os.preadv(self.fd, [target[done:]], offset + done)
            if moved <= 0:
                raise EOFError(
                    f"region {self.name!r} ends at {self.nbytes} bytes; asked for "
                    f"{offset}..{offset + total}"
                )
            done += moved

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_regions(prefix: str, directory: str | Path | None = None) -> list[str]:
    """Names of existing regions starting with `prefix` (e.g. `job_prefix(job_id)`), in
    `directory` (default `shm_dir()`)."""
    if not prefix:
        raise ValueError("list_regions needs a non-empty prefix (use job_prefix(job_id))")
    directory = Path(directory) if directory else shm_dir()
    if not directory.is_dir():
        return []
    return sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False)
    )


def remove_regions(prefix: str, directory: str | Path | None = None) -> list[str]:
    """Unlink every region whose name starts with `prefix` (in `directory`, default
    `shm_dir()`); returns the names removed."""
    directory = Path(directory) if directory else shm_dir()
    removed = []
    for name in list_regions(prefix, directory):
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed
