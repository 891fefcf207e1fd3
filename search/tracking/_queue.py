"""A background queue for the driver's MLflow calls, so a slow or absent tracking server never
holds up Tune's driver loop.

Tune runs callbacks in its single driver loop: a synchronous MLflow call there blocks every trial
from starting or finishing, and MLflow's HTTP client retries for about 4 minutes before raising
(which then ends the sweep). Here callbacks only append to a queue (microseconds); one daemon
thread sends the operations in order. An operation that fails for a transient reason (connection
refused, timeout, 5xx, a locked database) stays at the head of the queue and is retried with
exponential backoff; nothing behind it overtakes it, so a trial's run exists before its metrics
are sent. While a tracking server does not answer, a cheap probe (an HTTP request with a 2 s
timeout, every second) watches for its return and ends the backoff at once: a server back
during the sweep, or during the end's wait, gets the buffered operations within seconds rather
than after a backoff of up to `max_backoff_s`. Operations must be idempotent (the server may have applied one whose reply was lost):
`search.tracking` looks runs and models up by tag before creating them and gives metrics fixed
timestamps. A permanent error (a rejected value) drops that one operation with a warning.
No Ray, Optuna or torch here.
"""
from __future__ import annotations

import collections
import http.client
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# MLflow error codes that a retry cannot fix
PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                   "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
                   "ENDPOINT_NOT_FOUND", "MALFORMED_REQUEST", "FEATURE_DISABLED", "NOT_IMPLEMENTED"}

# MLflow's own HTTP retries (7, backoff factor 2: about 4 minutes) would hold the background
# thread as well, and the sweep's end waits on it: retry briefly there and let the queue back off.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def configure_http_retries() -> None:
    """Short MLflow HTTP retries for this process (values the user set are kept)."""
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)


def is_transient(exc: BaseException) -> bool:
    """True for errors a later retry can fix: the server or database is away or busy."""
    code = getattr(exc, "error_code", None)
    if code is not None:
        return str(code) not in PERMANENT_CODES
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    try:
        import requests

        if isinstance(exc, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    try:
        import sqlalchemy.exc

        if isinstance(exc, sqlalchemy.exc.OperationalError):  # database is locked
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def short_reason(exc: BaseException) -> str:
    """A few words on why a call failed (MLflow's messages embed a whole urllib3 repr)."""
    text = str(exc)
    for needle, words in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Read timed out", "timed out"), ("Name or service not known", "unknown host"),
                          ("Max retries exceeded", "no connection"), ("database is locked", "database is locked")):
        if needle in text:
            return words
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:160]


def server_probe(tracking_uri: str, timeout_s: float = 2.0) -> Callable[[], bool] | None:
    """For an http(s):// tracking URI, a function telling whether the server answers at all (any
    HTTP status counts: 401 or 404 still means it is back); None for other stores (a database
    file has no server to come back). Credentials in the URI are not sent.

    Args:
        tracking_uri: the sweep's tracking URI.
        timeout_s: how long one probe waits for the answer.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    scheme, rest = tracking_uri.split("://", 1)
    netloc, _, path = rest.partition("/")
    host = netloc.rsplit("@", 1)[-1]
    path = "/" + path.split("?", 1)[0].strip("/")
    health = path.rstrip("/") + "/health"
    conn_type = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection

    def probe() -> bool:
        conn = conn_type(host, timeout=timeout_s)
        try:
            conn.request("GET", health)
            conn.getresponse().read()
            return True
        except ssl.SSLError:  # a TLS handshake answered: the server is there
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    return probe


@dataclass
class Op:
    fn: Callable[..., Any]
    args: tuple
    label: str


class BackgroundQueue:
    """Ordered, retried, non-blocking execution of operations on one daemon thread."""

    def __init__(self, name: str = "mlflow-logger", first_backoff_s: float = 0.5, max_backoff_s: float = 15.0,
                 announce: Callable[[str], None] | None = None, probe: Callable[[], bool] | None = None,
                 probe_every_s: float = 1.0) -> None:
        self._ops: collections.deque[Op] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._closing = False
        self.first_backoff_s, self.max_backoff_s = first_backoff_s, max_backoff_s
        self.probe, self.probe_every_s = probe, probe_every_s  # see server_probe
        self.down_since: float | None = None  # wall time of the first failure of the current outage
        self.last_error = ""
        self.last_progress = time.monotonic()
        self.sent = 0
        self.dropped: list[str] = []  # labels of operations refused for good
        self.outages = 0
        self.announce = announce or (lambda line: print(line, flush=True))
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, label: str = "") -> None:
        """Queue `fn(*args)`; returns at once."""
        with self._cv:
            if self._closing and not self._thread.is_alive():
                raise RuntimeError("the MLflow logger is closed")
            self._ops.append(Op(fn, args, label or getattr(fn, "__name__", "op")))
            self._cv.notify_all()

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._ops)

    def _loop(self) -> None:
        backoff = self.first_backoff_s
        while True:
            with self._cv:
                while not self._ops and not self._closing:
                    self._cv.wait()
                if not self._ops:
                    return
                op = self._ops[0]
                self._busy = True
            try:
                op.fn(*op.args)
            except Exception as e:  # noqa: BLE001 - classified below; the driver must never see it
                if is_transient(e):
                    self._failed(e)
                    with self._cv:
                        self._busy = False
                    self._wait_to_retry(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                self.dropped.append(op.label)
                log.warning("MLflow refused %s, skipped: %s", op.label, str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            else:
                self.sent += 1
                if self.down_since is not None:
                    self.announce(f"mlflow: tracking server reachable again after {time.time() - self.down_since:.0f} s; "
                                  f"sending {len(self._ops)} buffered logging operations")
                    self.down_since = None
            backoff = self.first_backoff_s
            with self._cv:
                if self._ops and self._ops[0] is op:  # close() may have cleared the queue meanwhile
                    self._ops.popleft()
                self._busy = False
                self.last_progress = time.monotonic()
                self._cv.notify_all()

    def _wait_to_retry(self, backoff: float) -> None:
        """Wait out the backoff, or less: when the probe says the server is away, retry as soon as
        it answers again. A server that answers but failed the call (a 5xx, a locked database) gets
        the whole backoff. close() shortens nothing: the end waits its own time."""
        deadline = time.monotonic() + backoff
        away = self.probe is not None and not self.probe()
        while (left := deadline - time.monotonic()) > 0:
            with self._cv:
                self._cv.wait(timeout=min(left, self.probe_every_s) if away else left)
            if away and self.probe():
                return

    def _failed(self, e: BaseException) -> None:
        self.last_error = short_reason(e)
        if self.down_since is None:
            self.down_since = time.time()
            self.outages += 1
            self.announce(f"mlflow: tracking unavailable ({self.last_error}); trials go on, "
                          f"logging is buffered and retried in the background")

    def drain(self, patience_s: float) -> bool:
        """Wait until every queued operation is sent, as long as the queue keeps making progress:
        give up once nothing has been sent for `patience_s` seconds. True if drained."""
        with self._cv:
            self.last_progress = time.monotonic()
            while self._ops:
                idle = time.monotonic() - self.last_progress
                if idle >= patience_s:
                    return False
                self._cv.wait(timeout=min(0.5, patience_s - idle))
            return True

    def close(self, patience_s: float) -> int:
        """Drain (see `drain`), stop the thread, and return how many operations were not sent."""
        self.drain(patience_s)
        with self._cv:
            self._closing = True
            left = len(self._ops)
            self._ops.clear()
            self._cv.notify_all()
        self._thread.join(timeout=max(1.0, min(patience_s, 60.0)))
        return left
