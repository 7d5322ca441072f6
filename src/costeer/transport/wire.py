"""The device's HTTP connection to a cloud: keep-alive, byte counts, an optional
JSON-lines log of every message both ways, and optional simulated latency.

The server is not trusted: a reply is read in pieces and refused past a byte cap
(never held whole first), and server text is stripped of terminal control
characters before it reaches a message or a terminal (`printable`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from ..errors import UserError
from .guard import is_loopback

log = logging.getLogger(__name__)

# Far above any honest reply (the full float32 vector of a 151,936-token vocabulary is
# 0.8 MB in base64, a 64-node lookahead tree of top-1024 nodes 0.7 MB), far below
# what would hurt a device.
DEFAULT_MAX_REPLY_BYTES = 64 << 20
# CSI and OSC escape sequences whole, other two-byte ESC sequences, then any C0 control
# but tab and newline, DEL and C1 (\x9b alone is a CSI on some terminals)
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?"
                      r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def encode_body(payload: dict) -> bytes:
    """A request's body as the device sends it (and counts it in `bytes`)."""
    return json.dumps(payload).encode()


def printable(text: str) -> str:
    """Server-supplied text with terminal control characters and escape sequences removed,
    so a hostile server cannot recolour, hide or rewrite what the user's terminal shows."""
    return _CONTROL.sub("", text)


@dataclass
class WireCounters:
    bytes_to_cloud: int = 0
    bytes_from_cloud: int = 0
    round_trips: int = 0

    def since(self, earlier: "WireCounters") -> dict[str, int]:
        return {k: getattr(self, k) - getattr(earlier, k) for k in self.__dataclass_fields__}

    def copy(self) -> "WireCounters":
        return WireCounters(**self.__dict__)


class CloudRefused(UserError):
    """The cloud answered 4xx/5xx; `status` says which, `kind` the error body's `error`
    (e.g. unknown_session), `retry_after` its Retry-After seconds."""

    def __init__(self, message: str, status: int, kind: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after


class CloudUnreachable(UserError):
    """No answer: the connection failed, dropped or timed out; `reason` says which, briefly."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReplyTooLarge(UserError):
    """The cloud sent more than the byte cap for one reply; reading stopped there."""


class WireLog:
    """Every message as one JSON line; the API key (a header) is never written.

    The log holds the public prompt and every token chosen, which the private context
    steered: it is created 0600 whatever the umask, and an existing log that group or
    others can read is tightened to 0600 (with a one-line notice)."""

    def __init__(self, path: str | Path) -> None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise UserError(f"cannot write the wire log {path}: {exc.strerror}") from None
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                os.fchmod(fd, 0o600)
                log.warning("costeer: the wire log %s was readable by others (%04o); it is now 0600", path, mode)
        except OSError as exc:  # not ours to change: say so, and log anyway
            log.warning("costeer: warning: the wire log %s is readable by others and cannot be made private: %s",
                        path, exc.strerror)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class WireClient:
    """JSON requests to one server. Body bytes are counted (headers are not)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        wire_log: str | Path | None = None,
        simulate_rtt_ms: float = 0.0,
        timeout_s: float = 300.0,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        url = self._http.base_url
        if api_key and url.scheme == "http" and not is_loopback(url.host):
            log.warning("costeer: warning: the API key goes to %s over plain http://, readable by anyone on the "
                        "network path; use https://", url.host)
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._log = WireLog(wire_log) if wire_log else None
        self._recordings: list[list[dict]] = []  # open `recording()` blocks
        self._half_rtt_s = max(0.0, simulate_rtt_ms) / 2000.0
        self.counters = WireCounters()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict]]:
        """A list that receives every record the wire log writes while the block runs: what
        one generation sent and received (the proxy's chat page shows it)."""
        records: list[dict] = []
        with self._lock:
            self._recordings.append(records)
        try:
            yield records
        finally:
            with self._lock:
                self._recordings.remove(records)

    def _record(self, record: dict) -> None:
        if self._log:
            self._log.write(record)
        with self._lock:
            for records in self._recordings:
                records.append(record)

    def request(self, method: str, path: str, payload: dict | None = None) -> dict | None:
        response = self._send(method, path, payload)
        body = self._read_capped(method, path, response)
        if self._half_rtt_s:
            time.sleep(self._half_rtt_s)
        data = self._answer(path, response.status_code, body)
        self._raise_for_status(method, path, response, body, data)
        return data

    def stream(self, method: str, path: str, payload: dict) -> "LineStream":
        """A request whose answer comes as JSON lines, each read as soon as it arrives
        (and, with a simulated RTT, delivered half of it after it arrived)."""
        response = self._send(method, path, payload)
        if response.status_code >= 400:
            body = self._read_capped(method, path, response)
            self._raise_for_status(method, path, response, body, self._answer(path, response.status_code, body))
        return LineStream(self, response, method, path)

    def _too_large(self, method: str, path: str) -> ReplyTooLarge:
        return ReplyTooLarge(f"the cloud at {self.base_url} sent more than {self.max_reply_bytes:,} bytes in reply "
                             f"to {method} {path}; reading stopped there (a misbehaving or hostile server)")

    def _read_capped(self, method: str, path: str, response: httpx.Response) -> bytes:
        """The whole body of a streamed response, refused (and the connection closed) the
        moment it passes the cap: a hostile server cannot make the device hold gigabytes."""
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_reply_bytes:
                raise self._too_large(method, path)
            chunks = []
            for chunk in _capped(response.iter_bytes(), self.max_reply_bytes):
                chunks.append(chunk)
            return b"".join(chunks)
        except _OverCap:
            raise self._too_large(method, path) from None
        except httpx.HTTPError as exc:
            raise self._unreachable(method, path, exc) from None
        finally:
            response.close()

    def _send(self, method: str, path: str, payload: dict | None) -> httpx.Response:
        """Log, wait half the simulated RTT, send, count; the answer's body is left unread."""
        body = encode_body(payload) if payload is not None else b""
        self._record({"ts": time.time(), "direction": "device->cloud", "method": method, "path": path,
                      "bytes": len(body), "body": payload})
        if self._half_rtt_s:
            time.sleep(self._half_rtt_s)
        try:
            request = self._http.build_request(method, path, content=body or None,
                                               headers={"Content-Type": "application/json"} if body else None)
            response = self._http.send(request, stream=True)  # read by the caller, within the cap
        except httpx.HTTPError as exc:
            raise self._unreachable(method, path, exc) from None
        with self._lock:
            self.counters.bytes_to_cloud += len(body)
            self.counters.round_trips += 1
        return response

    def _answer(self, path: str, status: int, body: bytes) -> dict | None:
        """A read answer's JSON (or the start of its text), counted and logged."""
        with self._lock:
            self.counters.bytes_from_cloud += len(body)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = {"text": body[:500].decode("utf-8", errors="replace")}
        self._record({"ts": time.time(), "direction": "cloud->device", "path": path, "status": status,
                      "bytes": len(body), "body": data})
        return data

    def _raise_for_status(self, method: str, path: str, response: httpx.Response, body: bytes, data: object) -> None:
        if response.status_code == 401:
            raise CloudRefused(f"the cloud at {self.base_url} needs a valid API key (--api-key or COSTEER_API_KEY)", 401)
        if response.status_code >= 400:
            message = _error_message(data) or printable(body[:200].decode("utf-8", errors="replace"))
            kind = data.get("error") if isinstance(data, dict) and isinstance(data.get("error"), str) else None
            try:
                retry_after = float(response.headers["retry-after"])
            except (KeyError, ValueError):
                retry_after = None
            raise CloudRefused(f"the cloud refused {method} {path} ({response.status_code}): {message}",
                               response.status_code, kind, retry_after)

    def _unreachable(self, method: str, path: str, exc: httpx.HTTPError) -> CloudUnreachable:
        if isinstance(exc, httpx.TimeoutException):
            return CloudUnreachable(f"the cloud at {self.base_url} did not answer {method} {path} within "
                                    f"{self.timeout_s:g} s ({exc.__class__.__name__})", f"no answer within {self.timeout_s:g} s")
        if isinstance(exc, httpx.ConnectError):
            reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
        else:
            reason = "connection dropped"
        return CloudUnreachable(f"cannot reach the cloud at {self.base_url}: {exc.__class__.__name__}: "
                                f"{printable(str(exc))}", reason)

    def _received(self, path: str, line: bytes, record: object) -> None:
        with self._lock:
            self.counters.bytes_from_cloud += len(line) + 1
        self._record({"ts": time.time(), "direction": "cloud->device", "path": path, "status": 200,
                      "bytes": len(line) + 1, "body": record})

    def close(self) -> None:
        self._http.close()
        if self._log:
            self._log.close()


