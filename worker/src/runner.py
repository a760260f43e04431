# Flotilla's warm Python interpreter: one long-lived process per worker slot
# that execs each task in a fresh namespace. It talks to its worker over
# framed JSON lines on duplicated stdin/stdout descriptors; fd 0 and fd 1 are
# then pointed away so that nothing a task does can corrupt the protocol.
# The messages are typed in the Rust crate flotilla-proto (module `runner`):
# worker -> runner: {"op": "run" | "lock_reply"}; runner -> worker:
# {"op": "ready" | "lock" | "done" | "exit"}.
import builtins
import io
import json
import math
import os
import re
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
    _proto_out.write(json.dumps(msg, ensure_ascii=False) + "\n")
    _proto_out.flush()


def _recv():
    line = _proto_in.readline()
    if not line:
        os._exit(0)
    return json.loads(line)


# ----- faithful results --------------------------------------------------
# JSON cannot carry everything Python computes. The documented forms:
#   NaN, inf, -inf           -> the strings "NaN", "Infinity", "-Infinity"
#   an int outside [-2**63, 2**64) -> its decimal string ("18446744073709551617")
#   a lone surrogate in a string   -> the six characters "\\udcff" (backslash escape)
#   tuples -> lists; dict keys -> strings (as json does); anything else -> repr()
_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 64 - 1
_LONG_DIGITS = re.compile(r"\d{19}")


def _clean_str(s):
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _faithful(v):
    if v is None or v is True or v is False:
        return v
    if isinstance(v, int):
        v = int(v)
        return v if _INT_MIN <= v <= _INT_MAX else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return float(v)
    if isinstance(v, str):
        return _clean_str(str(v))
    if isinstance(v, (list, tuple)):
        return [_faithful(x) for x in v]
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if isinstance(k, str):
                key = _clean_str(k)
            elif k is None or isinstance(k, (bool, int, float)):
                key = json.dumps(_faithful(k)).strip('"')
            else:
                return _clean_str(repr(v))
            out[key] = _faithful(x)
        return out
    return _clean_str(repr(v))


def _encode_response(value):
    """The response's JSON text, in its faithful form."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
        if not _LONG_DIGITS.search(text):
            return text
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        pass
    try:
        return json.dumps(_faithful(value), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        try:
            return json.dumps(_clean_str(repr(value)), ensure_ascii=False)
        except Exception:
            return json.dumps("<a %s that cannot be represented>" % type(value).__name__)


# ----- bounded output ------------------------------------------------------
class _Capture(io.TextIOBase):
    """sys.stdout during a task: keeps the first `limit` characters and
    counts the rest."""

    def __init__(self, limit):
        self.limit = limit
        self.parts = []
        self.kept = 0
        self.dropped = 0

    def writable(self):
        return True

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        room = self.limit - self.kept
        if len(s) <= room:
            self.parts.append(s)
            self.kept += len(s)
        else:
            if room > 0:
                self.parts.append(s[:room])
                self.kept += room
            self.dropped += len(s) - max(room, 0)
        return len(s)

    def getvalue(self):
        return _clean_str("".join(self.parts))


def _cut(text, limit):
    if len(text) <= limit:
        return text
    return text[:limit] + ("\n[flotilla: truncated, %d more characters dropped (limit %d)]"
                           % (len(text) - limit, limit))


class Node:
    """What task code sees as `self` (the seed ran tasks inside its Node class)."""

    def __init__(self, node_id):
        self.node_id = node_id
        # The running task's ID and attempt number (1 for the first run; a
        # task whose worker died runs again with the next one).
        self.task_id = None
        self.attempt = None

    def __repr__(self):
        return "Node(%d)" % self.node_id


_NODE = Node(int(os.environ.get("FLOTILLA_WORKER_ID", "0")))


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
    if reply.get("op") != "lock_reply":
        os._exit(70)  # the worker and the runner disagree: start afresh
    if not reply.get("ok"):
        raise ResourceError(reply.get("error", "lock call failed"))
    return reply["body"]


def _acquire(name, mode, timeout):
    if not isinstance(name, str):
        raise ResourceError("a resource name is a string, got %r" % (name,))
    grant = _lock_call(action="acquire", name=name, mode=mode, timeout_s=timeout)
    obj = _WRAP[grant["type"]](grant["value"])
    # The resource's version at the grant; a write grant's is its fencing token.
    obj.version = grant["token"]
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


def _run(msg):
    _held.clear()
    limits = msg["limits"]
    out = _Capture(limits["output"])
    os.environ["FLOTILLA_TASK_TAG"] = msg["tag"]
    os.environ["FLOTILLA_TASK_ID"] = str(msg["task_id"])
    os.environ["FLOTILLA_ATTEMPT"] = str(msg["attempt"])
    _NODE.task_id, _NODE.attempt = msg["task_id"], msg["attempt"]
    sys.stdout = out
    ns = _task_namespace()
    try:
        exec(compile(msg["code"], "<task>", "exec"), ns)
    except SystemExit as e:
        sys.stdout = _real_stdout
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        _send({"op": "exit", "code": max(-(2 ** 31), min(status, 2 ** 31 - 1)),
               "stdout": out.getvalue(), "stdout_dropped": out.dropped})
        os._exit(status & 0xFF)
    except BaseException as e:  # the traceback is the task's result, not a crash
        sys.stdout = _real_stdout
        try:
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            text = "".join(traceback.format_exception(type(e), e, tb))
            summary = "".join(traceback.format_exception_only(type(e), e)).strip()
        except BaseException:  # a hostile __str__ / __repr__
            text = summary = "%s (its message could not be formatted)" % type(e).__name__
        ended = {"status": "raised", "error": _clean_str(_cut(summary, 4096)),
                 "traceback": _clean_str(_cut(text, limits["output"]))}
        _send({"op": "done", "ended": ended, "stdout": out.getvalue(),
               "stdout_dropped": out.dropped})
        return
    sys.stdout = _real_stdout
    response = ns.get("response", NO_RESULT)
    limit = limits["result"]
    if isinstance(response, (str, bytes)) and len(response) > limit:
        ended = {"status": "too_large", "size": len(response) + 2, "limit": limit}
    else:
        text = _encode_response(response)
        size = len(text.encode("utf-8"))
        if size > limit:
            ended = {"status": "too_large", "size": size, "limit": limit}
        else:
            ended = None
    stdout = out.getvalue()
    if ended is None:
        # The response is spliced in already encoded (not encoded twice).
        _proto_out.write('{"op":"done","stdout":%s,"stdout_dropped":%d,'
                         '"ended":{"status":"returned","response":%s}}\n'
                         % (json.dumps(stdout, ensure_ascii=False), out.dropped, text))
        _proto_out.flush()
    else:
        _send({"op": "done", "ended": ended, "stdout": stdout, "stdout_dropped": out.dropped})


def main():
    _send({"op": "ready", "pid": os.getpid()})
    while True:
        msg = _recv()
        if msg.get("op") == "run":
            _run(msg)
        else:
            os._exit(70)  # a lock_reply with no call waiting: out of step


main()
