# Flotilla's warm Python interpreter: one long-lived process per worker slot
# that execs each task in a fresh namespace. It talks to its worker over
# framed JSON lines on duplicated stdin/stdout descriptors; fd 0 and fd 1 are
# then pointed away so that nothing a task does can corrupt the protocol.
import builtins
import io
import json
import os
import sys
import traceback

_proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8", newline="\n")
_proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.dup2(2, 1)
sys.stdin = open(os.devnull, "r")
_real_stdout = sys.stdout

NO_RESULT = "No result returned."


def _send(msg):
    _proto_out.write(json.dumps(msg) + "\n")
    _proto_out.flush()


def _recv():
    line = _proto_in.readline()
    if not line:
        os._exit(0)
    return json.loads(line)


class Node:
    """What task code sees as `self` (the seed ran tasks inside its Node class)."""

    def __init__(self, node_id):
        self.node_id = node_id

    def __repr__(self):
        return "Node(%d)" % self.node_id


_NODE = Node(int(os.environ.get("FLOTILLA_WORKER_ID", "0")))


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _task_namespace():
    ns = {"__name__": "__main__", "__builtins__": builtins, "self": _NODE}
    ns.update(_TASK_API)
    return ns


# ----- shared resources and their locks -------------------------------------
# The seed's API: request_read_resource(name) / release_read_resource(name) /
# request_write_resource(name) / release_write_resource(name). Calls go
# through the worker (which adds this attempt's lease) to the master; a
# write is published when the writer releases, carrying its fencing token.


class ResourceError(Exception):
    """A lock call the master refused (unknown resource, wrong type, timeout,
    a revoked grant...). The message says which."""


class Value:
    """A scalar resource (Integer, Float, String, Boolean): `.value`."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)

    def __str__(self):
        return str(self.value)

    def __eq__(self, other):
        return self.value == (other.value if isinstance(other, Value) else other)

    def __hash__(self):
        return hash(self.value)

    def __bool__(self):
        return bool(self.value)

    def __int__(self):
        return int(self.value)

    def __float__(self):
        return float(self.value)


class SharedList(list):
    """A List resource: a list; `.value` is the whole list."""

    @property
    def value(self):
        return list(self)

    @value.setter
    def value(self, new):
        self[:] = new


class SharedDict(dict):
    """A Dictionary resource: a dict; `.value` is the whole mapping."""

    @property
    def value(self):
        return dict(self)

    @value.setter
    def value(self, new):
        self.clear()
        self.update(new)


class SharedTuple(tuple):
    """A Tuple resource: a tuple; to change it, assign `.value`."""

    @property
    def value(self):
        return self.__dict__.get("_new", tuple(self))

    @value.setter
    def value(self, new):
        self.__dict__["_new"] = tuple(new)


class SharedFile:
    """A File resource: the master keeps its content. `read()`, `write(text)`
    (appends), `truncate()`, or `.value` for the whole content."""

    def __init__(self, content):
        self.value = content

    def read(self):
        return self.value

    def write(self, text):
        self.value += str(text)
        return len(str(text))

    def truncate(self):
        self.value = ""

    def __repr__(self):
        return "SharedFile(%r)" % self.value


_WRAP = {"Integer": Value, "Float": Value, "String": Value, "Boolean": Value,
         "List": SharedList, "Dictionary": SharedDict, "Tuple": SharedTuple, "File": SharedFile}

# name -> [mode, type, object, token], for the running task only.
_held = {}


def _lock_call(**request):
    _send(dict(op="lock", **request))
    reply = _recv()
    if not reply.get("ok"):
        raise ResourceError(reply.get("error", "lock call failed"))
    return reply["body"]


def _acquire(name, mode, timeout):
    if not isinstance(name, str):
        raise ResourceError("a resource name is a string, got %r" % (name,))
    grant = _lock_call(action="acquire", name=name, mode=mode, timeout_s=timeout)
    obj = _WRAP[grant["type"]](grant["value"])
    _held[name] = [mode, grant["type"], obj, grant["token"]]
    return obj


def request_read_resource(name, timeout=None):
    """Waits for a read lock on `name` and returns its value."""
    return _acquire(name, "read", timeout)


def request_write_resource(name, timeout=None):
    """Waits for the write lock on `name` and returns its value; change it
    and call release_write_resource(name) to publish."""
    return _acquire(name, "write", timeout)


def release_read_resource(name):
    _lock_call(action="release", name=name, mode="read")
    _held.pop(name, None)


def release_write_resource(name):
    held = _held.get(name)
    if held is None or held[0] != "write":
        raise ResourceError("this task holds no write lock on %r" % (name,))
    value = held[2].value
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ResourceError("the new value of %r cannot be stored: %s" % (name, e))
    _lock_call(action="release", name=name, mode="write", value=value, token=held[3])
    _held.pop(name, None)


def _abandon_write(name):
    _lock_call(action="release", name=name, mode="write")
    _held.pop(name, None)


class _LockContext:
    def __init__(self, name, mode, timeout):
        self.name, self.mode, self.timeout = name, mode, timeout

    def __enter__(self):
        return _acquire(self.name, self.mode, self.timeout)

    def __exit__(self, exc_type, exc, tb):
        if self.mode == "read":
            release_read_resource(self.name)
        elif exc_type is None:
            release_write_resource(self.name)
        else:
            _abandon_write(self.name)  # an exception publishes nothing
        return False


def read_resource(name, timeout=None):
    """`with read_resource(name) as r:`: released on exit, even on exceptions."""
    return _LockContext(name, "read", timeout)


def write_resource(name, timeout=None):
    """`with write_resource(name) as r:`: published on normal exit; on an
    exception nothing is written and the lock is released."""
    return _LockContext(name, "write", timeout)


_TASK_API = {
    "request_read_resource": request_read_resource,
    "release_read_resource": release_read_resource,
    "request_write_resource": request_write_resource,
    "release_write_resource": release_write_resource,
    "read_resource": read_resource,
    "write_resource": write_resource,
    "ResourceError": ResourceError,
}


def _run(code):
    _held.clear()
    out = io.StringIO()
    sys.stdout = out
    ns = _task_namespace()
    try:
        exec(compile(code, "<task>", "exec"), ns)
    except SystemExit as e:
        sys.stdout = _real_stdout
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        _send({"op": "exit", "code": status, "stdout": out.getvalue()})
        os._exit(status)
    except BaseException as e:  # the traceback is the task's result, not a crash
        sys.stdout = _real_stdout
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        text = "".join(traceback.format_exception(type(e), e, tb))
        summary = "".join(traceback.format_exception_only(type(e), e)).strip()
        _send({"op": "done", "ok": False, "error": summary, "traceback": text,
               "stdout": out.getvalue()})
        return
    sys.stdout = _real_stdout
    response = ns.get("response", NO_RESULT)
    _send({"op": "done", "ok": True, "response": _jsonable(response), "stdout": out.getvalue()})


def main():
    _send({"op": "ready", "pid": os.getpid()})
    while True:
        msg = _recv()
        if msg.get("op") == "run":
            _run(msg["code"])


main()
