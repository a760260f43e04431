//! Shared resources: named values held by the master, of the
//! seed's eight types, read and written by task code under read/write locks
//! ([`locks`]). This module owns the types and their checks.

pub mod locks;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The eight resource types of the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum ResourceType {
    File,
    String,
    Integer,
    Float,
    Boolean,
    List,
    Dictionary,
    Tuple,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResourceSpec {
    pub name: String,
    pub kind: ResourceType,
    pub initial_value: Value,
    /// File only, manifest only: a file under `spec.fileRoot` whose content
    /// is read at creation (never through the API).
    pub path: Option<String>,
    pub mode: Option<String>,
}

impl ResourceType {
    pub const ALL: [ResourceType; 8] = [
        ResourceType::File,
        ResourceType::String,
        ResourceType::Integer,
        ResourceType::Float,
        ResourceType::Boolean,
        ResourceType::List,
        ResourceType::Dictionary,
        ResourceType::Tuple,
    ];

    /// The type's name, as manifests and `POST /resource` spell it (serde's).
    pub fn name(self) -> &'static str {
        serde_variant::to_variant_name(&self).expect("a unit variant has a name")
    }

    pub fn parse(raw: &str) -> Result<Self, ResourceError> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == raw)
            .ok_or_else(|| ResourceError::UnknownType(raw.to_string()))
    }

    /// The value a resource of this type starts with when none is given.
    pub fn zero(self) -> Value {
        match self {
            ResourceType::File | ResourceType::String => Value::String(String::new()),
            ResourceType::Integer => Value::from(0),
            ResourceType::Float => Value::from(0.0),
            ResourceType::Boolean => Value::Bool(false),
            ResourceType::List | ResourceType::Tuple => Value::Array(Vec::new()),
            ResourceType::Dictionary => Value::Object(Default::default()),
        }
    }

    /// Checks (and normalises) a value for this type: an `Integer` holds a
    /// whole number, a `Float` any number, a `File` its text content...
    pub fn check(self, value: Value) -> Result<Value, ResourceError> {
        let ok = match (self, &value) {
            (ResourceType::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (ResourceType::Float, Value::Number(_)) => true,
            (ResourceType::Boolean, Value::Bool(_)) => true,
            (ResourceType::String | ResourceType::File, Value::String(_)) => true,
            (ResourceType::List | ResourceType::Tuple, Value::Array(_)) => true,
            (ResourceType::Dictionary, Value::Object(_)) => true,
            _ => false,
        };
        if ok {
            Ok(value)
        } else {
            Err(ResourceError::WrongValue {
                kind: self.name(),
                what: describe(&value),
            })
        }
    }
}

/// What is wrong with a shared resource or a value given for one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("unknown resource type `{0}`: expected one of {names}", names = type_names())]
    UnknownType(String),
    #[error("a {kind} resource cannot hold {what}")]
    WrongValue { kind: &'static str, what: String },
    #[error("shared resource `{0}` already exists")]
    Duplicate(String),
    #[error(transparent)]
    BadName(#[from] locks::NameError),
    #[error("shared resource `{name}` is a {manifest} in the manifest but a {stored} in the state directory")]
    KindChanged {
        name: String,
        manifest: &'static str,
        stored: &'static str,
    },
    #[error("File resource `{name}`: {source}")]
    File { name: String, source: FileError },
    #[error("File resource `{name}`: the read did not finish: {detail}")]
    FileTask { name: String, detail: String },
    #[error("shared resource `{name}`: {source}")]
    Initial {
        name: String,
        source: Box<ResourceError>,
    },
}

fn type_names() -> String {
    let names: Vec<&str> = ResourceType::ALL.iter().map(|t| t.name()).collect();
    names.join(", ")
}

/// `the string "x"`, `the number 1.5`... for error messages.
pub fn describe(v: &Value) -> String {
    let text = v.to_string();
    let short = if text.len() > 60 {
        format!("{}...", &text[..text.floor_char_boundary(60)])
    } else {
        text
    };
    let kind = match v {
        Value::Null => return "null (no value)".into(),
        Value::Bool(_) => "the boolean",
        Value::Number(n) if n.is_f64() => "the float",
        Value::Number(_) => "the integer",
        Value::String(_) => "the string",
        Value::Array(_) => "the list",
        Value::Object(_) => "the dictionary",
    };
    format!("{kind} {short}")
}

/// The most a File resource read from a file may hold, in bytes (a value
/// travels in lock replies, whose bodies are limited to the same).
pub const FILE_MAX_BYTES: u64 = 1 << 20;

/// The values the shared resources of `spec` start with, each checked
/// against its type, File contents read from under `spec.fileRoot`. The one
/// check `flotilla up` and `flotilla check` both run: what one refuses, the
/// other does. Files are read on a blocking thread, never on the runtime.
pub async fn initial_values(
    resources: &[ResourceSpec],
    file_root: Option<&std::path::Path>,
) -> Result<Vec<(String, ResourceType, Value)>, ResourceError> {
    let mut out = Vec::with_capacity(resources.len());
    for r in resources {
        let value = match &r.path {
            Some(path) => {
                // manifest::validate made sure a path comes with a root.
                let file_error = |source: FileError| ResourceError::File {
                    name: r.name.clone(),
                    source,
                };
                let root = file_root
                    .map(|p| p.to_path_buf())
                    .ok_or_else(|| file_error(FileError::NoRoot))?;
                let path = path.clone();
                let text = tokio::task::spawn_blocking(move || {
                    read_confined(&root, &path, FILE_MAX_BYTES)
                })
                .await
                .map_err(|e| ResourceError::FileTask {
                    name: r.name.clone(),
                    detail: e.to_string(),
                })?
                .map_err(file_error)?;
                Value::String(text)
            }
            None if r.initial_value.is_null() => r.kind.zero(),
            None => r
                .kind
                .check(r.initial_value.clone())
                .map_err(|e| ResourceError::Initial {
                    name: r.name.clone(),
                    source: Box::new(e),
                })?,
        };
        out.push((r.name.clone(), r.kind, value));
    }
    Ok(out)
}

/// Why a File resource's path was not read. The I/O variants keep the
/// error's text (not the `io::Error`) so that the error stays `Clone`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("values.path needs spec.fileRoot")]
    NoRoot,
    #[error("spec.fileRoot `{root}`: {detail}")]
    Root { root: PathBuf, detail: String },
    #[error("cannot {action} `{path}`: {detail}")]
    Io {
        action: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("`{path}` is outside spec.fileRoot `{root}`: File paths must name files under it")]
    Outside { path: String, root: PathBuf },
    #[error("`{path}` is {what}: a File resource reads regular files only")]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("`{path}` has {len} bytes, more than the limit of {limit} bytes")]
    TooBig { path: PathBuf, len: u64, limit: u64 },
    #[error("`{path}` grew past the limit of {limit} bytes while it was read")]
    Grew { path: PathBuf, limit: u64 },
    #[error("`{0}` is not UTF-8 text")]
    NotUtf8(PathBuf),
}

