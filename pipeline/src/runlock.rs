//! One process per run folder: an advisory lock (`flock`, exclusive) on `<folder>/.lock`, held for the life of
//! the process that writes into the folder (`pretrain`, `--resume`, `eval`, `finetune`). A second process fails
//! at once, naming the holder's PID and command. The lock goes with the process: a killed holder (SIGKILL, OOM,
//! power loss) leaves no stale lock, only the file. Local file systems only: flock over NFS is not reliable.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// A held lock on a run folder; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Creates `dir` if needed and locks it for `what` (e.g. `selfsup pretrain`), or fails naming the process that
    /// holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<RunLock> {
        let ioerr = |p: &Path, e: std::io::Error| Error::Other(format!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| ioerr(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| ioerr(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // The holder writes its PID right after locking: give it a moment if we read too early.
                let mut holder = String::new();
                for _ in 0..20 {
                    holder.clear();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut holder);
                    if !holder.trim().is_empty() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                return Err(Error::Other(format!(
                    "{} is in use by {holder}: one process per run folder (wait for it to finish, or stop it)",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(ioerr(&path, e)),
        }
        let me = format!("PID {} ({what})\n", std::process::id());
        file.set_len(0).and_then(|_| file.rewind()).map_err(|e| ioerr(&path, e))?;
        file.write_all(me.as_bytes()).and_then(|_| file.flush()).map_err(|e| ioerr(&path, e))?;
        Ok(RunLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_naming_the_holder_and_drop_releases() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path(), "test one").unwrap();
        let e = RunLock::acquire(dir.path(), "test two").unwrap_err().to_string();
        assert!(e.contains(&format!("PID {}", std::process::id())) && e.contains("test one"), "{e}");
        drop(first);
        let again = RunLock::acquire(dir.path(), "test three").unwrap();
        assert!(std::fs::read_to_string(again.path()).unwrap().contains("test three"));
    }
}
