"""Flotilla's Python client: submit Python and shell tasks to a running
Flotilla master and get futures back, as with Dask's ``client.submit``.

    from flotilla import Client

    with Client() as client:                  # FLOTILLA_SERVER, FLOTILLA_TOKEN
        future = client.submit("response = 6 * 7")
        future.result()                       # 42

        def square(x):
            return x * x

        futures = client.map(square, range(1000))
        for f in client.as_completed(futures):
            print(f.id, f.result())

Standard library only. Every request is HTTP/JSON to the master's API; every
error the master answers is raised with its message.
"""

from __future__ import annotations

import inspect
import json
import os
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

__all__ = [
    "Client",
    "Future",
    "FlotillaError",
    "ConnectionFailed",
    "Unauthorized",
    "TaskFailed",
    "TaskCancelled",
    "DEFAULT_SERVER",
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
]
__version__ = "0.1.0"

DEFAULT_SERVER = "http://127.0.0.1:5000"
SERVER_ENV = "FLOTILLA_SERVER"
TOKEN_ENV = "FLOTILLA_TOKEN"

ALL_COMPLETED = "ALL_COMPLETED"
FIRST_COMPLETED = "FIRST_COMPLETED"

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
# The longest one long-poll asks the master to hold (its own cap is 300 s).
_MAX_POLL = 30.0
# A batch of tasks stays well below the master's 1 MiB body limit.
_BATCH_BYTES = 512 * 1024
_BATCH_TASKS = 1000
# The completion feed's far end: asking after it returns the current position.
_FEED_END = 2**63 - 1


class FlotillaError(Exception):
    """An error from the master (``status`` is the HTTP status) or on the way to it."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.status = status


class ConnectionFailed(FlotillaError):
    """The master could not be reached."""


class Unauthorized(FlotillaError):
    """The master wants a (different) token."""


class TaskFailed(FlotillaError):
    """A task ended in failure. ``traceback`` is the Python traceback (or the
    shell command's output), ``error`` the master's one-line reason, ``task``
    the full task view."""

    def __init__(self, task: Dict[str, Any]):
        self.task = task
        self.task_id: int = task["id"]
        self.error: str = task.get("error") or "failed"
        result = task.get("result") or {}
        response = result.get("response")
        self.traceback: str = response if isinstance(response, str) else ""
        self.stdout: str = result.get("stdout", "")
        message = f"task {self.task_id} {task.get('state', 'failed')}: {self.error}"
        if self.traceback:
            message += "\n" + self.traceback.rstrip()
        super().__init__(message)


class TaskCancelled(TaskFailed):
    """The task was cancelled before it finished."""


class Future:
    """A task submitted to the master. Cheap: it holds the task ID and, once
    known, the task's final view."""

    def __init__(self, client: "Client", task_id: int, feed_from: int):
        self.client = client
        self.id = task_id
        # Where in the completion feed this task's end will be found (at or after).
        self._feed_from = feed_from
        self._view: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        state = self._view["state"] if self._view else "pending"
        return f"<flotilla.Future task {self.id} {state}>"

    def _set(self, view: Dict[str, Any]) -> None:
        if view.get("state") in FINAL_STATES:
            self._view = view

    def view(self) -> Dict[str, Any]:
        """The task as the master sees it now (``GET /tasks/{id}``)."""
        if self._view is not None:
            return self._view
        view = self.client._get(f"/tasks/{self.id}")
        self._set(view)
        return view

    @property
    def state(self) -> str:
        return self.view()["state"]

    def done(self) -> bool:
        """Whether the task has finished (succeeded, failed or cancelled)."""
        return self.view()["state"] in FINAL_STATES

    def _wait(self, timeout: Optional[float]) -> Dict[str, Any]:
        if self._view is not None:
            return self._view
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _MAX_POLL if deadline is None else max(0.0, deadline - time.monotonic())
            view = self.client._get(f"/tasks/{self.id}?wait={min(left, _MAX_POLL):.3f}", extra_timeout=left)
            self._set(view)
            if self._view is not None:
                return self._view
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} still {view['state']} after {timeout} s")

    def result(self, timeout: Optional[float] = None) -> Any:
        """The task's ``response`` once it finished (waiting up to ``timeout``
        seconds; ``None``: as long as it takes). Raises ``TaskFailed`` (with
        the traceback) if it failed, ``TimeoutError`` if it is not done in time."""
        view = self._wait(timeout)
        if view["state"] == "cancelled":
            raise TaskCancelled(view)
        if view["state"] != "succeeded":
            raise TaskFailed(view)
        return (view.get("result") or {}).get("response")

    def exception(self, timeout: Optional[float] = None) -> Optional[TaskFailed]:
        """The ``TaskFailed`` the task ended with, or ``None`` if it succeeded."""
        view = self._wait(timeout)
        if view["state"] == "cancelled":
            return TaskCancelled(view)
        return None if view["state"] == "succeeded" else TaskFailed(view)

    @property
    def stdout(self) -> str:
        """What the finished task printed."""
        return (self._wait(None).get("result") or {}).get("stdout", "")

    def cancel(self) -> bool:
        """Cancels the task (``DELETE /tasks/{id}``): True when the master
        cancelled it (queued, or stopped while running), False when it had
        already finished. ``result()`` then raises ``TaskFailed`` (state
        ``cancelled``)."""
        return self.client.cancel(self)

    def cancelled(self) -> bool:
        """Whether the task ended cancelled."""
        return self.view()["state"] == "cancelled"


