"""Who may ask the proxy, and for what: its key (and key file), the Host names and
origins it answers, its body and queue caps (ProxyAccess), and the methods it serves
(MethodAllowList, PARAMETER_RANGES)."""

from __future__ import annotations

import math
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..methods import METHODS, PARAMETRIC_METHODS, make_policy
from ..transport.guard import GuardPolicy, check_keys, host_name, local_origins, loopback_hosts
from .errors import ApiError, one_line
from .page import PAGE_PATHS
from .schema import DEFAULT_MODEL

# The numbers a proxy takes after a parametric method's colon (methods.py reads each as
# below). Far beyond them the steering only turns the answer into noise or copies the
# private text out verbatim, so they are refused. The paper's own weight (costeer's c)
# is about 1.78; auto is mix:1.
PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "mix": (-8.0, 8.0),  # mix:W, the weight on the device's delta
    "unsure": (-8.0, 8.0),  # unsure:W, the same weight before (1 - p_max)
    "bounded": (0.0, 8.0),  # bounded:B, the clip in nats per token (B > 0)
    "cos": (-8.0, 8.0),  # cos:LAMBDA (He et al. sweep about -1..3)
    "ada": (0.0, 1.0),  # ada:P, a probability (strictly between)
    "fit": (0.0, 8.0),  # fit:W, the weight on a long context (W > 0)
}
assert set(PARAMETER_RANGES) == set(PARAMETRIC_METHODS)


def _range(prefix: str) -> str:
    low, high = PARAMETER_RANGES[prefix]
    return f"{prefix}:NUMBER with {low:g} <= NUMBER <= {high:g}"


@dataclass(frozen=True)
class MethodAllowList:
    """The methods a proxy serves: `names` (shown by /v1/models, in order), and every
    PREFIX:NUMBER within PARAMETER_RANGES for the prefixes in `parametric`."""

    names: tuple[str, ...] = tuple(METHODS)  # the published methods (auto among them)
    parametric: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | None) -> "MethodAllowList":
        """`--methods`: comma-separated names; `mix`, `unsure`, `bounded` (or PREFIX:*, which
        `cos:*`, `ada:*` and `fit:*` need, those being methods of their own) allow every
        weight in range; PREFIX:NUMBER allows that one. None: the published methods."""
        if text is None:
            return cls()
        names: list[str] = []
        parametric: set[str] = set()
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            prefix, colon, value = entry.partition(":")
            if (value == "*" and prefix in PARAMETRIC_METHODS) or (not colon and prefix in PARAMETRIC_METHODS
                                                                  and prefix not in METHODS):
                parametric.add(prefix)
            elif colon and prefix in PARAMETRIC_METHODS:
                try:
                    names.append(_parametric_method(entry, prefix))
                except UserError as exc:
                    raise UserError(f"--methods: {exc}") from None
            elif entry in METHODS:
                names.append(entry)
            else:
                raise UserError(f"--methods: unknown method {entry[:60]!r}: choose from {', '.join(METHODS)}, "
                                f"{', '.join(sorted(PARAMETRIC_METHODS))} or PREFIX:NUMBER")
        if not names and not parametric:
            raise UserError("--methods names no method")
        return cls(tuple(dict.fromkeys(names)), frozenset(parametric))

    def allowed(self) -> str:
        return ", ".join([*self.names, *(_range(p) for p in sorted(self.parametric))])

    def resolve(self, name: str) -> str:
        """The method a request's model name selects, or an ApiError: 404 for a name that is
        no method, 400 (model_not_allowed) for one this proxy does not serve."""
        name = name or DEFAULT_MODEL
        shown = name[:60]
        prefix, colon, _ = name.partition(":")
        if colon and prefix in PARAMETRIC_METHODS:
            try:
                method = _parametric_method(name, prefix, check_range=prefix in self.parametric)
            except UserError as exc:
                raise _not_allowed(f"model {exc}; this proxy serves {self.allowed()}") from None
            if prefix in self.parametric or method in self.names:
                return method
        elif name in METHODS:
            if name in self.names:
                return name
        else:
            raise ApiError(404, f"model {shown!r} is not a costeer method: this proxy serves {self.allowed()}",
                           param="model", code="model_not_found")
        raise _not_allowed(f"model {shown!r} is not allowed on this proxy: it serves {self.allowed()}")


def _not_allowed(message: str) -> ApiError:
    return ApiError(400, one_line(message), param="model", code="model_not_allowed")


