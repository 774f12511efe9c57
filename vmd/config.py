"""YAML configuration → validated dataclasses.

Every error names the file and the key at fault, and is raised before anything
is mounted or created.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .mountpath import mount_paths, outside_mount_error
from .nbdlink import check_uri, is_remote, uri_typo

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# As coreutils reads sizes (`truncate -s`, `dd`): an SI unit (kB, MB, GB, TB) is a
# power of ten, a binary one (KiB, MiB, GiB, TiB) or a bare letter (K, M, G, T) a
# power of two. Case does not matter; B is a byte.
_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": TiB, "tib": TiB, "tb": 1000**4,
}
_SI_UNITS = {u for u, mult in _UNITS.items() if mult > 1 and mult % 1000 == 0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Defaults, justified in README.md ("Tuning") with `make bench` figures.
DEFAULT_REGION_SIZE = 4 * MiB
DEFAULT_FMR_REGION = 64 * KiB
SECTOR = 512
DEFAULT_STRIPE_UNIT = 64 * KiB


def parse_size(value: Any) -> int:
    """'64KiB' → 65536, '64kB' → 64000 (see _UNITS); plain integers are bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a size: {value!r}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 512, 64KiB, 1GiB; "
                         f"kB, MB, GB, TB are powers of 1000)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _si_hint(value: Any) -> str:
    """Why a size in SI units may have missed a multiple of 512: say what it meant."""
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _SI_UNITS:
        return ""
    unit = m.group(2)
    return (f" ({value} is read as {parse_size(value)} bytes: {unit} is a power of 1000; "
            f"for a power of 1024 write {unit[0].upper()}iB)")


def format_size(n: int) -> str:
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"bad name {name!r}: use 1-64 letters, digits, '_', '.', '-', not starting with a symbol")
    return name


@dataclass(frozen=True)
class RcopyConfig:
    """Remote Copy of a volume: the command that reaches the receiver, and how often."""
    target: tuple[str, ...]
    period: float = 300.0  # seconds between updates; 0 = only on `vmd rcopy sync`


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hour|)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600}


