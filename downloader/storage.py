"""Where a downloaded image goes: names from templates, safe paths, atomic writes.

Invariant 2 lives here: a body is streamed to ``OUTDIR/.imgdl/parts/<pid>/<token>.part``
and only ``os.replace``-d to its final path once complete and valid, so a crash at
any moment leaves either nothing or a whole file at the final path. Part files
live apart from the images (same file system, so the rename is atomic) so that
what a killed worker left behind is found without walking the output tree: the
parent removes the parts folder at the start and at the end of every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import stat
import string
from pathlib import Path
from typing import Any, Protocol, Self
from urllib.parse import unquote, urlsplit

import aiofiles
from aiofiles.threadpool.binary import AsyncBufferedIOBase

from downloader.errors import ConfigError, UnsafeNameError
from downloader.outcomes import Job
from downloader.state import ARCHIVE_DIR, STATE_DIR, TASKS_DIR
from downloader.validate import EXTENSIONS, KNOWN_SUFFIXES

PART_SUFFIX = ".part"
PARTS_DIR = f"{STATE_DIR}/parts"
TEMPLATE_FIELDS = frozenset({"url_hash", "host", "basename", "input", "line"})
_MAX_COMPONENT_BYTES = 255
# Room for ".<ext>" after the stem.
_MAX_STEM_COMPONENT_BYTES = _MAX_COMPONENT_BYTES - 8
_RESERVED_TOP = frozenset({STATE_DIR, ARCHIVE_DIR, TASKS_DIR})
# Names Windows (and SMB shares, and many sync tools) cannot hold, with any extension.
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_BASENAME = re.compile(r"[^A-Za-z0-9._-]+")


def url_hash(url: str) -> str:
    """Stable 128-bit name of a URL: the same URL lands on the same file in every run."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def check_template(template: str) -> None:
    """Raise ConfigError unless ``template`` only uses known fields and stays inside OUTDIR."""
    try:
        parsed = [(f, c) for _, f, _, c in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(
            f"bad template {template!r}: {exc} (close each field with '}}'; "
            "write '{{' or '}}' for a brace itself)"
        ) from None
    if any(conversion for _, conversion in parsed):
        raise ConfigError(
            f"bad template {template!r}: conversions like !r are not allowed (remove them)"
        )
    fields = {f for f, _ in parsed}
    unknown = {f.split(".")[0].split("[")[0] for f in fields} - TEMPLATE_FIELDS
    if unknown or any(not f or "." in f or "[" in f for f in fields):
        allowed = ", ".join(sorted(TEMPLATE_FIELDS))
        raise ConfigError(f"bad template {template!r}: unknown field; use {{{allowed}}}")
    sample = _fields(Job(url="http://example.com/a/b.jpg", input="list.txt", line=1))
    try:
        safe_relpath(template.format(**sample))
    except (ValueError, UnsafeNameError) as exc:
        raise ConfigError(
            f"bad template {template!r}: {exc} (a name is a relative path that stays inside "
            "output.dir, e.g. '{host}/{basename}')"
        ) from None


def template_fields(template: str) -> frozenset[str]:
    """The fields a (checked) template uses."""
    return frozenset(f for _, f, _, _ in string.Formatter().parse(template) if f)


def _fields(job: Job, wanted: frozenset[str] = TEMPLATE_FIELDS) -> dict[str, str | int]:
    """The template's fields for ``job``; only the ``wanted`` ones are worked out, as this
    runs for every URL."""
    found: dict[str, str | int] = {}
    if "url_hash" in wanted:
        found["url_hash"] = url_hash(job.url)
    if "host" in wanted or "basename" in wanted:
        try:
            parts = urlsplit(job.url)
            path, hostname = parts.path, parts.hostname
        except ValueError:  # checked URLs never get here; names must not raise all the same
            path, hostname = "", None
        last = unquote(path.rsplit("/", 1)[-1])
        stem = os.path.splitext(last)[0]
        found["basename"] = _UNSAFE_BASENAME.sub("_", stem).strip("._")[:100] or "image"
        found["host"] = _UNSAFE_BASENAME.sub("_", (hostname or "nohost")).strip("._") or "nohost"
    if "input" in wanted:
        found["input"] = _UNSAFE_BASENAME.sub("_", Path(job.input).name.split(".")[0] or "stdin")
    found["line"] = job.line
    return found


def safe_relpath(raw: str) -> str:
    """Normalise a relative name, refusing anything that could leave OUTDIR."""
    name = raw.replace("\\", "/")
    if _CONTROL.search(name):
        raise UnsafeNameError("name contains control characters")
    if name.startswith("/"):
        raise UnsafeNameError(f"name {raw!r} is absolute")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafeNameError("name is empty")
    for part in parts:
        if part == "..":
            raise UnsafeNameError(f"name {raw!r} climbs out with '..'")
        if len(part.encode("utf-8", "surrogatepass")) > _MAX_STEM_COMPONENT_BYTES:
            raise UnsafeNameError(f"a component of {raw!r} is longer than the file system allows")
    for part in parts:
        if part.split(".", 1)[0].upper() in _WINDOWS_DEVICES:
            raise UnsafeNameError(f"name {raw!r} uses a reserved device name ({part})")
        if part.endswith((" ", ".")):
            raise UnsafeNameError(f"name {raw!r} has a component ending in a dot or space")
    if parts[0] in _RESERVED_TOP:
        raise UnsafeNameError(f"name {raw!r} is inside imgdl's own folder {parts[0]}/")
    root, ext = os.path.splitext(parts[-1])
    if ext.lower() in KNOWN_SUFFIXES and root:
        parts[-1] = root
    return "/".join(parts)


def stem_for(job: Job, template: str, fields: frozenset[str] = TEMPLATE_FIELDS) -> str:
    """Relative path without extension; raises UnsafeNameError for a bad name column."""
    if job.name:
        return safe_relpath(job.name)
    return safe_relpath(template.format(**_fields(job, fields)))


#: Format specs that keep a field to hex digits (url_hash) or digits (line).
_PLAIN_SPECS = {"url_hash": re.compile(r"(\.\d+)?"), "line": re.compile(r"(0\d+)?d?")}


def _plain_template(template: str, fields: frozenset[str]) -> bool:
    """True for templates (the default among them) whose names need no checking: fields
    that can only be hex digits or digits (no fill character, no alternate form), around
    text that ``safe_relpath`` leaves as it is. Checking every name cost more than
    writing the image."""
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is None:
            continue
        plain = _PLAIN_SPECS.get(field)
        if plain is None or not plain.fullmatch(spec or ""):
            return False
    sample = template.format(url_hash="0" * 32, line=10**19)  # the longest names
    try:
        return safe_relpath(sample) == sample
    except UnsafeNameError:
        return False


def case_insensitive(folder: Path) -> bool:
    """Does the file system of ``folder`` treat ``A`` and ``a`` as one name?"""
    probe = folder / f".imgdl-case-{secrets.token_hex(4)}"
    probe.touch()
    try:
        return (folder / probe.name.upper()).exists()
    finally:
        probe.unlink()


def names_may_collide(template: str, name_column: str | None) -> bool:
    """False when every URL gets a name of its own (the URL hash is in it)."""
    return bool(name_column) or "{url_hash" not in template


class Store:
    """The local output folder. ``s3store.ObjectStore`` (an s3:// output) keeps this
    interface: stem_for, existing, open_part, write_part, holds, remove."""

    def __init__(
        self,
        root: Path,
        template: str,
        probe: bool = True,
        parts: Path | None = None,
        checked_dirs: set[str] | None = None,
    ) -> None:
        """``probe=False`` when no file can be in the way: the folder held no images
        when the run began and every URL gets a name of its own (the default
        template), so the nine ``lstat`` calls per image that look for one are saved.
        The no-clobber link still refuses to replace anything. ``checked_dirs``: the
        folders checked by earlier stores of this process (a worker's shards share
        one set: with 4,096 folders and 1,000 URLs a shard, a set per shard checked
        a folder for nearly every image)."""
        self.root = root.resolve()
        self._root_text = str(self.root)
        self.template = template
        self._template_fields = template_fields(template)
        self._plain = _plain_template(template, self._template_fields)
        self.probe = probe
        self._checked_dirs = checked_dirs if checked_dirs is not None else set()
        # ``parts``: the run's parts folder (a task of a split job has its own)
        self._parts = (parts or self.root / PARTS_DIR) / str(os.getpid())
        self._parts.mkdir(parents=True, exist_ok=True)
        self._unnamed = unnamed_parts_work(self._parts)

    def stem_for(self, job: Job) -> str:
        if self._plain and not job.name:
            return self.template.format(url_hash=url_hash(job.url), line=job.line)
        return stem_for(job, self.template, self._template_fields)

    def existing(self, stem: str) -> str | None:
        """The relative path of an image already saved under ``stem``, if any."""
        if not self.probe:
            return None
        base = os.path.join(self.root, stem)
        for ext in EXTENSIONS:
            try:
                info = os.lstat(base + ext)
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode):  # planted: it could point anywhere
                raise UnsafeNameError(f"a symbolic link stands at {stem + ext}")
            if stat.S_ISREG(info.st_mode) and info.st_size > 0:  # an empty file is no image
                return stem + ext
        return None

    def _prepare_dir(self, stem: str) -> None:
        """Create the final folder once, and refuse one that a planted symlink leads out of.

        ``stem`` is already safe (no ``..``, not absolute), so only a symbolic link
        below the root can lead out: ``lstat`` each component, and resolve the whole
        path only when one is a link (``realpath`` on every new folder cost more than
        writing the image). A folder this call made itself is no link and needs no
        ``lstat``: with the default template that is one ``mkdir`` per new folder,
        where ``os.makedirs`` made four system calls and raised an exception for a
        folder that was there already.
        """
        head = stem.rpartition("/")[0]  # os.path's join and dirname: 2 us an image
        final_dir = f"{self._root_text}/{head}" if head else self._root_text
        if final_dir in self._checked_dirs:
            return
        below = head.split("/")
        try:
            os.mkdir(final_dir)
            below.pop()  # made here: a real folder
        except FileExistsError:
            pass
        except FileNotFoundError:  # a parent is missing too
            os.makedirs(final_dir, exist_ok=True)
        links = False
        for i in range(len(below)):
            mode = os.lstat(os.path.join(self.root, *below[: i + 1])).st_mode
            links = links or stat.S_ISLNK(mode)
            if i == len(below) - 1 and not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                raise FileExistsError(f"{final_dir} is a file, not a folder")
        if links:
            real = os.path.realpath(final_dir)
            if real != str(self.root) and not real.startswith(str(self.root) + os.sep):
                raise UnsafeNameError(f"{stem!r} resolves outside the output folder")
        self._checked_dirs.add(final_dir)

    async def open_part(self, stem: str) -> Part:
        """A part file to stream a large body into, written through aiofiles' threads."""
        self._prepare_dir(stem)
        return await PartFile.open(self.root, stem, self._parts, self.probe)

    def write_part(self, stem: str, body: bytes) -> Part:
        """A part file holding a whole small body, written at once in the calling thread.

        Most images are small: one ``write`` of a few dozen KB to the page cache
        costs less than handing the file to a thread three times (open, write,
        close), which was the largest cost of a worker (issue 5's profile). Where the
        file system allows, the file has no name until its commit (``UnnamedPart``).
        """
        self._prepare_dir(stem)
        if self._unnamed:
            return UnnamedPart.written(self.root, stem, self._parts, body, self.probe)
        return PartFile.written(self.root, stem, self._parts, body, self.probe)

    async def holds(self, relpath: str, sha256: str) -> bool:
        """Does ``relpath`` already hold these bytes? (An attempt killed just after it
        put them in place.)"""
        return await asyncio.to_thread(_same_content, self.root / relpath, sha256)

    async def remove(self, relpath: str) -> None:
        """Remove an image this folder held (an older version of another type)."""
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.root, relpath))


