//! The control socket of a running guest (`vmm run --control PATH`) and its
//! client (`vmm ctl PATH ...`).
//!
//! A Unix stream socket speaking JSON lines, protocol version
//! [`PROTOCOL_VERSION`]. On each connection the server first sends a
//! greeting, `{"protocol":"vmm-control","version":1,"vmm":"0.1.0"}`; the
//! client sends one request line and gets one reply line, a JSON object
//! whose `ok` says whether the request was done:
//!
//! * `run 0|1|2`: the deduplicator's run state, as sysfs `run`: 0 stops
//!   ksmd, 1 starts it, 2 stops it and unmerges every page. Reply
//!   `{"ok":true,"run":N}` once it is done, so the phase that follows the
//!   reply sees the change.
//! * `status`: `{"ok":true, ...}` with `phase` (the guest's current phase),
//!   `phase_name` (or null), `phases` (so far), `elapsed_ns`, `run`,
//!   `policy`, `ksm` (the deduplicator's figures right now, sysfs names),
//!   `exits` (by reason so far, as the statistics count them),
//!   `exit_events` (by event: `io:console`, ...), `kvm` (the host KVM's
//!   statistics that moved since the run started: counters by their
//!   increase, levels by their value) and `kvm_levels` (which of them are
//!   levels).
//! * `soft-dirty`: one soft-dirty round (`clear_refs` 4) over every guest's
//!   RAM now, as the guest's port 0x501 = 5 does for itself; reply
//!   `{"ok":true,"soft_dirty_pages":N}` (pages written since the round
//!   before) once it is done.
//!
//! A refused request is `{"ok":false,"error":"<reason>"}`. The socket file
//! is removed when the run ends.

mod live;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use live::{LiveExits, LiveKvm};

use crate::dedup::{DedupControl, RunState};
use crate::kvm_stats::KvmStats;
use crate::view::ViewFaults;
use crate::vm::{lock, Vm};
use shadow_mmu::PrimaryMmu;

/// The protocol's name in the greeting.
pub const PROTOCOL: &str = "vmm-control";
/// The protocol's version: it changes when a request or a reply key is
/// removed or changes meaning (keys may be added within a version).
pub const PROTOCOL_VERSION: u32 = 1;

