"""The Python client against a real master (started by conftest.py)."""

from __future__ import annotations

import functools
import time

import pytest

from conftest import free_port
from flotilla import (
    FIRST_COMPLETED,
    Client,
    ConnectionFailed,
    FlotillaError,
    Future,
    TaskCancelled,
    TaskFailed,
    Unauthorized,
)


def square(x):
    return x * x


def describe(name, *numbers, scale=1, unit="m"):
    import math

    return {"name": name, "total": math.fsum(numbers) * scale, "unit": unit}


def explode(reason):
    raise ValueError(f"explode: {reason}")


def slow(seconds, value):
    import time

    time.sleep(seconds)
    return value


def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@logged
def decorated(x):
    return x


@functools.lru_cache(maxsize=None)
def cached(x):
    return x


def test_submit_returns_a_future_with_the_response_and_stdout(client: Client):
    f = client.submit("print('hello')\nresponse = 6 * 7")
    assert isinstance(f, Future)
    assert f.result(timeout=30) == 42
    assert f.done()
    assert f.state == "succeeded"
    assert f.stdout == "hello\n"
    assert f.exception() is None
    assert f.view()["attempts"] == 1


def test_done_is_false_while_running_and_result_times_out(client: Client):
    f = client.submit("import time\ntime.sleep(1.5)\nresponse = 'late'")
    assert not f.done()
    with pytest.raises(TimeoutError, match=f"task {f.id}"):
        f.result(timeout=0.2)
    assert f.result(timeout=30) == "late"


def test_shell_tasks_and_a_chosen_node(client: Client):
    f = client.submit("echo from-shell", shell=True)
    assert f.result(timeout=30).strip() == "from-shell"
    f = client.submit("response = self.node_id", node=1)
    assert f.result(timeout=30) == 1
    with pytest.raises(FlotillaError, match="node 7 does not exist") as e:
        client.submit("response = 1", node=7)
    assert e.value.status == 404


def test_a_failing_task_raises_task_failed_with_the_traceback(client: Client):
    f = client.submit("def inner():\n    return 1 / 0\nresponse = inner()")
    with pytest.raises(TaskFailed) as e:
        f.result(timeout=30)
    err = e.value
    assert err.task_id == f.id
    assert "ZeroDivisionError" in err.error
    assert err.traceback.startswith("Traceback (most recent call last):")
    assert "inner" in err.traceback and "ZeroDivisionError: division by zero" in err.traceback
    assert "ZeroDivisionError" in str(err)
    assert isinstance(f.exception(), TaskFailed)
    # A failed shell command: the output is what it said.
    f = client.submit("echo oops; exit 4", shell=True)
    with pytest.raises(TaskFailed, match="exited with code 4"):
        f.result(timeout=30)


def test_submit_function_ships_source_and_json_arguments(client: Client):
    assert client.submit_function(square, 12).result(timeout=30) == 144
    got = client.submit_function(describe, "d", 1.5, 2.5, scale=2, unit="km").result(timeout=30)
    assert got == {"name": "d", "total": 8.0, "unit": "km"}
    with pytest.raises(TaskFailed) as e:
        client.submit_function(explode, "boom").result(timeout=30)
    assert "ValueError: explode: boom" in e.value.traceback


def test_submit_function_refuses_what_cannot_ship_clearly(client: Client):
    with pytest.raises(TypeError, match="lambda"):
        client.submit_function(lambda x: x, 1)

    factor = 3

    def times(x):
        return x * factor

    with pytest.raises(TypeError, match="closure"):
        client.submit_function(times, 1)
    with pytest.raises(TypeError, match="decorated"):
        client.submit_function(decorated, 1)
    with pytest.raises(TypeError, match="decorated"):
        client.submit_function(cached, 1)
    with pytest.raises(TypeError, match="argument 1 of square cannot be sent: it must be JSON.*set"):
        client.submit_function(square, {1, 2})
    with pytest.raises(TypeError, match="keyword argument `unit` of describe"):
        client.submit_function(describe, "x", unit=object())
    with pytest.raises(TypeError, match="plain Python function"):
        client.submit_function(print, 1)


def test_map_of_1000_items_keeps_their_order(client: Client):
    futures = client.map(square, range(1000))
    assert len(futures) == 1000
    assert [f.id for f in futures] == sorted(f.id for f in futures)
    assert client.gather(futures, timeout=120) == [i * i for i in range(1000)]
    # A code template: `item` is each element.
    futures = client.map("response = {'n': item['n'] + 1}", [{"n": i} for i in range(10)])
    assert [f.result(timeout=30) for f in futures] == [{"n": i + 1} for i in range(10)]
    assert client.map(square, []) == []
    with pytest.raises(TypeError, match="a map item cannot be sent"):
        client.map("response = item", [object()])


def test_as_completed_reads_the_feed_not_each_future(client: Client, monkeypatch: pytest.MonkeyPatch):
    # Slow ones first: completion order differs from submission order.
    futures = [client.submit_function(slow, 1.0, "slow")] + client.map(square, range(200))
    calls = []
    real = client._request

    def counting(method, path, *a, **kw):
        calls.append(path)
        return real(method, path, *a, **kw)

    monkeypatch.setattr(client, "_request", counting)
    seen = []
    for f in client.as_completed(futures, timeout=60):
        assert f.done()
        seen.append(f.id)
    assert sorted(seen) == sorted(f.id for f in futures)
    assert seen[-1] == futures[0].id, "the slow task finishes last"
    assert all(p.startswith("/tasks/finished") for p in calls), calls
    # One long-poll returns whatever finished meanwhile: never more requests
    # than futures, however the timing goes...
    assert len(calls) <= len(futures) + 1, calls
    # ...and results are known without further requests.
    calls.clear()
    assert [f.result() for f in futures[1:]] == [i * i for i in range(200)]
    assert calls == []
    # Futures for tasks finished long ago (made from their IDs, so read from
    # the start of the feed): a page of up to 1,000 covers many at once.
    again = [client.future(f.id) for f in futures]
    feed_length = real("GET", "/tasks/finished?after=9223372036854775807")["next"]
    assert len(list(client.as_completed(again, timeout=60))) == len(futures)
    assert len(calls) <= feed_length // 1000 + 1, calls