def _parametric_method(name: str, prefix: str, check_range: bool = True) -> str:
    """PREFIX:NUMBER's canonical name (mix:0.50 is mix:0.5), or a UserError: a number out
    of PARAMETER_RANGES (with `check_range`) or one that methods.py refuses."""
    try:
        value = float(name.partition(":")[2])
    except ValueError:
        value = math.nan
    low, high = PARAMETER_RANGES[prefix]
    if check_range and math.isfinite(value) and not low <= value <= high:
        raise UserError(f"{name[:60]!r} is out of range: this proxy takes {_range(prefix)}")
    try:
        return make_policy(name).name  # a policy object only: no model work
    except UserError as exc:
        raise UserError(one_line(f"{name[:60]!r}: {exc}")) from None


@dataclass(frozen=True)
class ProxyAccess:
    """Who may ask the proxy, from where, and for how much: `costeer proxy`'s flags.

    `api_key`: the key every request must carry (Authorization: Bearer KEY); None asks
    none (the command allows that on a loopback bind only). `host` and `port`: the bind;
    Host names allowed are the loopback ones, the bound name (unless 0.0.0.0 or ::) and
    `allow_hosts`; origins allowed are the proxy's own pages at those names and
    `allow_origins`: a browser page of any other origin is refused."""

    api_key: str | None
    host: str = "127.0.0.1"
    port: int = 8008
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 2 * 2**20
    methods: MethodAllowList = MethodAllowList()
    max_queue: int = 8

    def __post_init__(self) -> None:  # refused at start, as one line
        if self.api_key is not None:
            check_keys([self.api_key], label="the proxy's API key")
        if self.max_queue < 1 or self.max_body_bytes < 1:
            raise UserError("--max-queue and --max-body-bytes must be >= 1")
        for origin in self.allow_origins:
            scheme, sep, rest = origin.partition("://")
            if scheme.lower() not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
                raise UserError(f"--allow-origin takes scheme://host[:port] (such as http://localhost:3000), "
                                f"got {origin[:80]!r}")

    def hosts(self) -> frozenset[str]:
        bound = {host_name(self.host)} - {"0.0.0.0", "::", ""}
        return loopback_hosts() | bound | {host_name(h) for h in self.allow_hosts}

    def guard_policy(self) -> GuardPolicy:
        origins = local_origins(self.hosts(), self.port) | {o.lower().rstrip("/") for o in self.allow_origins}
        # the chat page holds no secret, and a browser opening it cannot send the key: served without
        return GuardPolicy(api_keys=(self.api_key,) if self.api_key else (), open_paths=PAGE_PATHS,
                           allowed_hosts=self.hosts(), allowed_origins=origins, require_json=True,
                           max_body_bytes=self.max_body_bytes, max_in_flight=max(64, 4 * self.max_queue),
                           host_hint=" (allow it with --allow-host)", origin_hint=" (allow an origin with --allow-origin)")


def proxy_key_path() -> Path:
    """Where `costeer proxy` keeps its key: $XDG_CONFIG_HOME (or ~/.config)/costeer/proxy-key."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path(os.path.expanduser("~")) / ".config"
    return root / "costeer" / "proxy-key"


def proxy_key(path: Path | None = None) -> tuple[str, Path, bool]:
    """The proxy's key from its file, and whether it was made now: a missing file is made
    with a new key (secrets.token_urlsafe(32)), mode 0600, in a folder made 0700. A file
    other users could read or change, or a folder they could write to, is refused (not
    fixed: the key may have leaked; a new one is one delete away)."""
    path = path or proxy_key_path()
    folder = path.parent
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        mode = folder.stat()
    except OSError as exc:
        raise UserError(f"cannot make the proxy key's folder {folder}: {exc.strerror}") from None
    if mode.st_uid != os.getuid() or mode.st_mode & 0o022:
        raise UserError(f"the proxy key's folder {folder} is not yours alone (others can write to it): "
                        f"chmod 700 {folder}, or pass --api-key")
    created = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # another proxy made it just now
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        else:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            created = True
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:  # a symbolic link (ELOOP), a folder, no permission
        raise UserError(f"cannot read the proxy key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise UserError(f"the proxy key file {path} is not a file of yours: delete it to make a new key")
        if info.st_mode & 0o077:
            raise UserError(f"the proxy key file {path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}), "
                            f"so it is refused: chmod 600 {path} if nobody else could have read it, else delete "
                            "it to make a new key")
        text = file.read(4096).decode("ascii", "replace").strip()
    try:
        (key,) = check_keys([text])
    except UserError as exc:
        raise UserError(f"the proxy key file {path}: {exc} (delete it to make a new key)") from None
    return key, path, created
