//! A `vmm run --control` in the background for the tests of `vmm ctl`.

use std::process::Stdio;
use std::time::Duration;

use super::{poll_until, scratch, vmm};

/// A `vmm run --control` in the background, ended by SIGINT.
pub struct Background {
    child: std::process::Child,
    socket: std::path::PathBuf,
    stats: std::path::PathBuf,
}

impl Background {
    /// Starts `vmm run IMAGE` with a control socket and `extra` arguments,
    /// and waits for the socket.
    pub fn start(image: &str, extra: &[&str]) -> Self {
        let socket = scratch(&format!("{image}.sock"));
        let stats = scratch(&format!("{image}-ctl.json"));
        let child = vmm()
            .args(["run", image, "--timeout", "120", "--no-table", "--control"])
            .arg(&socket)
            .arg("--stats-json")
            .arg(&stats)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmm run");
        assert!(poll_until(Duration::from_secs(30), || socket.exists()), "the control socket never appeared");
        Self { child, socket, stats }
    }

    /// `vmm ctl SOCKET words...`: (status, stdout, stderr).
    pub fn ctl(&self, words: &[&str]) -> (i32, String, String) {
        let out = vmm().arg("ctl").arg(&self.socket).args(words).output().expect("spawn vmm ctl");
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        (out.status.code().expect("exited"), text(&out.stdout), text(&out.stderr))
    }

    /// `vmm ctl SOCKET status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.ctl(&["status"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).expect("status is JSON")
    }

    /// Ends the run with SIGINT and returns its statistics.
    pub fn interrupt(mut self) -> vmm::stats::RunStats {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill with a pid of our own child and a standard signal.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let status = self.child.wait().expect("wait");
        assert_eq!(status.code(), Some(3), "an interrupted run ends with status 3");
        assert!(!self.socket.exists(), "the socket is removed at the end of the run");
        serde_json::from_str(&std::fs::read_to_string(&self.stats).expect("stats")).expect("stats parse")
    }
}