class LineStream:
    """The JSON lines of one streamed answer. A thread reads them off the socket as
    they come, so a line's arrival time is known even if the device asks for it later."""

    def __init__(self, wire: WireClient, response: httpx.Response, method: str, path: str) -> None:
        self._wire, self._response, self._method, self._path = wire, response, method, path
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        pending = bytearray()
        try:
            # the cap counts the whole answer, every line together
            for chunk in _capped(self._response.iter_bytes(), self._wire.max_reply_bytes):
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    line = bytes(pending[:end]).strip()
                    del pending[:end + 1]
                    if line:
                        self._lines.put((time.monotonic(), line))
            if pending.strip():
                self._lines.put((time.monotonic(), bytes(pending).strip()))
        except _OverCap:
            self._response.close()
            self._lines.put((time.monotonic(), self._wire._too_large(self._method, self._path)))
        except Exception as exc:  # the answer broke off, or close() ended it
            self._lines.put((time.monotonic(), exc))
        finally:
            self._lines.put(None)

    def next(self) -> dict | None:
        """The next line, or None when the answer is complete."""
        try:
            item = self._lines.get(timeout=self._wire.timeout_s)
        except queue.Empty:
            raise CloudUnreachable(f"the cloud at {self._wire.base_url} sent nothing for {self._wire.timeout_s:.0f} s "
                                   f"on {self._path}", f"no answer within {self._wire.timeout_s:g} s") from None
        if item is None:
            self._lines.put(None)  # stays complete for later calls
            return None
        arrived, line = item
        if isinstance(line, ReplyTooLarge):
            self._lines.put(item)  # stays failed for later calls
            raise line
        if isinstance(line, Exception):
            raise CloudUnreachable(f"the cloud's answer on {self._path} broke off: {line.__class__.__name__}",
                                   "connection dropped")
        wait = arrived + self._wire._half_rtt_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"the cloud at {self._wire.base_url} sent a line that is not JSON on {self._path}") from None
        self._wire._received(self._path, line, record)
        return record

    def close(self) -> None:
        self._response.close()
        self._reader.join(timeout=5)


class _OverCap(Exception):
    pass


def _capped(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """`chunks`, raising _OverCap as soon as their total passes `limit` bytes."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise _OverCap
        yield chunk


def _error_message(data: object) -> str | None:
    """The message of costeer's, FastAPI's or OpenAI's error bodies, first line only,
    without control characters."""
    if not isinstance(data, dict):
        return None
    found = data.get("message") or data.get("detail") or data.get("error")
    if isinstance(found, dict):
        found = found.get("message")
    lines = str(found).splitlines() if found else []
    return printable(lines[0])[:300] if lines else None