/// How often the server looks for a connection or for the end of the run.
const POLL: Duration = Duration::from_millis(10);
/// The longest a request line may be.
const MAX_LINE: u64 = 256;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client waits for a reply (a `run 2` may unmerge a lot).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be created.
    #[error("cannot create the control socket {path}")]
    Bind {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket: give another --control path")]
    NotASocket(String),
    /// Another run is listening on the path.
    #[error("{0} is the control socket of a running vmm: give another --control path")]
    InUse(String),
    /// The client could not reach the socket.
    #[error("cannot reach the control socket {path} (is `vmm run --control {path}` running?)")]
    Connect {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The client could not talk over it.
    #[error("control socket {path}")]
    Io {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The other end does not speak this protocol.
    #[error("control socket {path}: {what}")]
    Protocol {
        /// The socket path.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// What the server shares with the run loop.
pub struct ControlState {
    /// The run's deduplication control (also used by the run loop).
    pub dedup: Arc<Mutex<DedupControl>>,
    /// The guest's current phase (the run loop updates it).
    pub phase: AtomicU32,
    /// The current phase's name, if the guest gave one.
    pub phase_name: Mutex<Option<String>>,
    /// Phases so far (the run loop updates it).
    pub phases: AtomicUsize,
    /// Exits served so far, by event (the run loop counts them).
    pub exits: LiveExits,
    /// Secondary-MMU faults the userfaultfd view served.
    pub view_faults: Arc<ViewFaults>,
    /// The host KVM's statistics, when they could be opened.
    pub kvm: Option<LiveKvm>,
    /// The policy's name.
    pub policy: String,
    /// Set when the run is ending: requests are refused from then on.
    pub closed: AtomicBool,
    /// When the run started.
    pub started: Instant,
    /// The primary MMUs of the run's guests, for `soft-dirty`.
    pub mms: Vec<Arc<Mutex<PrimaryMmu>>>,
}

impl ControlState {
    /// The state of a run with this deduplication control and policy.
    pub fn new(
        dedup: Arc<Mutex<DedupControl>>,
        policy: &str,
        view_faults: Arc<ViewFaults>,
        kvm: Option<LiveKvm>,
    ) -> Self {
        Self {
            dedup,
            phase: AtomicU32::new(0),
            phase_name: Mutex::new(None),
            phases: AtomicUsize::new(1),
            exits: LiveExits::default(),
            view_faults,
            kvm,
            policy: policy.to_string(),
            closed: AtomicBool::new(false),
            started: Instant::now(),
            mms: Vec::new(),
        }
    }

    /// The same state, `soft-dirty` acting on `mms`.
    pub fn with_mms(mut self, mms: Vec<Arc<Mutex<PrimaryMmu>>>) -> Self {
        self.mms = mms;
        self
    }

    /// The state of a run of `vm`: the host KVM's statistics are read
    /// through file descriptors of its own (a status without them when KVM
    /// refuses more).
    pub fn for_vm(vm: &Vm, policy: &str) -> Self {
        let kvm = KvmStats::open(vm.vm_fd().as_ref())
            .and_then(|v| Ok((v, KvmStats::open(vm.vcpu())?)))
            .ok()
            .and_then(|(v, c)| LiveKvm::start(v, c));
        Self::new(vm.dedup().clone(), policy, vm.view_faults().clone(), kvm).with_mms(vec![vm.mm().clone()])
    }

    /// The state of a fleet's guest that has no socket (every guest but
    /// the first): counted into, never served.
    pub fn quiet(vm: &Vm) -> Self {
        Self::new(vm.dedup().clone(), "", vm.view_faults().clone(), None)
    }

    /// The guest started phase `number`: unnamed until it says otherwise.
    pub fn start_phase(&self, number: u32) {
        self.phase.store(number, Ordering::SeqCst);
        self.phases.fetch_add(1, Ordering::SeqCst);
        *lock(&self.phase_name) = None;
    }

    /// The guest named the current phase.
    pub fn name_phase(&self, name: &str) {
        *lock(&self.phase_name) = Some(name.to_string());
    }
}

impl std::fmt::Debug for ControlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlState").field("phase", &self.phase).field("policy", &self.policy).finish_non_exhaustive()
    }
}

/// The server: a thread that answers requests until the run ends.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (a stale socket file left by a dead run is
    /// replaced; a live one is refused).
    pub fn start(path: &Path, state: Arc<ControlState>) -> Result<Self, ControlError> {
        use std::os::unix::fs::FileTypeExt;
        let shown = path.display().to_string();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket(shown));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(shown));
            }
            // A socket nobody listens on: left by a run that was killed.
            let _ = std::fs::remove_file(path);
        }
        let listener = bind_private(path).map_err(|source| ControlError::Bind { path: shown.clone(), source })?;
        listener.set_nonblocking(true).map_err(|source| ControlError::Bind { path: shown.clone(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-control".into())
            .spawn(move || {
                let active = Arc::new(AtomicUsize::new(0));
                let waiting = Arc::new(Waiting::default());
                while !flag.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => serve_on_own_thread(stream, &state, &active, &waiting),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                        Err(_) => std::thread::sleep(POLL),
                    }
                }
            })
            .map_err(|source| ControlError::Bind { path: shown, source })?;
        Ok(Self { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket at `path` with mode 0600 from its first instant: it is
/// bound inside a fresh directory only this user can enter, made 0600
/// there, then renamed into place (a rename is atomic, and nobody could
/// reach it before), so the umask never shows.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private = parent.join(format!(".vmm-control-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inner = private.join("socket");
    let bound = UnixListener::bind(&inner).and_then(|listener| {
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Connections that have not sent their request line yet, oldest first:
/// when [`MAX_CONNECTIONS`] are open, the oldest of them is closed to make
/// room, so idle clients never lock the others out.
#[derive(Debug, Default)]
struct Waiting {
    streams: Mutex<(u64, std::collections::VecDeque<(u64, UnixStream)>)>,
}

impl Waiting {
    /// Records a connection waiting for its request line; returns its id.
    fn add(&self, stream: &UnixStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let mut w = lock(&self.streams);
        w.0 += 1;
        let id = w.0;
        w.1.push_back((id, clone));
        Some(id)
    }

    /// The connection has its request line (or is gone).
    fn remove(&self, id: Option<u64>) {
        lock(&self.streams).1.retain(|(i, _)| Some(*i) != id);
    }

    /// Closes the oldest waiting connection (its thread then ends); false
    /// when every open connection is being answered.
    fn evict_oldest(&self) -> bool {
        let oldest = lock(&self.streams).1.pop_front();
        oldest.is_some_and(|(_, s)| s.shutdown(std::net::Shutdown::Both).is_ok())
    }
}

/// Serves one connection on a thread of its own, so that a client that
/// connects and sends nothing holds up neither other clients nor the end of
/// the run (the thread is not joined; after the run it only replies that the
/// run is ending). At most [`MAX_CONNECTIONS`] at once: past that, the
/// oldest connection that has not sent its request yet is closed.
fn serve_on_own_thread(
    stream: UnixStream,
    state: &Arc<ControlState>,
    active: &Arc<AtomicUsize>,
    waiting: &Arc<Waiting>,
) {
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS && !waiting.evict_oldest() {
        active.fetch_sub(1, Ordering::SeqCst);
        let busy = refused(format!("{MAX_CONNECTIONS} control requests are being answered; try again"));
        let _ = writeln!(&stream, "{}\n{busy}", greeting());
        return;
    }
    let id = waiting.add(&stream);
    let (state, done, waiting) = (state.clone(), active.clone(), waiting.clone());
    let spawned = std::thread::Builder::new().name("vmm-control-conn".into()).spawn(move || {
        serve(stream, &state, || waiting.remove(id));
        done.fetch_sub(1, Ordering::SeqCst);
    });
    if spawned.is_err() {
        active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request line (at most [`MAX_LINE`] bytes) and replies; `read`
/// is called once the line is in.
fn serve(stream: UnixStream, state: &ControlState, read: impl FnOnce()) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    if writeln!(&stream, "{}", greeting()).is_err() {
        return read();
    }
    let mut line = Vec::new();
    let Ok(reader) = stream.try_clone() else { return read() };
    let got = BufReader::new(reader.take(MAX_LINE)).read_until(b'\n', &mut line);
    read();
    if got.is_err() || line.is_empty() {
        return;
    }
    let reply = match std::str::from_utf8(&line) {
        Ok(text) => answer(text.trim(), state),
        Err(_) => refused("the request is not UTF-8 text: use `run 0|1|2` or `status`"),
    };
    let mut stream = stream;
    let _ = writeln!(stream, "{reply}");
}

/// The line the server sends first on every connection.
pub fn greeting() -> Value {
    json!({ "protocol": PROTOCOL, "version": PROTOCOL_VERSION, "vmm": env!("CARGO_PKG_VERSION") })
}

/// A refusal reply.
fn refused(why: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": why.to_string() })
}

/// The reply to one request line.
fn answer(request: &str, state: &ControlState) -> Value {
    if state.closed.load(Ordering::SeqCst) {
        return refused("the run is ending");
    }
    let words: Vec<&str> = request.split_whitespace().collect();
    match words.as_slice() {
        ["run", n] => match n.parse::<u32>() {
            Ok(run) if run <= 2 => set_run(run, state),
            _ => refused(format!("run takes 0, 1 or 2, not '{n}'")),
        },
        ["status"] => status(state),
        ["soft-dirty"] => soft_dirty(state),
        _ => refused(format!("unknown request '{request}': use `run 0|1|2`, `status` or `soft-dirty`")),
    }
}

/// `run N`: the deduplicator's run state, set before the reply.
fn set_run(run: u32, state: &ControlState) -> Value {
    let mut dedup = lock(&state.dedup);
    // Checked again under the lock the run loop's shutdown takes.
    if state.closed.load(Ordering::SeqCst) {
        return refused("the run is ending");
    }
    if !dedup.is_active() {
        return refused(format!("deduplication is off in this run ({}): nothing to switch", state.policy));
    }
    match RunState::try_from(run).and_then(|state| dedup.set_run(state)) {
        Ok(()) => json!({ "ok": true, "run": run }),
        Err(e) => refused(crate::error_chain(&e)),
    }
}

/// `soft-dirty`: one round over every guest's RAM, done before the reply.
fn soft_dirty(state: &ControlState) -> Value {
    let mut pages = 0;
    for mm in &state.mms {
        match crate::soft_dirty::soft_dirty_round(mm) {
            Ok(n) => pages += n,
            Err(e) => return refused(crate::error_chain(&e)),
        }
    }
    json!({ "ok": true, "soft_dirty_pages": pages })
}

/// `status`: where the guest is and what it has done so far.
fn status(state: &ControlState) -> Value {
    let (run, figures) = {
        let dedup = lock(&state.dedup);
        (dedup.run_state().sysfs(), dedup.figures().0)
    };
    let mut status = json!({
        "ok": true,
        "phase": state.phase.load(Ordering::SeqCst),
        "phase_name": *lock(&state.phase_name),
        "phases": state.phases.load(Ordering::SeqCst),
        "elapsed_ns": u64::try_from(state.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        "run": run,
        "policy": state.policy,
        "ksm": figures,
    });
    let exits = live::exits_status(&state.exits, &state.view_faults, state.kvm.as_ref());
    if let (Some(status), Value::Object(exits)) = (status.as_object_mut(), exits) {
        status.extend(exits);
    }
    status
}

/// Sends one request to the control socket at `path` and returns the
/// reply, a JSON object whose `ok` says whether it was done, after checking
/// the server's greeting.
pub fn request(path: &Path, line: &str) -> Result<Value, ControlError> {
    let shown = path.display().to_string();
    let io = |source| ControlError::Io { path: shown.clone(), source };
    let protocol = |what: String| ControlError::Protocol { path: shown.clone(), what };
    let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect { path: shown.clone(), source })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    let greeting = read_json_line(&mut reader).map_err(io)?;
    if greeting["protocol"] != PROTOCOL || greeting["version"] != PROTOCOL_VERSION {
        return Err(protocol(format!("not a vmm control socket of protocol version {PROTOCOL_VERSION}: {greeting}")));
    }
    writeln!(&stream, "{line}").map_err(io)?;
    let reply = read_json_line(&mut reader).map_err(io)?;
    if !reply["ok"].is_boolean() {
        return Err(protocol(format!("a reply without \"ok\": {reply}")));
    }
    Ok(reply)
}

/// One JSON line; the end of the stream or a line that is not JSON is an error.
fn read_json_line(reader: &mut impl BufRead) -> std::io::Result<Value> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the run closed it without a reply"));
    }
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow_mmu::{FramePool, PrimaryMmu};

    /// A control state over a run with deduplication off (no KVM needed).
    fn state() -> Arc<ControlState> {
        let pool = Arc::new(FramePool::new(16 * shadow_mmu::PAGE_SIZE).expect("frame pool"));
        let mm = Arc::new(Mutex::new(PrimaryMmu::new(pool, 0, 16)));
        let dedup = Arc::new(Mutex::new(DedupControl::new(crate::dedup::Dedup::Off)));
        let state = ControlState::new(dedup, "off", Arc::new(ViewFaults::default()), None).with_mms(vec![mm]);
        state.phase.store(3, Ordering::SeqCst);
        Arc::new(state)
    }

    #[test]
    fn a_soft_dirty_round_from_outside_counts_the_pages_written_since_the_last() {
        let state = state();
        let first = answer("soft-dirty", &state);
        assert_eq!(first, json!({ "ok": true, "soft_dirty_pages": 16 }), "every page of a new mapping is soft-dirty");
        assert_eq!(answer("soft-dirty", &state)["soft_dirty_pages"], 0, "nothing written since");
        assert_eq!(lock(&state.mms[0]).stats().soft_dirty_rounds, 2);
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn idle_connections_never_lock_a_client_out() {
        let dir = scratch("idle");
        let path = dir.join("ctl.sock");
        let server = ControlServer::start(&path, state()).expect("start");
        let idle: Vec<UnixStream> =
            (0..2 * MAX_CONNECTIONS).map(|_| UnixStream::connect(&path).expect("connect")).collect();
        let reply = request(&path, "status").expect("a reply");
        assert_eq!(reply["phase"], 3, "a client was locked out by idle ones: {reply}");
        drop((idle, server));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_request_that_is_not_utf8_gets_an_error_reply() {
        let dir = scratch("utf8");
        let path = dir.join("ctl.sock");
        let server = ControlServer::start(&path, state()).expect("start");
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream.write_all(b"run \xff\xfe\n").expect("send");
        let mut reader = BufReader::new(stream);
        let greeting = read_json_line(&mut reader).expect("greeting");
        assert_eq!((greeting["protocol"].as_str(), greeting["version"].as_u64()), (Some(PROTOCOL), Some(1)));
        let reply = read_json_line(&mut reader).expect("reply");
        assert_eq!(reply["ok"], false);
        assert!(reply["error"].as_str().is_some_and(|e| e.starts_with("the request is not UTF-8")), "{reply}");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_socket_is_only_this_users_and_no_private_directory_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let path = dir.join("ctl.sock");
        let server = ControlServer::start(&path, state()).expect("start");
        let mode = std::fs::symlink_metadata(&path).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ctl.sock")]);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_silent_client_holds_up_neither_other_clients_nor_the_end_of_the_run() {
        let dir = std::env::temp_dir().join(format!("vmm-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("ctl.sock");
        let server = ControlServer::start(&path, state()).expect("start");
        // Connects and sends nothing.
        let silent = UnixStream::connect(&path).expect("connect");
        let reply = request(&path, "status").expect("a reply while the silent client waits");
        assert_eq!(reply["phase"], 3, "{reply}");
        // Served alongside, not after: the silent client's connection is
        // still open (a server that served one client at a time would have
        // timed it out and closed it before answering).
        silent.set_nonblocking(true).expect("nonblocking");
        let mut greeting = String::new();
        BufReader::new(&silent).read_line(&mut greeting).expect("the greeting");
        let mut byte = [0u8; 1];
        let still_open = matches!((&silent).read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(still_open, "the silent connection was closed before the other client was served");
        drop(server);
        assert!(!path.exists(), "the socket file outlived the run");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
