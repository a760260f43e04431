//! Taking a secret out of the process's environment for good.

/// Reads the environment variable `name` and puts its value out of reach of
/// the process's children and of `/proc/<pid>/environ`: the value's bytes in
/// the initial environment block (the one `/proc/<pid>/environ` shows) are
/// overwritten and the variable is removed, so no child inherits it. It
/// changes the environment, so it must run before any other thread exists.
pub fn take_env(name: &str) -> Option<String> {
    let value = std::env::var(name).ok();
    let key = format!("{name}=");
    let key = key.as_bytes();
    extern "C" {
        static mut environ: *const *mut std::ffi::c_char;
    }
    // SAFETY: `environ` is the C library's NULL-terminated array of
    // NUL-terminated strings; each entry is only overwritten within its
    // own length, while no other thread exists.
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let s = std::ffi::CStr::from_ptr(*entry);
            let len = s.to_bytes().len();
            if s.to_bytes().starts_with(key) {
                std::ptr::write_bytes((*entry).add(key.len()), b'x', len - key.len());
            }
            entry = entry.add(1);
        }
    }
    std::env::remove_var(name);
    value
}