def _same_content(path: Path, sha256: str) -> bool:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return False
    return digest.hexdigest() == sha256


class Part(Protocol):
    """A body on its way to its final name: a PartFile here, an s3store.ObjectPart for
    an object store."""

    @property
    def path(self) -> Path: ...

    async def write(self, chunk: bytes) -> None: ...

    async def close(self) -> None: ...

    async def abort(self) -> None: ...

    async def commit(
        self, ext: str, replace: bool = False, content_type: str | None = None
    ) -> str: ...


class NameTakenError(Exception):
    """The final name already holds another file."""


class UploadError(Exception):
    """The object store did not take a body (after its client's retries): upload_error."""


def _sibling_taken(stem: str, ext: str) -> bool:
    """Does a file stand under ``stem`` with another image extension? The stem names
    the image, so that name counts as taken too."""
    return any(os.path.lexists(stem + o) for o in EXTENSIONS if o != ext)


def _link_into_place(
    part: str, stem: str, ext: str, siblings: bool = True, replace: bool = False
) -> None:
    """Atomic, no-clobber rename: link to the final name, then drop the part name."""
    final = stem + ext
    if replace:  # a newer version of an image this folder already holds (revalidation)
        os.replace(part, final)
        return
    # Called from the worker's event loop with no await between the sibling check and
    # the link, so no other download of this process can come in between.
    if siblings and _sibling_taken(stem, ext):
        raise FileExistsError(final)
    try:
        os.link(part, final)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then replace
        if os.path.lexists(final):
            raise FileExistsError(final) from None
        os.replace(part, final)
        return
    os.unlink(part)


