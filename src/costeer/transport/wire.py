"""The device's HTTP connection to a cloud: keep-alive, byte counts, an optional
JSON-lines log of every message both ways, and optional simulated latency."""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..errors import UserError


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


class WireLog:
    """Every message as one JSON line; the API key (a header) is never written."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write the wire log {path}: {exc.strerror}") from None
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
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.timeout_s = timeout_s
        self._log = WireLog(wire_log) if wire_log else None
        self._half_rtt_s = max(0.0, simulate_rtt_ms) / 2000.0
        self.counters = WireCounters()
        self._lock = threading.Lock()

    def request(self, method: str, path: str, payload: dict | None = None) -> dict | None:
        response = self._send(method, path, payload, stream=False)
        if self._half_rtt_s:
            time.sleep(self._half_rtt_s)
        data = self._answer(path, response)
        self._raise_for_status(method, path, response, data)
        return data

    def stream(self, method: str, path: str, payload: dict) -> "LineStream":
        """A request whose answer comes as JSON lines, each read as soon as it arrives
        (and, with a simulated RTT, delivered half of it after it arrived)."""
        response = self._send(method, path, payload, stream=True)
        if response.status_code >= 400:
            try:
                response.read()
            except httpx.HTTPError as exc:
                raise self._unreachable(method, path, exc) from None
            finally:
                response.close()
            self._raise_for_status(method, path, response, self._answer(path, response))
        return LineStream(self, response, path)

    def _send(self, method: str, path: str, payload: dict | None, stream: bool) -> httpx.Response:
        """Log, wait half the simulated RTT, send, count; the answer's body is not read when streaming."""
        body = json.dumps(payload).encode() if payload is not None else b""
        if self._log:
            self._log.write({"ts": time.time(), "direction": "device->cloud", "method": method, "path": path,
                             "bytes": len(body), "body": payload})
        if self._half_rtt_s:
            time.sleep(self._half_rtt_s)
        try:
            request = self._http.build_request(method, path, content=body or None,
                                               headers={"Content-Type": "application/json"} if body else None)
            response = self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise self._unreachable(method, path, exc) from None
        with self._lock:
            self.counters.bytes_to_cloud += len(body)
            self.counters.round_trips += 1
        return response

    def _answer(self, path: str, response: httpx.Response) -> dict | None:
        """A read answer's JSON (or the start of its text), counted and logged."""
        with self._lock:
            self.counters.bytes_from_cloud += len(response.content)
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = {"text": response.text[:500]}
        if self._log:
            self._log.write({"ts": time.time(), "direction": "cloud->device", "path": path, "status": response.status_code,
                             "bytes": len(response.content), "body": data})
        return data

    def _raise_for_status(self, method: str, path: str, response: httpx.Response, data: object) -> None:
        if response.status_code == 401:
            raise CloudRefused(f"the cloud at {self.base_url} needs a valid API key (--api-key or COSTEER_API_KEY)", 401)
        if response.status_code >= 400:
            message = _error_message(data) or response.text[:200]
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
        return CloudUnreachable(f"cannot reach the cloud at {self.base_url}: {exc.__class__.__name__}: {exc}", reason)

    def _received(self, path: str, line: bytes, record: object) -> None:
        with self._lock:
            self.counters.bytes_from_cloud += len(line) + 1
        if self._log:
            self._log.write({"ts": time.time(), "direction": "cloud->device", "path": path, "status": 200,
                             "bytes": len(line) + 1, "body": record})

    def close(self) -> None:
        self._http.close()
        if self._log:
            self._log.close()


class LineStream:
    """The JSON lines of one streamed answer. A thread reads them off the socket as
    they come, so a line's arrival time is known even if the device asks for it later."""

    def __init__(self, wire: WireClient, response: httpx.Response, path: str) -> None:
        self._wire, self._response, self._path = wire, response, path
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines():
                if line:
                    self._lines.put((time.monotonic(), line))
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
        self._wire._received(self._path, line.encode() if isinstance(line, str) else line, record)
        return record

    def close(self) -> None:
        self._response.close()
        self._reader.join(timeout=5)


def _error_message(data: object) -> str | None:
    """The message of costeer's, FastAPI's or OpenAI's error bodies, first line only."""
    if not isinstance(data, dict):
        return None
    found = data.get("message") or data.get("detail") or data.get("error")
    if isinstance(found, dict):
        found = found.get("message")
    return str(found).splitlines()[0][:300] if found else None