def test_as_completed_and_wait_time_out(client: Client):
    f = client.submit_function(slow, 3, 1)
    quick = client.submit("response = 0")
    with pytest.raises(TimeoutError, match="1 task"):
        list(client.as_completed([f, quick], timeout=0.5))
    done, not_done = client.wait([f, quick], timeout=0.5)
    assert done == {quick} and not_done == {f}
    g = client.submit("response = 1")
    done, not_done = client.wait([f, g], return_when=FIRST_COMPLETED, timeout=30)
    assert done == {g} and not_done == {f}
    done, not_done = client.wait([f, g])
    assert done == {f, g} and not not_done
    with pytest.raises(ValueError, match="return_when"):
        client.wait([f], return_when="SOMETIMES")


def test_cancel_a_queued_and_a_running_task(client: Client):
    # Each worker runs one task at a time. Worker 1 is kept busy first, so it
    # cannot steal the task that waits behind worker 0's running one.
    blocker = client.submit("import time\ntime.sleep(60)", node=1)
    running = client.submit("import time\ntime.sleep(60)\nresponse = 'ran'", node=0)
    deadline = time.monotonic() + 30
    while running.state != "running" or blocker.state != "running":
        assert time.monotonic() < deadline, (running.view(), blocker.view())
        time.sleep(0.02)
    queued = client.submit("response = 'never'", node=0)
    assert queued.cancel() is True
    assert blocker.cancel() is True
    with pytest.raises(TaskCancelled) as e:
        queued.result(timeout=10)
    assert e.value.task["state"] == "cancelled"
    assert queued.cancelled()
    assert running.cancel() is True
    with pytest.raises(TaskCancelled):
        running.result(timeout=30)
    # Finished already: nothing to cancel.
    done = client.submit("response = 1")
    assert done.result(timeout=30) == 1
    assert done.cancel() is False
    assert done.result() == 1
    with pytest.raises(FlotillaError) as e:
        client.cancel(10**9)
    assert e.value.status == 404
    # The worker goes on.
    assert client.submit("response = self.node_id", node=0).result(timeout=30) == 0


def test_a_task_timeout_stops_the_task(client: Client):
    f = client.submit("import time\ntime.sleep(30)", timeout=0.5)
    with pytest.raises(TaskFailed, match="timed out"):
        f.result(timeout=30)
    fs = client.map(square, [3, 4], timeout=5)
    assert client.gather(fs) == [9, 16]
    with pytest.raises(FlotillaError, match="timeout") as e:
        client.submit("response = 1", timeout=-1)
    assert e.value.status == 400


def test_cluster_calls(client: Client):
    nodes = client.nodes()
    assert [n["id"] for n in nodes[:2]] == [0, 1]
    assert client.resource("total")["type"] == "Integer"
    assert [r["name"] for r in client.resources()] == ["total"]
    with pytest.raises(FlotillaError, match="`nope` does not exist"):
        client.resource("nope")
    new = client.add_worker(capacity=3)
    assert new >= 2
    with pytest.raises(FlotillaError, match="max_capacity must be between"):
        client.add_worker(capacity=0)
    assert "stopped" in client.stop_worker(new)
    deadline = time.monotonic() + 30
    while True:
        n = client.nodes()[new]
        if n["restarts"] == 1 and n["state"] == "active":
            break
        assert time.monotonic() < deadline, n
        time.sleep(0.05)
    # The listing, filtered.
    failed = client.tasks(state="failed")
    assert failed and all(t["state"] == "failed" for t in failed)
    assert len(client.tasks(limit=3)) == 3
    with pytest.raises(FlotillaError, match="unknown task state"):
        client.tasks(state="exploded")


def test_a_closed_client_refuses_calls(master):
    with Client(master.url) as c:
        pass
    with pytest.raises(FlotillaError, match="closed"):
        c.nodes()


def test_the_token(token_master, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FLOTILLA_TOKEN", raising=False)
    with pytest.raises(Unauthorized, match="set FLOTILLA_TOKEN") as e:
        Client(token_master.url).submit("response = 1")
    assert e.value.status == 401
    with pytest.raises(Unauthorized, match="does not match"):
        Client(token_master.url, token="wrong").nodes()
    assert Client(token_master.url, token="py-s3cret").submit("response = 'in'").result(timeout=30) == "in"
    # From the environment, as the CLI.
    monkeypatch.setenv("FLOTILLA_TOKEN", "py-s3cret")
    monkeypatch.setenv("FLOTILLA_SERVER", token_master.url)
    assert Client().submit_function(square, 3).result(timeout=30) == 9


def test_a_stopped_master_is_named_with_the_fix():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionFailed, match="connection refused") as e:
        Client(url).submit("response = 1")
    assert url in str(e.value) and "flotilla up" in str(e.value)
    with pytest.raises(ValueError, match="invalid server URL"):
        Client("localhost:5000")