def write_all(fd: int, body: bytes) -> None:
    """All of ``body`` to ``fd`` (``os.write`` may take part of it)."""
    view = memoryview(body)
    while view:
        view = view[os.write(fd, view) :]


#: (pid, descriptor of /proc/self/fd): an unnamed part is linked to its name through
#: it (``linkat`` with AT_SYMLINK_FOLLOW; ``os.link`` uses it only with a dir fd).
_proc_fds: tuple[int, int] | None = None
#: parts folder -> whether unnamed parts work there (probed once per process)
_unnamed_ok: dict[str, bool] = {}
#: libc's linkat, when this process may link a descriptor itself (AT_EMPTY_PATH needs
#: CAP_DAC_READ_SEARCH: root, as in most containers): 8-10 us an image less than the
#: path through /proc (issue 5). None: not tried yet; False: not allowed here.
_linkat: Any = None
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000


def _link_unnamed(fd: int, name: str) -> None:
    """Give the unnamed (O_TMPFILE) file open at ``fd`` the name ``name``; raises
    FileExistsError if that name is taken (never replaces)."""
    if _linkat:
        if _linkat(fd, b"", _AT_FDCWD, os.fsencode(name), _AT_EMPTY_PATH) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), name)
        return
    global _proc_fds
    if _proc_fds is None or _proc_fds[0] != os.getpid():  # a forked child has its own
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        _proc_fds = (os.getpid(), os.open("/proc/self/fd", flags))
    os.link(str(fd), name, src_dir_fd=_proc_fds[1])


