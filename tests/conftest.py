"""Shared fixtures. Tests marked `models` run the real default GGUF models
(assembled into the user cache on first use, as `costeer` itself does)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import settings

from support.early import Early
from support.example_profile import EXAMPLE_PROFILE
from support.fuzz import FUZZ_FULL
from support.workers import MODELS_WORKER


def _one_default_ssl_context(package: str) -> None:
    """Every client of httpx (costeer's wire client, each httpx.get) or of its fork httpx2 (the
    openai SDK's) parses the CA bundle into an SSL context of its own: 40-50 ms of CPU, some
    1,000 times a suite, for clients that speak plain HTTP to loopback. Here the default
    context (verify on, no client certificate) is built once per CA setting and shared, as
    httpx suggests for programs that make many clients; any other request builds its own."""
    import importlib

    try:
        transports = importlib.import_module(f"{package}._transports.default")
    except ImportError:
        return
    build = transports.create_ssl_context
    built: dict[tuple[str | None, str | None], object] = {}

    def create_ssl_context(verify=True, cert=None, trust_env=True):
        if verify is not True or cert is not None or not trust_env:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        where = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if where not in built:
            built[where] = build()
        return built[where]

    transports.create_ssl_context = create_ssl_context


_one_default_ssl_context("httpx")
_one_default_ssl_context("httpx2")


# Bytecode caches (__pycache__, ignored by git) are written even where PYTHONDONTWRITEBYTECODE
# is set, in this process, the xdist workers and every Python a test starts: without them each
# process compiles the package and rewrites the tests' asserts again, about 7 s per process here.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(scope="session", autouse=True)
def private_context_cache(tmp_path_factory):
    """Every test, and every `costeer` it starts, keeps its context cache in a temporary
    folder: the user's own cache is never read or written."""
    folder = tmp_path_factory.mktemp("context-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COSTEER_CONTEXT_CACHE_DIR", str(folder))
        yield folder


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "early(job): the test waits on job(folder), begun when the session "
                                       "starts (support/early.py); the fixture early_result gives its result")
    if config.getoption("dist", "no") == "loadgroup" and not _in_xdist_worker():
        _refuse_xdist_that_cannot_group()


def _refuse_xdist_that_cannot_group() -> None:
    """pytest-xdist up to 3.8 groups tests by renaming them (`name@group`), which pytest 9.2
    no longer lets it do (pytest-xdist#1386): the groups would be silently ignored and the
    real models would run on both workers at once."""
    from importlib.metadata import version

    from packaging.version import Version

    if Version(pytest.__version__) >= Version("9.2") and Version(version("pytest-xdist")) <= Version("3.8.0"):
        raise pytest.UsageError(f"pytest {pytest.__version__} with pytest-xdist {version('pytest-xdist')} ignores "
                                "xdist_group: install pytest<9.2 (pyproject.toml's test extra), or run with -n 0")