def _function_source(fn: Callable[..., Any]) -> str:
    """The source of a top-level function, or a clear error why it cannot ship."""
    if hasattr(fn, "__wrapped__"):
        raise TypeError(
            f"submit_function cannot ship `{getattr(fn, '__name__', fn)}`: it is decorated, and the decorator "
            "would not exist on the worker (ship the undecorated function)"
        )
    if not inspect.isfunction(fn):
        raise TypeError(f"submit_function needs a plain Python function, got {type(fn).__name__} {fn!r}")
    name = fn.__name__
    if name == "<lambda>":
        raise TypeError(
            "submit_function cannot ship a lambda: its source is not a definition the worker can run; "
            "define it with `def` at the top level of a module"
        )
    if "<locals>" in fn.__qualname__ or fn.__closure__:
        raise TypeError(
            f"submit_function cannot ship `{fn.__qualname__}`: it is defined inside another function "
            "(a closure); only top-level functions can run on a worker (pass what it captures as arguments)"
        )
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise TypeError(f"submit_function cannot read the source of `{name}`: {e}") from None
    if source.lstrip().startswith("@"):
        raise TypeError(
            f"submit_function cannot ship `{name}`: it is decorated, and the decorator would not exist on the worker"
        )
    return source


def _json_arguments(name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> str:
    for i, a in enumerate(args):
        _check_json(a, f"argument {i + 1} of {name}")
    for k, v in kwargs.items():
        _check_json(v, f"keyword argument `{k}` of {name}")
    return json.dumps({"args": list(args), "kwargs": kwargs})


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} cannot be sent: it must be JSON (numbers, strings, lists, dicts, "
                        f"booleans, None), got {type(value).__name__}: {e}") from None


def _call_code(source: str, name: str, arguments_json: str) -> str:
    return (
        f"{source}\n"
        "import json as _flotilla_json\n"
        f"_flotilla_call = _flotilla_json.loads({arguments_json!r})\n"
        f"response = {name}(*_flotilla_call['args'], **_flotilla_call['kwargs'])\n"
    )


def _template_code(template: str, item: Any) -> str:
    _check_json(item, "a map item")
    return f"import json as _flotilla_json\nitem = _flotilla_json.loads({json.dumps(item)!r})\n{template}"