/// The text of `path` (relative to `root`, or absolute), if it is a regular
/// file under `root` (symbolic links resolved first), of at most `limit`
/// bytes, in UTF-8. A FIFO, a device, a directory or anything outside the
/// root is refused without being read; opening never blocks.
pub fn read_confined(root: &Path, path: &str, limit: u64) -> Result<String, FileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| FileError::Io {
            action,
            path,
            detail: e.to_string(),
        }
    };
    let root = std::fs::canonicalize(root).map_err(|e| FileError::Root {
        root: root.to_path_buf(),
        detail: e.to_string(),
    })?;
    let joined = root.join(path);
    let real = std::fs::canonicalize(&joined).map_err(io("read", &joined))?;
    if !real.starts_with(&root) {
        return Err(FileError::Outside {
            path: path.to_string(),
            root,
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO opens at once instead of waiting for a writer; a link
        // swapped in since canonicalize is refused.
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits() | nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&real)
        .map_err(io("open", &real))?;
    let meta = file.metadata().map_err(io("stat", &real))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(FileError::NotRegular { path: real, what });
    }
    if meta.len() > limit {
        return Err(FileError::TooBig {
            path: real,
            len: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::new();
    // Bounded even if the file grows while it is read.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read", &real))?;
    if bytes.len() as u64 > limit {
        return Err(FileError::Grew { path: real, limit });
    }
    String::from_utf8(bytes).map_err(|_| FileError::NotUtf8(real))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked_against_their_type() {
        assert!(ResourceType::Integer.check(json!(3)).is_ok());
        let err = ResourceType::Integer
            .check(json!("3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Integer") && err.contains("string"), "{err}");
        assert!(ResourceType::Integer.check(json!(1.5)).is_err());
        assert!(ResourceType::Float.check(json!(1)).is_ok());
        assert!(ResourceType::Tuple.check(json!([1, 2])).is_ok());
        assert!(ResourceType::Dictionary.check(json!([])).is_err());
        assert!(ResourceType::Boolean.check(json!(0)).is_err());
        assert!(ResourceType::parse("Integr")
            .unwrap_err()
            .to_string()
            .contains("Integr"));
    }

    fn temp_root(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("flotilla-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_are_read_only_from_under_the_root() {
        let root = temp_root("root");
        std::fs::write(root.join("data.txt"), "hello\n").unwrap();
        assert_eq!(read_confined(&root, "data.txt", 100).unwrap(), "hello\n");
        let absolute = root.join("data.txt").display().to_string();
        assert_eq!(read_confined(&root, &absolute, 100).unwrap(), "hello\n");

        for (path, needle) in [
            ("/etc/passwd", "outside spec.fileRoot"),
            ("../../../../etc/passwd", "outside spec.fileRoot"),
            ("/proc/self/environ", "outside spec.fileRoot"),
            ("missing.txt", "cannot read"),
        ] {
            let err = read_confined(&root, path, 100).unwrap_err().to_string();
            assert!(err.contains(needle), "{path}: {err}");
        }
        // A link inside the root to a file outside it is outside.
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let err = read_confined(&root, "link", 100).unwrap_err();
        assert!(matches!(err, FileError::Outside { .. }), "{err}");
        // Too big, not UTF-8, a directory.
        std::fs::write(root.join("big"), vec![b'x'; 101]).unwrap();
        assert!(matches!(
            read_confined(&root, "big", 100),
            Err(FileError::TooBig {
                len: 101,
                limit: 100,
                ..
            })
        ));
        std::fs::write(root.join("bin"), [0xff, 0xfe]).unwrap();
        assert!(matches!(
            read_confined(&root, "bin", 100),
            Err(FileError::NotUtf8(_))
        ));
        std::fs::create_dir(root.join("sub")).unwrap();
        assert!(matches!(
            read_confined(&root, "sub", 100),
            Err(FileError::NotRegular {
                what: "a directory",
                ..
            })
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_fifo_nobody_writes_is_refused_without_blocking() {
        let root = temp_root("fifo");
        let fifo = root.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Would hang forever if it waited for a writer.
        let err = read_confined(&root, "pipe", 100).unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_device_under_the_root_is_refused() {
        // /dev as the root: /dev/zero is under it, and still never read.
        let err = read_confined(std::path::Path::new("/dev"), "zero", 100).unwrap_err();
        assert!(err.to_string().contains("a device"), "{err}");
    }
}