def _in_xdist_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The suite runs on two xdist workers (pyproject's addopts, `--dist loadgroup`). Tests of
    the real models run on one of them, one after another: two llama.cpp processes on two
    cores slow each other about 6x. Tests that wait on a job of their own (`early`) go first,
    so that the other worker computes while they wait."""
    for item in items:
        if item.get_closest_marker("models") or item.get_closest_marker("engines"):
            item.add_marker(MODELS_WORKER)
    if _in_xdist_worker():  # tests that wait on an `early` job first: the other worker works meanwhile
        items.sort(key=lambda item: item.get_closest_marker("early") is None)


@pytest.fixture(scope="session", autouse=True)
def early_jobs(request, tmp_path_factory, private_context_cache):
    """The jobs of every selected test marked `early`, begun now (support/early.py). Not on
    an xdist worker: it collects every test but runs only some, and the other worker keeps
    the second core busy anyway, so each job runs when its test asks."""
    jobs = Early(tmp_path_factory.mktemp("early"))
    if not _in_xdist_worker():
        for item in request.session.items:
            marker = item.get_closest_marker("early")
            if marker is not None:
                jobs.start(marker.args[0])
    yield jobs
    jobs.close()


@pytest.fixture
def early_result(request, early_jobs) -> Callable[[], object]:
    """The result of this test's `early` job, waited for (run now if it was not begun)."""
    return lambda: early_jobs.result(request.node.get_closest_marker("early").args[0])


def pytest_runtest_setup(item: pytest.Item) -> None:
    """torch, once a test has loaded it (tiny Hugging Face models, the eval's embedding model),
    computes on one thread: on 2 shared cores its 2 OpenMP threads spin against each other
    and the test's own server threads, which cost these tiny models 2-3 times the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_costeer():
    from costeer import CoSteer

    cs = CoSteer(quiet=True, context_cache=False)  # every prefill cold: tests compare against it
    cs.model("llm"), cs.model("slm")
    yield cs
    cs.close()


@pytest.fixture(scope="session")
def tiny_hf_pair(tmp_path_factory):
    """Tiny Hugging Face models, a cloud (3 layers) and a device (2), built once per process
    (support/tiny_hf.py): their folders. Tests that use them carry TORCH_IN_PROCESS."""
    from support.tiny_hf import make_model_pair

    return make_model_pair(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def profile_text() -> str:
    return EXAMPLE_PROFILE.read_text(encoding="utf-8")


@pytest.fixture
def library_stderr(caplog) -> Callable[[], str]:
    """What a Python program that set up no logging sees on stderr from costeer's library
    code: Python's last-resort handler prints each WARNING-or-above record's message, one
    line each (test_cli shows it in a real process). Under pytest the root logger has
    handlers, so the last resort never runs: this reads the records. Each call returns
    the lines logged since the last."""

    def read() -> str:
        text = "".join(record.getMessage() + "\n" for record in caplog.records
                       if record.name.startswith("costeer") and record.levelno >= logging.WARNING)
        caplog.clear()
        return text

    return read


# --- how hard the random tests push (support/fuzz.py) -----------------------------------------
settings.register_profile("suite")  # hypothesis's defaults
settings.register_profile("full", max_examples=1000)  # for @given tests that set no count of their own
settings.load_profile("full" if FUZZ_FULL else "suite")


# --- `costeer ARGS` in this process ----------------------------------------------------------

@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


# Warnings Python does not print unless asked (its default filters)
QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture
def costeer_in_process(capfd, caplog) -> Callable[..., CliResult]:
    """`costeer ARGS` as a shell sees it, run by cli.main in this process (a fresh Python
    per case costs about 2 s): the exit status, and what reached file descriptors 1 and 2
    (native libraries' output counts too), plus the lines Python would have printed there
    itself: warnings its default filters show, and records of loggers that have no handler.
    The environment is restored after each call, as a process's would vanish with it."""
    from costeer import cli

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        saved = dict(os.environ)
        os.environ.update(env or {})
        capfd.readouterr()
        caplog.clear()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                try:
                    code = cli.main(list(args))
                except SystemExit as exc:
                    code = exc.code
        finally:
            os.environ.clear()
            os.environ.update(saved)
        out, err = capfd.readouterr()
        if isinstance(code, str):  # sys.exit("message"): Python prints it and exits 1
            code, err = 1, f"{err}{code}\n"
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
                       if not issubclass(w.category, QUIET_WARNINGS))
        # costeer's records went to stderr through main's own handler; others would reach the last resort
        err += "".join(r.getMessage() + "\n" for r in caplog.records
                       if r.levelno >= logging.WARNING and not r.name.startswith("costeer") and unhandled(r.name))
        return CliResult(code or 0, out, err)

    return run


def unhandled(logger_name: str) -> bool:
    """Whether a record of this logger meets no handler below the root: in a process that set
    up no logging, Python's last resort prints it to stderr."""
    logger: logging.Logger | None = logging.getLogger(logger_name)
    while logger is not None and logger is not logging.root:
        if logger.handlers:
            return False
        logger = logger.parent if logger.propagate else None
    return True
