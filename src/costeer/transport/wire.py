"""The device's HTTP connection to a cloud: keep-alive, byte counts, an optional
JSON-lines log of every message both ways, and optional simulated latency."""

from __future__ import annotations

import json
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
    """The cloud answered 4xx/5xx; `status` says which."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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
        self._log = WireLog(wire_log) if wire_log else None
        self._half_rtt_s = max(0.0, simulate_rtt_ms) / 2000.0
        self.counters = WireCounters()
        self._lock = threading.Lock()

    def request(self, method: str, path: str, payload: dict | None = None) -> dict | None:
        body = json.dumps(payload).encode() if payload is not None else b""
        if self._log:
            self._log.write({"ts": time.time(), "direction": "device->cloud", "method": method, "path": path,
                             "bytes": len(body), "body": payload})
        if self._half_rtt_s:
            time.sleep(self._half_rtt_s)
        try:
            response = self._http.request(method, path, content=body or None,
                                          headers={"Content-Type": "application/json"} if body else None)
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach the cloud at {self.base_url}: {exc.__class__.__name__}: {exc}") from None
        if self._half_rtt_s:
            time.sleep(self._half_rtt_s)
        with self._lock:
            self.counters.bytes_to_cloud += len(body)
            self.counters.bytes_from_cloud += len(response.content)
            self.counters.round_trips += 1
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = {"text": response.text[:500]}
        if self._log:
            self._log.write({"ts": time.time(), "direction": "cloud->device", "path": path, "status": response.status_code,
                             "bytes": len(response.content), "body": data})
        if response.status_code == 401:
            raise CloudRefused(f"the cloud at {self.base_url} needs a valid API key (--api-key or COSTEER_API_KEY)", 401)
        if response.status_code >= 400:
            message = _error_message(data) or response.text[:200]
            raise CloudRefused(f"the cloud refused {method} {path} ({response.status_code}): {message}", response.status_code)
        return data

    def close(self) -> None:
        self._http.close()
        if self._log:
            self._log.close()


def _error_message(data: object) -> str | None:
    """The message of costeer's, FastAPI's or OpenAI's error bodies, first line only."""
    if not isinstance(data, dict):
        return None
    found = data.get("message") or data.get("detail") or data.get("error")
    if isinstance(found, dict):
        found = found.get("message")
    return str(found).splitlines()[0][:300] if found else None
