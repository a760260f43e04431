//! Lock calls of shell tasks without their lease. A shell task's attempt has
//! a lease (what the master checks on every lock call), but the lease never
//! enters the task: anything in a process's environment or arguments is
//! readable by every other process of the same user (`/proc/PID/environ`),
//! so another task could take or publish locks in its name.
//!
//! Instead the worker gives each shell task one end of a Unix socket pair
//! (its number in `FLOTILLA_LOCK_FD`), the task's "door". Each
//! `flotilla-worker lock ...` makes a fresh stream pair, passes one end
//! through the door (`SCM_RIGHTS`), writes its call on it (a
//! [`FromRunner::Lock`], as the Python interpreter sends on its pipe) and
//! reads the answer (a [`ToRunner::LockReply`]). The worker adds the
//! attempt's lease and makes the call through the same [`LockProxy`] as for
//! Python tasks. The door serves only while its task runs.
//!
//! Other tasks cannot use a door: a socket cannot be opened through
//! `/proc/PID/fd` (the kernel answers `ENXIO`), and its number says nothing.
//! Only a process allowed to ptrace the shell (same user, and
//! `kernel.yama.ptrace_scope` 0) could make it call for them; that process
//! could as well act as the task itself.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context, Result};
use flotilla_proto::runner::{FromRunner, ToRunner};
use futures::stream::{FuturesUnordered, StreamExt};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::locks::LockProxy;

/// Tells `flotilla-worker lock` which of its descriptors is the door.
pub const LOCK_FD_ENV: &str = "FLOTILLA_LOCK_FD";

/// The largest call a task may send: a value as large as a task's report.
const MAX_CALL: u64 = 49 << 20;

/// A door: the worker's end and the task's end (to be inherited by `sh`),
/// both closed on exec.
pub struct Door {
    pub worker: OwnedFd,
    pub task: OwnedFd,
}

impl Door {
    pub fn new() -> std::io::Result<Door> {
        let (worker, task) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok(Door { worker, task })
    }
}

/// Makes the shell inherit the task's end of a door (close-on-exec cleared
/// in the child only, so no other child gets it), and says where it is.
pub fn inherit(cmd: &mut tokio::process::Command, task_end: &OwnedFd) {
    let fd = task_end.as_raw_fd();
    cmd.env(LOCK_FD_ENV, fd.to_string());
    unsafe {
        cmd.pre_exec(move || {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map(|_| ())
            .map_err(std::io::Error::from)
        });
    }
}

/// Serves the door's calls until the future is dropped (when the task
/// ends); it never returns by itself.
pub async fn serve(worker_end: OwnedFd, proxy: &LockProxy<'_>) -> std::convert::Infallible {
    // A sequenced-packet socket, driven through tokio's datagram type for
    // its readiness only (every receive is `receive_now`).
    let door = std::os::unix::net::UnixDatagram::from(worker_end);
    let door = match door
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixDatagram::from_std(door))
    {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "cannot watch a shell task's lock door; its lock calls will fail");
            return std::future::pending().await;
        }
    };
    let mut calls = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            got = receive(&door), if open => match got {
                Ok(Some(stream)) => calls.push(answer(stream, proxy)),
                Ok(None) => open = false,
                Err(e) => {
                    warn!(error = %e, "a shell task's lock door failed");
                    open = false;
                }
            },
            Some(()) = calls.next(), if !calls.is_empty() => {}
            else => return std::future::pending().await,
        }
    }
}

/// The next stream passed through the door; `None` once every holder of
/// the task's end has closed it.
async fn receive(door: &tokio::net::UnixDatagram) -> std::io::Result<Option<OwnedFd>> {
    loop {
        door.readable().await?;
        match door.try_io(tokio::io::Interest::READABLE, || {
            receive_now(door.as_raw_fd())
        }) {
            Ok(Received::Stream(s)) => return Ok(Some(s)),
            Ok(Received::Closed) => return Ok(None),
            Ok(Received::Nothing) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

enum Received {
    Stream(OwnedFd),
    /// A message without a stream socket in it (ignored).
    Nothing,
    Closed,
}

fn receive_now(fd: RawFd) -> std::io::Result<Received> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // Owned at once, so that every descriptor passed is closed.
            fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(Received::Closed);
    }
    let mut fds = fds.into_iter();
    match fds.next() {
        Some(s) if getsockopt(&s, sockopt::SockType).ok() == Some(SockType::Stream) => {
            Ok(Received::Stream(s))
        }
        _ => Ok(Received::Nothing),
    }
}

/// Reads one call from `stream`, makes it with the attempt's lease, and
/// writes the answer back.
async fn answer(stream: OwnedFd, proxy: &LockProxy<'_>) {
    let stream = std::os::unix::net::UnixStream::from(stream);
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => return debug!(error = %e, "a lock call's stream cannot be used"),
    };
    let (read, mut write) = stream.into_split();
    let mut call = Vec::new();
    let reply = match read.take(MAX_CALL + 1).read_to_end(&mut call).await {
        Err(e) => refusal(format!("cannot read the lock call: {e}")),
        Ok(_) if call.len() as u64 > MAX_CALL => {
            refusal(format!("a lock call is at most {MAX_CALL} bytes"))
        }
        Ok(_) => match serde_json::from_slice::<FromRunner>(&call) {
            Ok(FromRunner::Lock {
                action,
                name,
                mode,
                value,
                token,
                timeout_s,
            }) => {
                proxy
                    .call(action, name, mode, value, token, timeout_s)
                    .await
            }
            Ok(_) => refusal("not a lock call".into()),
            Err(e) => refusal(format!("the lock call is not valid: {e}")),
        },
    };
    let bytes = serde_json::to_vec(&reply).expect("a reply serialises");
    if let Err(e) = write.write_all(&bytes).await {
        debug!(error = %e, "the lock call went before its answer");
    }
    let _ = write.shutdown().await;
}

fn refusal(error: String) -> ToRunner {
    ToRunner::LockReply {
        ok: false,
        body: None,
        error: Some(error),
    }
}

/// `flotilla-worker lock ...` inside a shell task: sends `call` through the
/// task's door and returns the master's answer.
pub fn call(call: &FromRunner) -> Result<serde_json::Value> {
    let door: RawFd = std::env::var(LOCK_FD_ENV)
        .context("FLOTILLA_LOCK_FD is not set: `flotilla-worker lock` runs inside a shell task")?
        .parse()
        .context("FLOTILLA_LOCK_FD is not a descriptor number")?;
    let (mut mine, theirs) = std::os::unix::net::UnixStream::pair()?;
    let passed = [theirs.as_raw_fd()];
    sendmsg::<()>(
        door,
        &[IoSlice::new(b"L")],
        &[ControlMessage::ScmRights(&passed)],
        MsgFlags::empty(),
        None,
    )
    .context("cannot reach the worker through FLOTILLA_LOCK_FD (is the task still running?)")?;
    drop(theirs);
    mine.write_all(&serde_json::to_vec(call)?)?;
    mine.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    mine.read_to_end(&mut answer)
        .context("the worker did not answer the lock call")?;
    match serde_json::from_slice::<ToRunner>(&answer)
        .context("the worker's answer to the lock call is not valid")?
    {
        ToRunner::LockReply {
            ok: true,
            body: Some(body),
            ..
        } => Ok(body),
        ToRunner::LockReply { error, .. } => {
            bail!("{}", error.unwrap_or_else(|| "lock call refused".into()))
        }
        other => bail!("unexpected answer to a lock call: {other:?}"),
    }
}
