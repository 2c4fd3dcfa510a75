"""The default guest image: Debian's kernel plus a small busybox initramfs, built reproducibly.

Theory of operation
-------------------
``build_image()`` resolves the packages it needs to exact versions with ``apt-cache`` (the
``linux-image-amd64`` metapackage to the versioned kernel package it depends on; busybox-static;
iperf3 and the ``lib*`` packages it depends on, transitively), and derives a cache key from those
versions plus everything else that shapes the result (this builder's format number, the /init
script, the module list). If an intact image with that key is cached, it is used as is: no
download, no unpacking (the result says ``cached: true``).

Otherwise the ``.deb`` files missing from the deb cache are fetched with ``apt-get download``
(never installed on the host) and unpacked with ``dpkg-deb -x`` into a scratch directory. The
kernel package ships no ``modules.dep``, so ``depmod -b`` generates one in the scratch tree; the
virtio-net-over-PCI modules and their dependencies are read from it (dependencies first, giving
``/lib/modules/load-order``). iperf3 travels with exactly the shared objects its ELF ``DT_NEEDED``
closure names, plus the dynamic loader from ``PT_INTERP``.

The initramfs is a newc cpio written here, entries sorted by path, every mtime/uid/gid zero and
inode numbers assigned in order, compressed with gzip at a fixed mtime and no file name (what
``gzip -n`` does): the same inputs give a byte-identical file.

Cache layout (``$XDG_CACHE_HOME/virtwire`` or ``~/.cache/virtwire``)::

    debs/                      downloaded .deb files, reused across builds
    images/KEY/vmlinuz         the kernel, copied from the package
    images/KEY/initramfs.cpio.gz
    images/KEY/manifest.json   versions, kernel release, sizes and sha256 of both files
    current.json               {"key": KEY}: the image ``virtwire vm`` boots by default
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from virtwire.errors import UserFacingError

#: Bump when the image layout changes, so older cached images are not reused.
IMAGE_FORMAT = 1
KERNEL_METAPACKAGE = "linux-image-amd64"
#: Modules loaded at boot; their dependencies come from modules.dep (virtio, virtio_ring,
#: virtio_pci_modern_dev, virtio_pci_legacy_dev, failover, net_failover). The emulated NICs'
#: drivers (8139too, 8139cp, e1000, with mii) are there for ``virtwire compare``; 8021q (with
#: garp, mrp, stp, llc) gives the guest VLAN interfaces, whose VIDs reach the device's VLAN
#: filter (VIRTIO_NET_CTRL_VLAN). The list is part of the image key: changing it rebuilds.
ROOT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_net", "mii", "8139too", "8139cp", "e1000",
                                 "8021q")
#: Packages whose ``lib*`` dependencies are followed for iperf3's shared objects.
USER_PACKAGES: tuple[str, ...] = ("busybox-static", "iperf3")
LIB_DIRS: tuple[str, ...] = (
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
)
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.cpio.gz"
MANIFEST_FILE = "manifest.json"


class ImageError(UserFacingError):
    """The guest image cannot be built, or is missing or corrupt."""


@dataclass(frozen=True)
class GuestImage:
    """A built image: paths of the kernel and the initramfs, and what went into them."""

    kernel: Path
    initramfs: Path
    kernel_release: str
    key: str
    manifest: dict

    def to_json(self) -> dict:
        return {
            "kernel": str(self.kernel),
            "initramfs": str(self.initramfs),
            "kernel_release": self.kernel_release,
            "key": self.key,
            "packages": self.manifest.get("packages", {}),
        }


Progress = Callable[[str], None]


def stderr_progress(msg: str) -> None:
    sys.stderr.write(f"image: {msg}\n")
    sys.stderr.flush()


def _quiet(msg: str) -> None:
    pass


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/virtwire``, else ``~/.cache/virtwire``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "virtwire"


def _run(argv: list[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{what}: {argv[0]} not found (install it: tools/setup.sh)") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ImageError(f"{what} failed: {last}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# Package resolution (apt-cache only; never apt-get)


def _dep_names(field: str) -> list[str]:
    """Package names in a Depends field, taking the first of each ``a | b`` alternative."""
    names = []
    for clause in field.split(","):
        first = clause.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name:
            names.append(name)
    return names


def _apt_show(names: Iterable[str]) -> dict[str, dict[str, str]]:
    out = _run(
        ["apt-cache", "show", "--no-all-versions", *sorted(set(names))],
        what="apt-cache show (run apt-get update?)",
    )
    stanzas: dict[str, dict[str, str]] = {}
    for block in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k] = v.strip()
        if "Package" in fields and fields["Package"] not in stanzas:
            stanzas[fields["Package"]] = fields
    return stanzas


def resolve_packages() -> dict[str, str]:
    """Map every package the image needs to the exact version apt would fetch now."""
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE], what="apt-cache depends")
    kernel_pkgs = re.findall(r"^\s*Depends:\s*(linux-image-\S+)", out, re.M)
    if not kernel_pkgs:
        raise ImageError(f"cannot resolve {KERNEL_METAPACKAGE} to a versioned kernel package "
                         "(no package lists? run apt-get update)")
    wanted = {kernel_pkgs[0], *USER_PACKAGES}
    info: dict[str, dict[str, str]] = {}
    todo = set(wanted)
    while todo:
        shown = _apt_show(todo)
        missing = todo - shown.keys()
        if missing:
            raise ImageError(f"apt-cache knows no package {sorted(missing)[0]} (apt-get update?)")
        info.update(shown)
        todo = set()
        for name in shown:
            if name.startswith("linux-image-") or name == "busybox-static":
                continue
            for dep in _dep_names(shown[name].get("Depends", "")):
                if dep.startswith("lib") and dep not in info:
                    todo.add(dep)
    return {name: info[name]["Version"] for name in sorted(info)}


def kernel_package(packages: dict[str, str]) -> str:
    for name in packages:
        if name.startswith("linux-image-") and name != KERNEL_METAPACKAGE:
            return name
    raise ImageError("no kernel package in the resolved set")


def _init_script() -> bytes:
    return resources.files("virtwire.guest").joinpath("init.sh").read_bytes()


def image_key(packages: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": IMAGE_FORMAT, "packages": packages,
                         "modules": ROOT_MODULES}, sort_keys=True).encode())
    h.update(_init_script())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The deb cache


def _deb_glob(name: str, version: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_*.deb"


def find_deb(debs: Path, name: str, version: str) -> Path | None:
    hits = sorted(debs.glob(_deb_glob(name, version)))
    return hits[0] if hits else None


def download_debs(packages: dict[str, str], debs: Path, progress: Progress) -> list[str]:
    """Fetch the .debs not already in ``debs``; return the names fetched."""
    debs.mkdir(parents=True, exist_ok=True)
    need = [n for n, v in packages.items() if find_deb(debs, n, v) is None]
    if not need:
        return []
    progress(f"downloading {len(need)} package(s): {', '.join(need)}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
              *[f"{n}={packages[n]}" for n in need]], cwd=Path(tmp), what="apt-get download")
        size = 0
        for f in sorted(Path(tmp).glob("*.deb")):
            size += f.stat().st_size
            os.replace(f, debs / f.name)
    for n in need:
        if find_deb(debs, n, packages[n]) is None:
            raise ImageError(f"apt-get download did not produce {n} {packages[n]}")
    progress(f"downloaded {size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s")
    return need


# ---------------------------------------------------------------------------------------------
# ELF: DT_NEEDED and PT_INTERP (enough for x86-64 ELF64 little-endian shared objects)


def elf_deps(data: bytes) -> tuple[list[str], str | None]:
    """Return (DT_NEEDED sonames, PT_INTERP path or None) of an ELF64 LE file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError("not an ELF64 little-endian file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    interp = None
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((vaddr, off, filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (off, filesz)
        elif p_type == 3:  # PT_INTERP
            interp = data[off:off + filesz].split(b"\0")[0].decode()
    if dynamic is None:
        return [], interp

    def vaddr_to_off(va: int) -> int:
        for vbase, obase, size in loads:
            if vbase <= va < vbase + size:
                return obase + va - vbase
        raise ImageError("ELF string table outside its loadable segments")

    needed_offsets: list[int] = []
    strtab = None
    off, size = dynamic
    for pos in range(off, off + size, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed_offsets.append(val)
        elif tag == 5:  # DT_STRTAB
            strtab = vaddr_to_off(val)
    if strtab is None:
        return [], interp
    needed = []
    for o in needed_offsets:
        end = data.index(b"\0", strtab + o)
        needed.append(data[strtab + o:end].decode())
    return needed, interp


def _resolve_in_tree(root: Path, path: str, depth: int = 0) -> Path:
    """Follow symlinks of an absolute in-image path within the unpacked tree ``root``."""
    if depth > 16:
        raise ImageError(f"symlink loop at {path}")
    p = root / path.lstrip("/")
    if p.is_symlink():
        target = os.readlink(p)
        nxt = target if target.startswith("/") else os.path.normpath(
            os.path.join(os.path.dirname("/" + path.lstrip("/")), target))
        return _resolve_in_tree(root, nxt, depth + 1)
    if not p.is_file():
        raise ImageError(f"{path} not found in the unpacked packages")
    return p


def library_closure(root: Path, binary: str) -> tuple[dict[str, Path], str | None]:
    """Shared objects ``binary`` needs (soname -> file in ``root``) and its interpreter path."""
    needed, interp = elf_deps(_resolve_in_tree(root, binary).read_bytes())
    found: dict[str, Path] = {}
    todo = list(needed)
    while todo:
        soname = todo.pop(0)
        if soname in found:
            continue
        for d in LIB_DIRS:
            cand = root / d / soname
            if cand.exists() or cand.is_symlink():
                found[soname] = _resolve_in_tree(root, f"/{d}/{soname}")
                break
        else:
            raise ImageError(f"{binary} needs {soname}, which no downloaded package provides")
        more, _ = elf_deps(found[soname].read_bytes())
        todo.extend(more)
    return found, interp


# ---------------------------------------------------------------------------------------------
# Kernel modules


def module_load_order(modules_dir: Path, roots: Iterable[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``roots`` and their deps, dependencies first."""
    dep_file = modules_dir / "modules.dep"
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_modname(path)] = (path, [_modname(d) for d in rest.split()])
    builtin = set()
    bfile = modules_dir / "modules.builtin"
    if bfile.exists():
        builtin = {_modname(x) for x in bfile.read_text().split()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            raise ImageError(f"kernel module {name} not in modules.dep")
        for d in deps[name][1]:
            visit(d)
        order.append(deps[name][0])

    for r in roots:
        visit(r)
    return order


def _modname(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


# ---------------------------------------------------------------------------------------------
# newc cpio


@dataclass(frozen=True)
class CpioEntry:
    path: str  # without leading slash
    mode: int  # full st_mode (type bits included)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") archive: entries sorted by path, mtimes/ids zero, inodes in order."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def header(ino: int, e: CpioEntry) -> None:
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
                  len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name)
        pad4()
        out.extend(e.data)
        pad4()

    ordered = sorted(entries, key=lambda e: e.path)
    paths = [e.path for e in ordered]
    if len(set(paths)) != len(paths):
        raise ImageError("duplicate path in the initramfs")
    for ino, e in enumerate(ordered, start=1):
        header(ino, e)
    header(0, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def _gzip_n(data: bytes) -> bytes:
    """gzip with no name and mtime 0 (``gzip -n``), so equal input gives equal bytes."""
    return gzip.compress(data, compresslevel=6, mtime=0)


# ---------------------------------------------------------------------------------------------
# Build


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _initramfs_entries(kroot: Path, uroot: Path, kernel_release: str,
                       progress: Progress) -> tuple[list[CpioEntry], list[str]]:
    entries: dict[str, CpioEntry] = {}

    def add_dir(path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            entries.setdefault(p, CpioEntry(p, stat.S_IFDIR | 0o755))

    def add_file(path: str, data: bytes, perm: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path:
            add_dir(os.path.dirname(path))
        entries[path] = CpioEntry(path, stat.S_IFREG | perm, data)

    def add_link(path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            add_dir(os.path.dirname(path))
        entries.setdefault(path, CpioEntry(path, stat.S_IFLNK | 0o777, target.encode()))

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root",
              "etc", "mnt", "var", "lib", "lib64"):
        add_dir(d)
    entries["dev/console"] = CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    entries["tmp"] = CpioEntry("tmp", stat.S_IFDIR | 0o1777)
    add_file("init", _init_script(), 0o755)
    add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    add_file("etc/group", b"root:x:0:\n")
    add_file("etc/hosts", b"127.0.0.1 localhost\n")

    # busybox and its applet links (the list comes from the downloaded binary itself).
    busybox = _resolve_in_tree(uroot, "/bin/busybox")
    add_file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"], what="busybox --list-full").split()
    for a in applets:
        if a.strip("/") in ("init", "linuxrc", "bin/busybox"):
            continue
        add_link(a, "/bin/busybox")

    # iperf3, its shared objects and the dynamic loader.
    iperf = _resolve_in_tree(uroot, "/usr/bin/iperf3")
    add_file("usr/bin/iperf3", iperf.read_bytes(), 0o755)
    libs, interp = library_closure(uroot, "/usr/bin/iperf3")
    for soname, f in sorted(libs.items()):
        add_file(f"lib/x86_64-linux-gnu/{soname}", f.read_bytes(), 0o755)
    if interp:
        real = _resolve_in_tree(uroot, interp)
        canonical = f"lib/x86_64-linux-gnu/{os.path.basename(interp)}"
        add_file(canonical, real.read_bytes(), 0o755)
        if interp.strip("/") != canonical:
            add_link(interp, "/" + canonical)
    progress(f"iperf3 with {len(libs)} shared object(s): {', '.join(sorted(libs))}")

    # Kernel modules, dependencies first.
    mdir = kroot / "lib/modules" / kernel_release
    order = module_load_order(mdir, ROOT_MODULES)
    for rel in order:
        add_file(f"lib/modules/{kernel_release}/{rel}", (mdir / rel).read_bytes())
    add_file("lib/modules/load-order",
             "".join(f"{kernel_release}/{rel}\n" for rel in order).encode())
    progress("modules: " + ", ".join(_modname(r) for r in order))
    return list(entries.values()), [_modname(r) for r in order]


def _unpack(deb: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(dest)], what=f"dpkg-deb -x {deb.name}")


def _pack(packages: dict[str, str], key: str, root: Path, debs: Path,
          progress: Progress) -> Path:
    kpkg = kernel_package(packages)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        kroot, uroot, out = Path(tmp, "kernel"), Path(tmp, "user"), Path(tmp, "out")
        out.mkdir()
        progress(f"unpacking {kpkg} {packages[kpkg]}")
        _unpack(find_deb(debs, kpkg, packages[kpkg]), kroot)  # type: ignore[arg-type]
        releases = sorted(p.name for p in (kroot / "lib/modules").iterdir())
        if len(releases) != 1:
            raise ImageError(f"expected one kernel release in {kpkg}, found {releases}")
        release = releases[0]
        progress(f"depmod -b for {release}")
        _run(["depmod", "-b", str(kroot), release], what="depmod")
        for name in packages:
            if name != kpkg:
                _unpack(find_deb(debs, name, packages[name]), uroot)  # type: ignore[arg-type]
        entries, modules = _initramfs_entries(kroot, uroot, release, progress)
        progress(f"packing initramfs ({len(entries)} entries)")
        initramfs = _gzip_n(write_cpio(entries))
        (out / INITRAMFS_FILE).write_bytes(initramfs)
        shutil.copyfile(kroot / "boot" / f"vmlinuz-{release}", out / KERNEL_FILE)
        manifest = {
            "format": IMAGE_FORMAT,
            "key": key,
            "kernel_release": release,
            "packages": packages,
            "modules": modules,
            "kernel": {"file": KERNEL_FILE, "size": (out / KERNEL_FILE).stat().st_size,
                       "sha256": _sha256(out / KERNEL_FILE)},
            "initramfs": {"file": INITRAMFS_FILE, "size": len(initramfs),
                          "sha256": hashlib.sha256(initramfs).hexdigest()},
        }
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        final = images / key
        if final.exists():
            # Swap with two renames so a reader sees either the old or the new directory.
            old = Path(tmp, "old")
            os.replace(final, old)
        os.replace(out, final)
    return final


def _set_current(root: Path, key: str) -> None:
    tmp = root / ".current.json.tmp"
    tmp.write_text(json.dumps({"key": key}) + "\n")
    os.replace(tmp, root / "current.json")


def build_image(*, rebuild: bool = False, progress: Progress | None = None,
                root: Path | None = None, debs: Path | None = None) -> dict:
    """Build (or reuse) the default guest image; return a JSON-able result.

    ``cached`` is true when an intact image for the resolved versions was reused; ``downloaded``
    lists the packages fetched by this call (empty when every .deb was in the cache).
    ``rebuild`` repacks from the cached .debs even when an image exists. ``root`` is the cache
    directory (default ``cache_root()``), ``debs`` the .deb cache (default ``root/debs``).
    """
    progress = progress or _quiet
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    progress("resolving package versions")
    try:
        packages = resolve_packages()
    except ImageError as e:
        # Offline or no apt lists: an intact current image is still usable.
        try:
            img = load_image(root=root)
        except ImageError:
            raise e from None
        progress(f"{e}; keeping the current image")
        return {"cached": True, "downloaded": [], "seconds": round(time.monotonic() - t0, 3),
                **img.to_json(), "note": str(e)}
    key = image_key(packages)
    progress(f"kernel {kernel_package(packages)} {packages[kernel_package(packages)]}, "
             f"key {key}")
    # One build at a time per cache directory (parallel test sessions share it).
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rebuild:
            try:
                img = load_image(key=key, root=root)
            except ImageError:
                pass
            else:
                _set_current(root, key)
                progress(f"cached: {img.kernel.parent}")
                return {"cached": True, "downloaded": [],
                        "seconds": round(time.monotonic() - t0, 3), **img.to_json()}
        debs = debs or root / "debs"
        downloaded = download_debs(packages, debs, progress)
        _pack(packages, key, root, debs, progress)
        _set_current(root, key)
        img = load_image(key=key, root=root)
        progress(f"built {img.initramfs} ({img.initramfs.stat().st_size / 1e6:.1f} MB) "
                 f"in {time.monotonic() - t0:.1f} s")
        return {"cached": False, "downloaded": downloaded,
                "seconds": round(time.monotonic() - t0, 3), **img.to_json()}


def load_image(*, key: str | None = None, root: Path | None = None,
               verify: bool = True) -> GuestImage:
    """The image ``key`` (default: the current one), checked against its manifest."""
    root = root or cache_root()
    hint = "run `virtwire image build`"
    if key is None:
        try:
            key = json.loads((root / "current.json").read_text())["key"]
        except FileNotFoundError:
            raise ImageError(f"no guest image in {root}: {hint}") from None
        except (ValueError, KeyError, TypeError):
            raise ImageError(f"guest image pointer {root / 'current.json'} is corrupt: "
                             f"{hint}") from None
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{16}", key):
        raise ImageError(f"guest image pointer {root / 'current.json'} is corrupt: {hint}")
    d = root / "images" / key
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise ImageError(f"guest image {d} is missing: {hint}") from None
    except ValueError:
        raise ImageError(f"guest image manifest {d / MANIFEST_FILE} is corrupt: {hint}") from None
    try:
        for part in ("kernel", "initramfs"):
            f = d / manifest[part]["file"]
            if not f.is_file():
                raise ImageError(f"guest image file {f} is missing: {hint}")
            if f.stat().st_size != manifest[part]["size"] or (
                    verify and _sha256(f) != manifest[part]["sha256"]):
                raise ImageError(f"guest image file {f} is corrupt (checksum mismatch): {hint}")
        return GuestImage(kernel=d / manifest["kernel"]["file"],
                          initramfs=d / manifest["initramfs"]["file"],
                          kernel_release=manifest["kernel_release"], key=key, manifest=manifest)
    except (KeyError, TypeError):
        raise ImageError(f"guest image manifest {d / MANIFEST_FILE} is corrupt: {hint}") from None
