//! Exclusive ownership of a `data_dir`: an `flock` on `taskwarden.lock`, holding the owner's
//! pid, for the embedded cluster's whole life.

use super::EmbeddedError;
use std::fs;
use std::path::Path;

/// The exclusive claim on a `data_dir`: an `flock` held as long as this value lives (the
/// kernel drops it when the process dies, however it dies).
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

/// The lock file inside `data_dir`.
pub const LOCK_FILE: &str = "taskwarden.lock";

impl DataDirLock {
    /// Takes the lock, or says who holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, EmbeddedError> {
        use std::io::{Seek, Write};
        use std::os::fd::AsRawFd;
        let path = data_dir.join(LOCK_FILE);
        let dd_err = |source| EmbeddedError::DataDir {
            path: path.clone(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(dd_err)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(EmbeddedError::InUse {
                    data_dir: data_dir.to_path_buf(),
                    pid: Self::holder(data_dir),
                });
            }
            return Err(dd_err(err));
        }
        file.set_len(0).map_err(dd_err)?;
        file.seek(std::io::SeekFrom::Start(0)).map_err(dd_err)?;
        writeln!(file, "{}", std::process::id()).map_err(dd_err)?;
        Ok(DataDirLock { _file: file })
    }

    /// The pid written by the lock's holder, if one can be read.
    pub fn holder(data_dir: &Path) -> Option<i32> {
        fs::read_to_string(data_dir.join(LOCK_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}