class Client:
    """A connection to a running Flotilla master.

    ``url`` defaults to ``FLOTILLA_SERVER``, then ``http://127.0.0.1:5000``;
    ``token`` to ``FLOTILLA_TOKEN``. ``timeout`` bounds each plain request
    (long-polls get their wait on top). Use it as a context manager or call
    ``close()``; it holds no connection between requests.
    """

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None, timeout: float = 60.0):
        url = url or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        url = url.strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"invalid server URL {url!r}: expected http://host:port")
        self.url = url
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = timeout
        # The completion feed position last seen: a task submitted now ends after it.
        self._feed_seen: Optional[int] = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<flotilla.Client {self.url}>"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True

    # ----- HTTP -------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, extra_timeout: float = 0.0) -> Any:
        if self._closed:
            raise FlotillaError("this client is closed")
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout + extra_timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace") or e.reason
            if e.code == 401:
                raise Unauthorized(f"401 from {self.url}: {message}; set {TOKEN_ENV} (or pass token=) to the "
                                   "master's token", 401) from None
            raise FlotillaError(f"{method} {path}: {e.code}: {message}", e.code) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ConnectionRefusedError):
                what = "connection refused"
            else:
                what = f"cannot connect ({reason})"
            raise ConnectionFailed(f"{what} at {self.url}: is `flotilla up` running there? "
                                   f"(pass url= or set {SERVER_ENV})") from None
        except (ConnectionError, TimeoutError, OSError) as e:
            raise ConnectionFailed(f"{method} {path} at {self.url} failed: {e}") from None
        if not raw:
            return None
        return json.loads(raw)

    def _get(self, path: str, extra_timeout: float = 0.0) -> Any:
        return self._request("GET", path, extra_timeout=extra_timeout)

    def _post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body if body is not None else {})

    def _feed_position(self) -> int:
        """A position of the completion feed no later than now."""
        if self._feed_seen is None:
            self._feed_seen = self._get(f"/tasks/finished?after={_FEED_END}")["next"]
        return self._feed_seen

    # ----- tasks ------------------------------------------------------------

    def submit(self, code: str, node: Optional[int] = None, timeout: Optional[float] = None,
               shell: bool = False) -> Future:
        """Submits Python ``code`` (its result is the variable ``response``) or,
        with ``shell=True``, a shell command; ``node`` sends it straight to
        that worker's queue; ``timeout`` (seconds) stops the task if it runs
        longer (it then fails, "timed out")."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a string, got {type(code).__name__}")
        spec: Dict[str, Any] = {"type": "shell" if shell else "python", "command": code}
        if timeout is not None:
            spec["timeout"] = timeout
        feed_from = self._feed_position()
        path = "/send" if node is None else f"/send/{int(node)}"
        return Future(self, self._post(path, spec)["task_id"], feed_from)

    def submit_function(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Runs ``fn(*args, **kwargs)`` on a worker; the future's result is its
        return value. ``fn`` must be a top-level function (its source is
        shipped: imports go inside it); arguments and the return value must
        be JSON (tuples arrive as lists)."""
        source = _function_source(fn)
        code = _call_code(source, fn.__name__, _json_arguments(fn.__name__, args, kwargs))
        return self.submit(code)

    def submit_many(self, codes: Iterable[str], shell: bool = False,
                    timeout: Optional[float] = None) -> List[Future]:
        """Submits many code strings in as few requests as the body limit allows."""
        kind = "shell" if shell else "python"
        specs: List[Dict[str, Any]] = [{"type": kind, "command": c} for c in codes]
        if timeout is not None:
            for spec in specs:
                spec["timeout"] = timeout
        feed_from = self._feed_position()
        futures: List[Future] = []
        batch: List[Dict[str, Any]] = []
        size = 0
        for spec in specs:
            n = len(spec["command"]) + 64
            if batch and (size + n > _BATCH_BYTES or len(batch) >= _BATCH_TASKS):
                futures.extend(self._submit_batch(batch, feed_from))
                batch, size = [], 0
            batch.append(spec)
            size += n
        if batch:
            futures.extend(self._submit_batch(batch, feed_from))
        return futures

    def _submit_batch(self, batch: List[Dict[str, Any]], feed_from: int) -> List[Future]:
        ids = self._post("/tasks", {"tasks": batch})["task_ids"]
        return [Future(self, i, feed_from) for i in ids]

    def map(self, fn_or_template: Union[Callable[..., Any], str], iterable: Iterable[Any],
            timeout: Optional[float] = None) -> List[Future]:
        """One task per item, futures in the items' order. With a function:
        ``fn(item)`` (as ``submit_function``). With a string: that Python
        code, with the variable ``item`` set to the item (JSON), e.g.
        ``client.map("response = item * 2", range(10))``. Submitted in batches."""
        items = list(iterable)
        if callable(fn_or_template):
            source = _function_source(fn_or_template)
            name = fn_or_template.__name__
            codes = [_call_code(source, name, _json_arguments(name, [x], {})) for x in items]
        elif isinstance(fn_or_template, str):
            codes = [_template_code(fn_or_template, x) for x in items]
        else:
            raise TypeError(f"map needs a function or a code string, got {type(fn_or_template).__name__}")
        if not codes:
            return []
        return self.submit_many(codes, timeout=timeout)

    def as_completed(self, futures: Iterable[Future], timeout: Optional[float] = None) -> Iterator[Future]:
        """Yields the futures as their tasks finish, following the master's
        completion feed: one long-poll returns every task that finished
        meanwhile (not one request per future). ``TimeoutError`` if some are
        not done within ``timeout`` seconds."""
        pending: Dict[int, List[Future]] = {}
        for f in futures:
            if f.client is not self and f.client.url != self.url:
                raise ValueError(f"{f!r} belongs to another master ({f.client.url})")
            pending.setdefault(f.id, []).append(f)
        for fid in [i for i, fs in pending.items() if fs[0]._view is not None]:
            yield from pending.pop(fid)
        if not pending:
            return
        after = min(f._feed_from for fs in pending.values() for f in fs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = _MAX_POLL if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} task(s) still unfinished after {timeout} s")
            page = self._get(f"/tasks/finished?after={after}&wait={min(left, _MAX_POLL):.3f}", extra_timeout=left)
            after = page["next"]
            self._feed_seen = max(self._feed_seen or 0, after)
            for view in page["tasks"]:
                fs = pending.pop(view["id"], None)
                if fs:
                    for f in fs:
                        f._set(view)
                    yield from fs

    def wait(self, futures: Iterable[Future], timeout: Optional[float] = None,
             return_when: str = ALL_COMPLETED) -> Tuple[Set[Future], Set[Future]]:
        """Waits for the futures (all, or with ``FIRST_COMPLETED`` the first);
        returns ``(done, not_done)``, as ``concurrent.futures.wait``."""
        if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
            raise ValueError(f"return_when must be ALL_COMPLETED or FIRST_COMPLETED, got {return_when!r}")
        futures = list(futures)
        done: Set[Future] = set()
        try:
            for f in self.as_completed(futures, timeout=timeout):
                done.add(f)
                if return_when == FIRST_COMPLETED:
                    break
        except TimeoutError:
            pass
        return done, {f for f in futures if f not in done}

    def gather(self, futures: Iterable[Future], timeout: Optional[float] = None) -> List[Any]:
        """The results in the futures' order (raises the first ``TaskFailed``)."""
        futures = list(futures)
        for _ in self.as_completed(futures, timeout=timeout):
            pass
        return [f.result() for f in futures]

    def cancel(self, future: Union[Future, int]) -> bool:
        """Cancels a task (``DELETE /tasks/{id}``): True when the master
        cancelled it, False when it had already finished."""
        task_id = future.id if isinstance(future, Future) else int(future)
        try:
            self._request("DELETE", f"/tasks/{task_id}")
        except FlotillaError as e:
            if e.status == 409:
                return False
            raise
        if isinstance(future, Future):
            future._view = None
        return True

    def task(self, task_id: int) -> Dict[str, Any]:
        """A task's view (``GET /tasks/{id}``)."""
        return self._get(f"/tasks/{int(task_id)}")

    def future(self, task_id: int) -> Future:
        """A future for a task submitted elsewhere (by ID)."""
        return Future(self, int(task_id), 0)

    def tasks(self, state: Optional[str] = None, node: Optional[int] = None,
              limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Tasks in ID order, filtered by state and node, at most ``limit``
        (``None``: all of them, page after page)."""
        out: List[Dict[str, Any]] = []
        after = 0
        while limit is None or len(out) < limit:
            query = {"after": after, "limit": min(1000, (limit - len(out)) if limit is not None else 1000)}
            if state is not None:
                query["state"] = state
            if node is not None:
                query["node"] = node
            page = self._get("/tasks?" + urllib.parse.urlencode(query))
            out.extend(page["tasks"])
            if page.get("next") is None:
                break
            after = page["next"]
        return out

    # ----- the cluster ------------------------------------------------------

    def nodes(self) -> List[Dict[str, Any]]:
        """The workers (``GET /nodes``)."""
        return self._get("/nodes")

    def resources(self) -> List[Dict[str, Any]]:
        """The shared resources (``GET /resources``)."""
        return self._get("/resources")

    def resource(self, name: str) -> Dict[str, Any]:
        """One shared resource: type, value, version, holders, waiters."""
        return self._get("/resources/" + urllib.parse.quote(name, safe=""))

    def add_worker(self, capacity: Optional[int] = None) -> int:
        """Starts a worker; returns its node ID."""
        body = {} if capacity is None else {"max_capacity": capacity}
        return self._post("/add", body)["node_id"]

    def stop_worker(self, node: int) -> str:
        """Kills a worker (the master restarts it under the same ID)."""
        return self._post(f"/stop/{int(node)}", {})["message"]

    def health(self) -> Dict[str, Any]:
        return self._get("/health")
