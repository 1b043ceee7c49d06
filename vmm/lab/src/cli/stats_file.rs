//! The `--stats-json` destination of `vmm run`: checked before the guest
//! runs, written only once the statistics exist.
//!
//! A regular file is created if needed (and removed again when the run
//! never started, so a refused run leaves nothing behind), and emptied
//! only when the statistics are written, so a run that fails to start
//! keeps what an earlier run left there. Anything else is written as it
//! is, without truncation: a character device such as /dev/null, or a
//! pipe with a reader (`--stats-json >(jq .)`). A FIFO nobody reads is
//! refused at once instead of blocking the open.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vmm::stats::RunStats;

use super::CliError;

/// An opened --stats-json destination.
#[derive(Debug)]
pub(super) struct StatsFile {
    file: File,
    path: PathBuf,
    /// Whether this run created the file (it is removed if no statistics come).
    created: bool,
    regular: bool,
}

impl StatsFile {
    /// Opens `path` for writing without emptying it.
    pub(super) fn open(path: &Path) -> Result<Self, CliError> {
        let err = |source| CliError::StatsFile { path: path.display().to_string(), source };
        let created = std::fs::metadata(path).is_err();
        // Non-blocking: opening a FIFO for writing waits for a reader;
        // with O_NONBLOCK it fails at once (ENXIO) when there is none.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENXIO) => CliError::StatsNoReader(path.display().to_string()),
                _ => err(e),
            })?;
        set_blocking(&file).map_err(err)?;
        let regular = file.metadata().map_err(err)?.is_file();
        Ok(Self { file, path: path.to_path_buf(), created, regular })
    }

    /// Replaces the destination's contents with the statistics document.
    pub(super) fn write(mut self, stats: &RunStats) -> Result<(), CliError> {
        let path = self.path.display().to_string();
        let written = serde_json::to_vec_pretty(stats).map_err(std::io::Error::other).and_then(|json| {
            if self.regular {
                self.file.set_len(0)?;
            }
            self.file.write_all(&json)?;
            self.file.write_all(b"\n")?;
            self.file.flush()
        });
        written.map_err(|source| CliError::WriteStats { path, source })
    }

    /// The run never started: a file this run created goes again.
    pub(super) fn abandon(self) {
        if self.created && self.regular {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Clears O_NONBLOCK again, so that writes to a pipe wait for its reader.
fn set_blocking(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own; F_GETFL and F_SETFL take no pointer.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