def parse_duration(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5min, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    size: int
    plexes: tuple[Path | str, ...]  # image paths, and NBD URIs (str) of remote plexes
    log: Path
    region_size: int = DEFAULT_REGION_SIZE
    drl: bool = True
    fastresync: bool = True
    fastresync_region: int = DEFAULT_FMR_REGION
    rcopy: RcopyConfig | None = None
    # The volume file bypasses the kernel's page cache (README: Page cache).
    direct_io: bool = True
    # RAID-5 (vmd/raid5.py): `plexes` holds the columns, in column order.
    layout: str = "mirror"
    stripe_unit: int = DEFAULT_STRIPE_UNIT
    raid5_log: Path | None = None
    # Remote plexes: a request unanswered this long fails the plex; a failed
    # one is reconnected and reattached by itself.
    remote_timeout: float = 10.0
    auto_attach: bool = True

    @property
    def image_size(self) -> int:
        """The size of each image: the volume's, or a RAID-5 column's."""
        return self.image_size_of(self.size)

    def image_size_of(self, size: int) -> int:
        """Each image's size for a volume of `size` bytes (the sidecar log's
        size wins over the config's: after `vmd resize`, or for a snapshot)."""
        return size if self.layout == "mirror" else size // (len(self.plexes) - 1)

    @property
    def image_what(self) -> str:
        """What an image's size must match, for messages."""
        return ("the volume" if self.layout == "mirror" else
                f"a column of volume {self.name} (size / (columns - 1))")


@dataclass(frozen=True)
class ResyncConfig:
    rate_limit: int = 0  # bytes per second; 0 = unlimited
    per_device: int = 1  # background jobs at a time per disk (vmd/spread.py); 0 = no limit


@dataclass(frozen=True)
class Config:
    path: Path
    mountpoint: Path
    socket: Path
    volumes: dict[str, VolumeConfig] = field(default_factory=dict)
    resync: ResyncConfig = field(default_factory=ResyncConfig)
    # Seconds a dirty region stays idle before it is cleaned (md uses 2-3 × 5 s).
    clean_delay: float = 5.0
    # The FUSE writeback cache for volumes with direct_io false (fusefs.VolumeFS
    # says why it is safe); mount-wide, as the kernel negotiates it per mount.
    writeback_cache: bool = False
    # Run for every event (vmd/notify.py): the argv, a string given as `sh -c STRING`.
    notify: tuple[str, ...] | None = None


_TOP_KEYS = {"mountpoint", "socket", "volumes", "resync", "clean_delay", "writeback_cache",
             "notify"}
_VOLUME_KEYS = {"size", "plexes", "log", "region_size", "drl", "fastresync", "fastresync_region",
                "direct_io", "rcopy", "layout", "columns", "stripe_unit", "raid5_log",
                "remote_timeout", "auto_attach"}
_RCOPY_KEYS = {"target", "period"}
_RESYNC_KEYS = {"rate_limit", "per_device"}


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, but a key given twice in one mapping is an error (the
    plain loader keeps the last: a second `vol0:` block would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Checked before the merge keys (<<) are flattened in: a key given
        # both by a merge and in place is an override, not a duplicate.
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                first = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the plain loader reports it
            if first is not None:
                raise _DuplicateKey(
                    None, None, f"key {key!r} given twice (first on line {first}); "
                    f"YAML keeps only the last, so vmd refuses both",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


class _Ctx:
    """Builds error messages of the form 'FILE: key.path: problem'."""

    def __init__(self, path: Path):
        self.path = path

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {msg}" if key else f"{self.path}: {msg}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.err(key, f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                where = f"{key}.{k}" if key else str(k)
                raise self.err(where, f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    def size(self, value: Any, key: str, *, minimum: int = 0, multiple: int = 1) -> int:
        try:
            n = parse_size(value)
        except ValueError as e:
            raise self.err(key, str(e)) from None
        if n < minimum:
            raise self.err(key, f"{n} is below the minimum of {minimum}{_si_hint(value)}")
        if n % multiple:
            raise self.err(key, f"{n} is not a multiple of {multiple}{_si_hint(value)}")
        return n

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.err(key, f"expected true or false, got {value!r}")
        return value

    def plex(self, value: Any, key: str) -> Path | str:
        """An image path, or an NBD URI kept as written."""
        if not is_remote(value):
            if isinstance(value, str) and uri_typo(value):
                raise self.err(key, uri_typo(value))
            return self.filepath(value, key)
        bad = check_uri(value)
        if bad:
            raise self.err(key, bad)
        return value

    def filepath(self, value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise self.err(key, f"expected a path, got {value!r}")
        p = Path(value)
        return Path(os.path.normpath(self.path.parent / p)) if not p.is_absolute() else p


    def unique_path(self, value: Any, key: str, seen: dict[Any, str]) -> Path:
        """A path no other key of the config uses (`seen`: path → its key)."""
        p = self.unique_plex(value, key, seen, remote=False)
        assert isinstance(p, Path)
        return p

    def unique_plex(self, value: Any, key: str, seen: dict[Any, str], *,
                    remote: bool = True) -> Path | str:
        """An image path (or, where `remote`, an NBD URI) no other key uses."""
        p = self.plex(value, key) if remote else self.filepath(value, key)
        if p in seen:
            raise self.err(key, f"{p} is already used by {seen[p]}")
        seen[p] = key
        return p


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file (syntax and values, not the disk)."""
    cpath = Path(os.path.abspath(path))
    ctx = _Ctx(cpath)
    try:
        text = cpath.read_text()
    except OSError as e:
        raise ConfigError(f"{cpath}: cannot read config: {e.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cmark is not None:  # where the unfinished construct began
            what += f" ({ctx} started at line {cmark.line + 1}, column {cmark.column + 1})"
        if isinstance(e, _DuplicateKey):
            raise ConfigError(f"{cpath}: {where}{what}") from None
        raise ConfigError(f"{cpath}: {where}not valid YAML: {what}") from None
    raw = ctx.mapping(raw if raw is not None else {}, "", _TOP_KEYS)
    for required in ("mountpoint", "socket", "volumes"):
        if required not in raw:
            raise ctx.err(required, "missing required key")

    resync_raw = ctx.mapping(raw.get("resync") or {}, "resync", _RESYNC_KEYS)
    per_device = resync_raw.get("per_device", 1)
    if isinstance(per_device, bool) or not isinstance(per_device, int) or per_device < 0:
        raise ctx.err("resync.per_device", f"expected a whole number >= 0 (jobs at a time per "
                                           f"disk; 0: no limit), got {per_device!r}")
    resync = ResyncConfig(rate_limit=ctx.size(resync_raw.get("rate_limit", 0), "resync.rate_limit"),
                          per_device=per_device)
    clean_delay = raw.get("clean_delay", 5.0)
    if isinstance(clean_delay, bool) or not isinstance(clean_delay, (int, float)) or clean_delay < 0:
        raise ctx.err("clean_delay", f"expected a number of seconds >= 0, got {clean_delay!r}")

    vols_raw = raw["volumes"]
    if not isinstance(vols_raw, dict) or not vols_raw:
        raise ctx.err("volumes", "expected a mapping of volume names to volume settings")
    volumes: dict[str, VolumeConfig] = {}
    # The socket too: an image or log there is created, then the start refuses
    # to remove "a file that is not a socket" and the file stays.
    seen_paths: dict[Path, str] = {ctx.filepath(raw["socket"], "socket"): "socket"}
    for name, vraw in vols_raw.items():
        key = f"volumes.{name}"
        try:
            check_name(name)
        except ValueError as e:
            raise ctx.err(key, str(e)) from None
        v = ctx.mapping(vraw, key, _VOLUME_KEYS)
        layout = v.get("layout", "mirror")
        if layout not in ("mirror", "raid5"):
            raise ctx.err(f"{key}.layout", f"expected mirror or raid5, got {layout!r}")
        images = "plexes" if layout == "mirror" else "columns"
        for required in ("size", images, "log"):
            if required not in v:
                raise ctx.err(f"{key}.{required}", "missing required key")
        wrong = {"plexes": "columns", "columns": "plexes"}[images]
        if wrong in v:
            raise ctx.err(f"{key}.{wrong}", f"a {layout} volume lists its images under "
                          f"{key}.{images}")
        for r5key in ("stripe_unit", "raid5_log"):
            if layout == "mirror" and r5key in v:
                raise ctx.err(f"{key}.{r5key}", "only for layout: raid5")
        size = ctx.size(v["size"], f"{key}.size", minimum=SECTOR, multiple=SECTOR)
        region = ctx.size(v.get("region_size", DEFAULT_REGION_SIZE), f"{key}.region_size",
                          minimum=4096, multiple=4096)
        fmr = ctx.size(v.get("fastresync_region", DEFAULT_FMR_REGION), f"{key}.fastresync_region",
                       minimum=4096, multiple=4096)
        plist = v[images]
        if not isinstance(plist, list) or not plist:
            raise ctx.err(f"{key}.{images}", "expected a non-empty list of image paths")
        plexes = [ctx.unique_plex(p, f"{key}.{images}[{i}]", seen_paths)
                  for i, p in enumerate(plist)]
        log = ctx.unique_path(v["log"], f"{key}.log", seen_paths)
        r5: dict[str, Any] = {}
        if layout == "raid5":
            if len(plexes) < 3:
                raise ctx.err(f"{key}.columns", f"RAID-5 needs 3 or more columns, got {len(plexes)}")
            for i, p in enumerate(plexes):
                if not isinstance(p, Path):
                    raise ctx.err(f"{key}.columns[{i}]", f"{p}: a RAID-5 column is a local image "
                                  f"file; remote (NBD) plexes are for mirrors")
            su = ctx.size(v.get("stripe_unit", DEFAULT_STRIPE_UNIT), f"{key}.stripe_unit",
                          minimum=4096, multiple=4096)
            width = su * (len(plexes) - 1)
            if size % width:
                raise ctx.err(f"{key}.size", f"{size} is not a multiple of (columns - 1) x "
                              f"stripe_unit = {width} ({format_size(width)})")
            # A column's FastResync map marks whole stripe units (vmd/raid5.py).
            fmr = su
            r5 = {"layout": layout, "stripe_unit": su, "raid5_log": None if "raid5_log" not in v
                  else ctx.unique_path(v["raid5_log"], f"{key}.raid5_log", seen_paths)}
        volumes[name] = VolumeConfig(
            name=name, size=size, plexes=tuple(plexes), log=log, region_size=region,
            drl=ctx.boolean(v.get("drl", True), f"{key}.drl"),
            fastresync=ctx.boolean(v.get("fastresync", True), f"{key}.fastresync"),
            fastresync_region=fmr, rcopy=_rcopy_config(ctx, v.get("rcopy"), f"{key}.rcopy"),
            direct_io=ctx.boolean(v.get("direct_io", True), f"{key}.direct_io"),
            remote_timeout=_remote_timeout(ctx, v.get("remote_timeout", 10.0),
                                           f"{key}.remote_timeout"),
            auto_attach=ctx.boolean(v.get("auto_attach", True), f"{key}.auto_attach"), **r5)

    mountpoint = ctx.filepath(raw["mountpoint"], "mountpoint")
    mounts = mount_paths(mountpoint)
    for p, key in seen_paths.items():
        if key == "socket":
            continue
        bad = outside_mount_error(p, mountpoint, mounts) if isinstance(p, Path) else None
        if bad:
            raise ctx.err(key, bad)
    return Config(path=cpath, mountpoint=mountpoint,
                  socket=ctx.filepath(raw["socket"], "socket"), volumes=volumes, resync=resync,
                  clean_delay=float(clean_delay), notify=_notify_command(ctx, raw.get("notify")),
                  writeback_cache=ctx.boolean(raw.get("writeback_cache", False), "writeback_cache"))


def _notify_command(ctx: _Ctx, raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw.strip():
        return ("sh", "-c", raw)
    if isinstance(raw, list) and raw and all(isinstance(a, str) and a for a in raw):
        return tuple(raw)
    raise ctx.err("notify", f"expected a command: a string (run by sh -c) or a list of "
                  f"non-empty words, e.g. 'mail -s \"vmd: $VMD_EVENT\" root', got {raw!r}")


def _remote_timeout(ctx: _Ctx, raw: Any, key: str) -> float:
    try:
        t = parse_duration(raw)
    except ValueError as e:
        raise ctx.err(key, str(e)) from None
    if t <= 0:
        raise ctx.err(key, f"must be more than 0 seconds, got {raw!r}")
    return t


def _rcopy_config(ctx: _Ctx, raw: Any, key: str) -> RcopyConfig | None:
    if raw is None:
        return None
    r = ctx.mapping(raw, key, _RCOPY_KEYS)
    target = r.get("target")
    if isinstance(target, str) and target.strip():
        import shlex

        try:
            argv = tuple(shlex.split(target))
        except ValueError as e:
            raise ctx.err(f"{key}.target", f"cannot split the command: {e}") from None
    elif isinstance(target, list) and target and all(isinstance(a, str) and a for a in target):
        argv = tuple(target)
    else:
        raise ctx.err(f"{key}.target", "expected a command (string or list), e.g. "
                      "'ssh HOST vmd -c CONFIG rcopy receive VOLUME'")
    try:
        period = parse_duration(r.get("period", "5min"))
    except ValueError as e:
        raise ctx.err(f"{key}.period", str(e)) from None
    return RcopyConfig(target=argv, period=period)


class VolumeRefused(ConfigError):
    """What the start's checks find wrong with one volume's files (not with
    the config): the daemon refuses that volume and serves the others."""


class ImageSizeError(VolumeRefused):
    def __init__(self, message: str, actual: int):
        super().__init__(message)
        self.actual = actual


# One file under two names (vmd/samefile.py compares serving volumes' files too).
Ident = tuple[int, int]

ALIAS = "the same file under another name (a hard link, a symlink or a bind mount)"


def ident(path: str | os.PathLike[str]) -> Ident | None:
    """The (st_dev, st_ino) of an existing file; None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _local_files(vc: VolumeConfig) -> Iterator[tuple[str, Path]]:
    """(config key, path) of each file of `vc` on this host."""
    key = f"volumes.{vc.name}"
    images = "plexes" if vc.layout == "mirror" else "columns"
    for i, p in enumerate(vc.plexes):
        if isinstance(p, Path):
            yield f"{key}.{images}[{i}]", p
    yield f"{key}.log", vc.log
    if vc.raid5_log is not None:
        yield f"{key}.raid5_log", vc.raid5_log


def shared_in_config(cfg: Config) -> dict[str, str]:
    """The volumes of `cfg` with an existing file that is another file of the
    config under another name, each with why (the config check compares paths
    as written). Both volumes are refused: which one the file is, only the
    administrator knows, and opening either may resync over the other."""
    owner: dict[Ident, tuple[str, str, Path]] = {}
    out: dict[str, str] = {}
    for vc in cfg.volumes.values():
        for key, p in _local_files(vc):
            i = ident(p)
            if i is None:
                continue
            name, okey, op = owner.setdefault(i, (vc.name, key, p))
            if okey != key:
                out.setdefault(vc.name, f"{cfg.path}: {key}: {p} is {okey} ({op}): {ALIAS}")
                out.setdefault(name, f"{cfg.path}: {okey}: {op} is {key} ({p}): {ALIAS}")
    return out


def check_environment(cfg: Config, grown_from: dict[str, int] | None = None) -> dict[str, str]:
    """Checks against the disk, before anything is mounted or created.
    `grown_from`: per volume, the other size its images may have (the size
    before a `vmd resize` a crash interrupted, which the start completes).
    Returns the volumes to refuse, with why (VolumeRefused)."""
    ctx = _Ctx(cfg.path)
    _check_dir_writable(ctx, cfg.mountpoint.parent, "mountpoint")
    if cfg.mountpoint.exists() and not cfg.mountpoint.is_dir():
        raise ctx.err("mountpoint", f"{cfg.mountpoint} exists and is not a directory")
    _check_dir_writable(ctx, cfg.socket.parent, "socket")
    refused = shared_in_config(cfg)
    for vol in cfg.volumes.values():
        try:
            check_volume_environment(cfg.path, vol, (grown_from or {}).get(vol.name))
        except VolumeRefused as e:
            refused.setdefault(vol.name, str(e))
    return refused


def check_volume_environment(cfg_path: Path, vol: VolumeConfig, grown_from: int | None) -> None:
    """One volume's part of `check_environment` (also `vmd start VOLUME`'s)."""
    key = f"volumes.{vol.name}"
    images = "plexes" if vol.layout == "mirror" else "columns"
    # A volume that exists (its log does) opens an image of another size
    # as a failed plex (IOFAIL, naming both sizes) and serves the others:
    # one image cut short must not keep every volume from starting.
    exists = vol.log.exists()
    for i, p in enumerate(vol.plexes):
        if not isinstance(p, Path):
            continue  # a remote export's size is checked when it is opened
        try:
            check_image(p, vol.image_size, f"{cfg_path}: {key}.{images}[{i}]", grown_from,
                        what=vol.image_what, any_size=exists)
        except ImageSizeError as e:
            if e.actual <= vol.image_size:
                raise
            # Only the lost log knew: say what most likely happened.
            size = e.actual * (1 if vol.layout == "mirror" else len(vol.plexes) - 1)
            raise VolumeRefused(
                f"{e}. The image is bigger than the config says: most likely an earlier `vmd "
                f"resize {vol.name}` grew it, which only its sidecar log {vol.log} (missing) "
                f"recorded. Set `size: {format_size(size)}` for volumes.{vol.name} in "
                f"{cfg_path}, then `vmd start {vol.name} --recover-all[=IMAGE]` (the log is "
                f"missing: `vmd start {vol.name}` alone says which image to resync from)") from None
    _check_dir_writable(_Ctx(cfg_path), vol.log.parent, f"{key}.log")


def check_image(path: Path, size: int, where: str, or_size: int | None = None, *,
                what: str = "the volume", any_size: bool = False) -> None:
    """An existing image must be a regular file (or block device) of exactly
    `size` bytes, the size of `what` (the volume, or a RAID-5 column), unless
    `any_size` (opening it checks the size)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir() and not _creatable(parent):
            raise ConfigError(f"{where}: directory {parent} does not exist and cannot be created") from None
        if parent.is_dir() and not _writable(parent):
            raise ConfigError(f"{where}: directory {parent} is not writable") from None
        return
    except OSError as e:
        if any_size:
            return  # an existing volume's: opened IOFAIL, naming why; the others serve
        raise ConfigError(f"{where}: cannot stat {path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        actual = st.st_size
    elif stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as f:
            actual = f.seek(0, os.SEEK_END)
    else:
        raise ConfigError(f"{where}: {path} is not a regular file or block device")
    if actual != size and actual != or_size and not any_size:
        raise ImageSizeError(
            f"{where}: existing image {path} is {actual} bytes, {what} is {size} bytes "
            f"(vmd never truncates or grows an image; fix the size or the path)", actual)
    if not os.access(path, os.R_OK | os.W_OK) and not any_size:
        # (An existing volume's image on a filesystem gone read-only is what
        # a mirror is for: its plex opens IOFAIL and the volume serves.)
        raise ConfigError(f"{where}: {path} is not readable and writable")


def _writable(d: Path) -> bool:
    # os.access() says yes to root even on a read-only filesystem: really try.
    try:
        with tempfile.TemporaryFile(dir=d):
            return True
    except OSError:
        return False


def _creatable(d: Path) -> bool:
    """True if mkdir -p d would succeed: the nearest existing ancestor is writable."""
    for parent in [d, *d.parents]:
        if parent.exists():
            return parent.is_dir() and _writable(parent)
    return False


def _check_dir_writable(ctx: _Ctx, d: Path, key: str) -> None:
    if d.is_dir():
        if not _writable(d):
            raise ctx.err(key, f"directory {d} is not writable")
    elif not _creatable(d):
        raise ctx.err(key, f"directory {d} does not exist and cannot be created")
