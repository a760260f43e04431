//! The pipe between `flotilla-worker` and its warm Python interpreter
//! (`runner.py`): one JSON object per line in each direction, tagged by
//! `op`. Typed here, like the HTTP protocol, so both ends read one
//! definition; `runner.py` writes and reads exactly these shapes (its unit
//! tests in the worker crate run the real script against these types).
//!
//! The worker sends [`ToRunner`]; the runner answers [`FromRunner`]. A task
//! is one `run`, followed by any number of `lock` / `lock_reply` exchanges,
//! ended by `done` (the code ran to its end, with or without an exception)
//! or `exit` (it called `exit()`: the interpreter ends after sending it).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Attempt, LockAction, LockMode, TaskId};

/// How much of a task's output and result the runner sends back.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Captured `print` output kept, in characters; the rest is counted and
    /// dropped (the worker then applies the same limit in UTF-8 bytes).
    pub output: u64,
    /// The largest `response`, in bytes of its JSON encoding.
    pub result: u64,
}

/// Worker → runner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToRunner {
    /// Run `code` in a fresh namespace.
    Run {
        code: String,
        task_id: TaskId,
        attempt: Attempt,
        /// Put in the environment of every process the task starts
        /// (`FLOTILLA_TASK_TAG`), so that the worker can find them.
        tag: String,
        limits: RunLimits,
    },
    /// The answer to the task's last `lock` call.
    LockReply {
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// Runner → worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromRunner {
    /// Sent once, when the interpreter is ready for its first task.
    Ready { pid: u32 },
    /// The task asks for (or gives back) a lock; the worker adds the
    /// attempt's lease and answers with `lock_reply`.
    Lock {
        action: LockAction,
        name: String,
        mode: LockMode,
        #[serde(default)]
        value: Option<Value>,
        #[serde(default)]
        token: Option<u64>,
        #[serde(default)]
        timeout_s: Option<f64>,
    },
    /// The code ran to its end.
    Done {
        ended: Ended,
        /// Captured output (at most `limits.output` characters).
        stdout: String,
        /// Characters of output dropped beyond the limit.
        #[serde(default)]
        stdout_dropped: u64,
    },
    /// The code called `exit()` / raised `SystemExit`: the interpreter ends.
    Exit {
        code: i32,
        stdout: String,
        #[serde(default)]
        stdout_dropped: u64,
    },
}

/// How the code ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Ended {
    /// No exception: `response` in its faithful JSON form.
    Returned { response: Value },
    /// An exception: its one-line summary and the traceback, both already
    /// truncated by the runner to `limits.output` characters.
    Raised { error: String, traceback: String },
    /// `response` is larger than `limits.result` once encoded.
    TooLarge { size: u64, limit: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_by_op() {
        let run = ToRunner::Run {
            code: "response = 1".into(),
            task_id: 7,
            attempt: 2,
            tag: "w0-s1-t7-a2".into(),
            limits: RunLimits {
                output: 10,
                result: 20,
            },
        };
        let v = serde_json::to_value(&run).unwrap();
        assert_eq!(v["op"], "run");
        assert_eq!(v["limits"]["result"], 20);
        let done: FromRunner = serde_json::from_str(
            r#"{"op":"done","ended":{"status":"returned","response":[1,"NaN"]},"stdout":"hi\n"}"#,
        )
        .unwrap();
        assert_eq!(
            done,
            FromRunner::Done {
                ended: Ended::Returned {
                    response: serde_json::json!([1, "NaN"])
                },
                stdout: "hi\n".into(),
                stdout_dropped: 0
            }
        );
        let reply = serde_json::to_string(&ToRunner::LockReply {
            ok: false,
            body: None,
            error: Some("no".into()),
        })
        .unwrap();
        assert_eq!(reply, r#"{"op":"lock_reply","ok":false,"error":"no"}"#);
        let err = serde_json::from_str::<FromRunner>(r#"{"op":"shout"}"#).unwrap_err();
        assert!(err.to_string().contains("shout"), "{err}");
    }
}