def _load_linkat() -> Any:
    """libc's linkat, typed for ctypes; False where there is none to load."""
    try:
        linkat = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):  # no libc to load, or no linkat in it
        return False
    linkat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
    linkat.restype = ctypes.c_int
    return linkat


def _probe_link(fd: int, name: str) -> None:
    """Link ``fd`` to ``name`` as every part will be; the first probe of a process also
    decides how (AT_EMPTY_PATH where the kernel allows it, else through /proc)."""
    global _linkat
    deciding = _linkat is None
    if deciding:
        _linkat = _load_linkat()
    try:
        _link_unnamed(fd, name)
    except OSError:
        if not (deciding and _linkat):
            raise
        _linkat = False  # refused here (not root, Linux before 6.10): through /proc
        _link_unnamed(fd, name)  # nothing was linked: an O_TMPFILE file links once


def _open_unnamed(parts: Path) -> int:
    return os.open(parts, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)


def unnamed_parts_work(parts: Path) -> bool:
    """Can files be made without a name in ``parts`` (O_TMPFILE: Linux, on tmpfs, ext4,
    xfs, btrfs...) and be linked to a name later? Tried once per folder and process."""
    key = str(parts)
    if key not in _unnamed_ok:
        _unnamed_ok[key] = False
        if hasattr(os, "O_TMPFILE"):
            probe = PartFile._new_name(parts)
            try:
                fd = _open_unnamed(parts)
                try:
                    _probe_link(fd, probe)
                    os.unlink(probe)
                    _unnamed_ok[key] = True
                finally:
                    os.close(fd)
            except OSError:
                pass
    return _unnamed_ok[key]


