//! How much of a task's output and result a worker sends back: configured by
//! the environment (`FLOTILLA_MAX_OUTPUT_BYTES`, `FLOTILLA_MAX_RESULT_BYTES`),
//! defaulting to `flotilla_proto::limits`, and never so large that a report
//! could exceed what the master accepts.

use anyhow::{bail, Result};
use flotilla_proto::limits::{DEFAULT_OUTPUT, DEFAULT_RESULT, OUTPUT_ENV, REPORT, RESULT_ENV};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// stdout and stderr kept per task (and a traceback's length), bytes.
    pub output: u64,
    /// The largest JSON-encoded result, bytes.
    pub result: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            output: DEFAULT_OUTPUT,
            result: DEFAULT_RESULT,
        }
    }
}

impl Limits {
    pub fn from_env() -> Result<Self> {
        let read = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Err(_) => Ok(default),
                Ok(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("{name}={v:?} is not a positive number of bytes"),
                },
            }
        };
        let limits = Limits {
            output: read(OUTPUT_ENV, DEFAULT_OUTPUT)?,
            result: read(RESULT_ENV, DEFAULT_RESULT)?,
        };
        // stdout + stderr (or a traceback), JSON-escaped at worst six-fold,
        // plus the result, must fit one report.
        if limits.result + 12 * limits.output > REPORT {
            bail!(
                "{RESULT_ENV} ({}) + 12 x {OUTPUT_ENV} ({}) must stay within {REPORT} bytes, the most one report may carry",
                limits.result,
                limits.output
            );
        }
        Ok(limits)
    }
}

/// `text` cut to at most `limit` bytes (at a character boundary), with a
/// marker saying how much was dropped: `already_dropped` counts what the
/// producer dropped before (characters, for the Python runner).
pub fn bound_text(mut text: String, already_dropped: u64, limit: u64) -> String {
    let mut dropped_bytes = 0u64;
    if text.len() as u64 > limit {
        let mut cut = limit as usize;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        dropped_bytes = (text.len() - cut) as u64;
        text.truncate(cut);
    }
    match (already_dropped, dropped_bytes) {
        (0, 0) => {}
        (0, b) => text.push_str(&format!(
            "\n[flotilla: output truncated at {limit} bytes; {b} more bytes dropped]"
        )),
        (c, 0) => text.push_str(&format!(
            "\n[flotilla: output truncated at {limit} characters; {c} more characters dropped]"
        )),
        (c, b) => text.push_str(&format!(
            "\n[flotilla: output truncated at {limit} bytes; {b} more bytes and {c} more characters dropped]"
        )),
    }
    text
}

/// Reads a stream to its end, keeping the first `limit` bytes and counting
/// the rest.
pub struct Capped {
    pub kept: Vec<u8>,
    pub dropped: u64,
    limit: u64,
}

impl Capped {
    pub fn new(limit: u64) -> Self {
        Capped {
            kept: Vec::new(),
            dropped: 0,
            limit,
        }
    }

    pub async fn read_from(&mut self, r: &mut (impl tokio::io::AsyncRead + Unpin)) {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let room = (self.limit as usize).saturating_sub(self.kept.len());
            let keep = room.min(n);
            self.kept.extend_from_slice(&buf[..keep]);
            self.dropped += (n - keep) as u64;
        }
    }

    /// The kept text (invalid UTF-8 replaced) with the truncation marker.
    pub fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped == 0 {
            text
        } else {
            format!(
                "{text}\n[flotilla: output truncated at {} bytes; {} more bytes dropped]",
                self.limit, self.dropped
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary_with_a_marker() {
        assert_eq!(bound_text("short".into(), 0, 10), "short");
        let cut = bound_text("aéé".into(), 0, 2);
        assert_eq!(
            cut,
            "a\n[flotilla: output truncated at 2 bytes; 4 more bytes dropped]"
        );
        let cut = bound_text("abc".into(), 7, 3);
        assert!(cut.ends_with("7 more characters dropped]"), "{cut}");
    }

    #[tokio::test]
    async fn a_capped_reader_keeps_the_head_and_counts_the_rest() {
        let data = vec![b'x'; 200_000];
        let mut c = Capped::new(1000);
        c.read_from(&mut &data[..]).await;
        assert_eq!(c.kept.len(), 1000);
        assert_eq!(c.dropped, 199_000);
        assert!(c.text().ends_with("199000 more bytes dropped]"));
    }

    #[test]
    fn limits_must_fit_a_report() {
        std::env::set_var(RESULT_ENV, "60000000");
        let err = Limits::from_env().unwrap_err().to_string();
        std::env::remove_var(RESULT_ENV);
        assert!(err.contains("must stay within"), "{err}");
    }
}
