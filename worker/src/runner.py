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


_TASK_API = {}


def _run(code):
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