class _Bound:
    """What a part on a local file system knows of its final name."""

    def __init__(self, root: Path, stem: str, probe: bool) -> None:
        self._root = root
        self._stem = stem
        self._probe = probe  # look for a sibling with another image extension


class PartFile(_Bound):
    """A body being written: ``commit`` renames it into place, ``abort`` removes it."""

    def __init__(
        self, root: Path, stem: str, part: str, handle: AsyncBufferedIOBase | None, probe: bool
    ) -> None:
        super().__init__(root, stem, probe)
        self._part = part
        self._handle = handle

    @staticmethod
    def _new_name(parts: Path) -> str:
        return os.path.join(parts, secrets.token_hex(8) + PART_SUFFIX)

    @classmethod
    async def open(cls, root: Path, stem: str, parts: Path, probe: bool = True) -> Self:
        part = cls._new_name(parts)
        handle = await aiofiles.open(part, "wb")
        return cls(root, stem, part, handle, probe)

    @classmethod
    def written(cls, root: Path, stem: str, parts: Path, body: bytes, probe: bool = True) -> Self:
        part = cls._new_name(parts)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # as open() does
        try:
            write_all(fd, body)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        os.close(fd)
        return cls(root, stem, part, None, probe)

    @property
    def path(self) -> Path:
        return Path(self._part)

    async def write(self, chunk: bytes) -> None:
        assert self._handle is not None, "a part written at once takes no more chunks"
        await self._handle.write(chunk)

    async def commit(self, ext: str, replace: bool = False, content_type: str | None = None) -> str:
        """Move the finished body to its final name; returns the path relative to OUTDIR.
        (``content_type`` is for an object store; a file keeps none.)

        Never replaces a file already there: raises NameTakenError instead, so two
        URLs given the same name cannot overwrite each other. The link and unlink
        run in this thread: two metadata calls cost less than a thread hand-off.
        """
        await self.close()
        relpath = self._stem + ext
        try:
            _link_into_place(
                self._part, os.path.join(self._root, self._stem), ext, self._probe, replace
            )
        except FileExistsError:
            await self.abort()
            raise NameTakenError(relpath) from None
        return relpath

    async def abort(self) -> None:
        await self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._part)

    async def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await handle.close()


class UnnamedPart(_Bound):
    """A whole body held in a file without a name (O_TMPFILE) until ``commit`` links it
    to its final name: one file creation and one ``linkat``, where a named part took
    a random name, a create, a link and an unlink (issue 5). Nothing partial can
    stand at a final name: the file has none until it is complete, and a killed
    worker's unnamed files vanish with the process."""

    def __init__(self, root: Path, stem: str, parts: Path, fd: int, probe: bool) -> None:
        super().__init__(root, stem, probe)
        self._parts = parts
        self._fd = fd

    @classmethod
    def written(cls, root: Path, stem: str, parts: Path, body: bytes, probe: bool = True) -> Self:
        fd = _open_unnamed(parts)
        try:
            write_all(fd, body)
        except BaseException:
            os.close(fd)
            raise
        return cls(root, stem, parts, fd, probe)

    @property
    def path(self) -> Path:
        """The open file, by its /proc name (``validate.decode`` reads it)."""
        return Path(f"/proc/self/fd/{self._fd}")

    async def write(self, chunk: bytes) -> None:
        raise AssertionError("a part written at once takes no more chunks")

    async def close(self) -> None:
        """Nothing is buffered; the descriptor stays open until commit or abort."""

    async def commit(self, ext: str, replace: bool = False, content_type: str | None = None) -> str:
        """As ``PartFile.commit``: the final name is given only if free (else
        NameTakenError), in this thread, with no await between check and link."""
        relpath = self._stem + ext
        final = os.path.join(self._root, self._stem)
        try:
            if replace:  # revalidation: a name in the parts folder, renamed over the old
                named = PartFile._new_name(self._parts)
                _link_unnamed(self._fd, named)
                try:
                    _link_into_place(named, final, ext, replace=True)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(named)
                    raise
            elif self._probe and _sibling_taken(final, ext):
                raise FileExistsError(final + ext)
            else:
                _link_unnamed(self._fd, final + ext)
        except FileExistsError:
            raise NameTakenError(relpath) from None
        finally:
            await self.abort()
        return relpath

    async def abort(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
