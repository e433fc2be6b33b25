//! Everything the two services take from or tell systemd, in one place:
//! the socket systemd passes (socket activation of the helper),
//! `sd_notify` (READY/STATUS/STOPPING/WATCHDOG) and the watchdog interval,
//! the runtime directory, whether stderr is the journal, and the stop
//! signals. Outside systemd every function here is a no-op or answers "no",
//! so the binaries run the same by hand and in tests.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sd_notify::NotifyState;

/// The listening socket systemd passed (`LISTEN_FDS`/`LISTEN_PID`, fd 3),
/// or `None` when not socket-activated. The variables are removed so that
/// nothing this process starts mistakes them for its own.
///
/// Call it first thing in `main`, before any thread exists: it changes the
/// environment.
pub fn take_listener() -> io::Result<Option<UnixListener>> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let fds = std::env::var("LISTEN_FDS").ok();
    // SAFETY: single-threaded at this point (the caller's contract).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !pid_ok {
        return Ok(None);
    }
    match fds.as_deref() {
        Some("1") => {}
        Some(n) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("expected exactly one socket from systemd, got LISTEN_FDS={n}"),
            ));
        }
        None => return Ok(None),
    }
    const SD_LISTEN_FDS_START: RawFd = 3;
    // SAFETY: systemd hands us ownership of fd 3 when LISTEN_PID is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(SD_LISTEN_FDS_START) };
    let ty = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
        .map_err(io::Error::from)?;
    if ty != nix::sys::socket::SockType::Stream {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket from systemd is {ty:?}, expected a stream socket (ListenStream=)"),
        ));
    }
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(Some(UnixListener::from(fd)))
}

// Notifications are best effort: a service manager that does not listen
// (NOTIFY_SOCKET unset, or a Type= that ignores them) is not an error.

/// READY=1 with a first STATUS= line.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new STATUS= line (`systemctl status` shows it).
pub fn notify_status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// STOPPING=1, so systemd does not take the exit for a crash.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("Stopping")]);
}

/// WATCHDOG=1: the process is alive.
pub fn notify_watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}

/// How often to send [`notify_watchdog`] when the unit has `WatchdogSec=`:
/// half the interval, as sd_watchdog_enabled(3) advises.
pub fn watchdog_ping_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// The first directory of a systemd directory variable
/// (`RUNTIME_DIRECTORY`, `STATE_DIRECTORY`, …): systemd separates several
/// with ':'.
pub fn directory(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).and_then(|v| {
        v.to_str()
            .and_then(|s| s.split(':').next())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
}

/// The daemon's state directory: `arg` (`--state-dir`), else systemd's
/// `$RUNTIME_DIRECTORY` (`RuntimeDirectory=`), else /run/conntrack-vmstate.
pub fn state_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| directory("RUNTIME_DIRECTORY"))
        .unwrap_or_else(|| PathBuf::from("/run/conntrack-vmstate"))
}

/// True when systemd connected our stderr to the journal (JOURNAL_STREAM
/// names its device and inode), so a stderr log would duplicate every line.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let stderr = std::io::stderr();
    match nix::sys::stat::fstat(stderr.as_fd()) {
        Ok(st) => dev == st.st_dev.to_string() && ino == st.st_ino.to_string(),
        Err(_) => false,
    }
}

/// The stop signals, SIGTERM (how systemd stops a unit) and SIGINT (^C by
/// hand). Both programs stop the same way: the handler only records the
/// signal; the synchronous helper looks at [`StopSignals::flag`] between
/// accepts and requests, the daemon's event loop awaits
/// [`StopSignals::recv`]. Installed once per process.
pub struct StopSignals {
    /// Read end of the pipe the handler writes a byte to: wakes the
    /// daemon's event loop at once instead of at its next timer.
    wake: OwnedFd,
    /// `wake` registered with the runtime of the first [`StopSignals::recv`].
    wake_async: OnceLock<io::Result<tokio::net::unix::pipe::Receiver>>,
}

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Only atomics and write(2): async-signal-safe.
    SIGNAL.store(sig, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: one byte from a live local; a full pipe (EAGAIN) is fine,
        // a byte is already waiting.
        let _ = unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

impl StopSignals {
    /// Installs the handlers. Call before starting threads that should not
    /// see the signals' default action (termination) in between.
    pub fn install() -> io::Result<StopSignals> {
        use nix::fcntl::OFlag;
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let (rd, wr) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)?;
        // The write end lives as long as the process: the handler may run
        // any time.
        let old = WAKE_FD.swap(std::os::fd::IntoRawFd::into_raw_fd(wr), Ordering::SeqCst);
        if old >= 0 {
            // SAFETY: a previous install's write end, owned by nobody else.
            drop(unsafe { OwnedFd::from_raw_fd(old) });
        }
        let act = SigAction::new(
            SigHandler::Handler(on_stop_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            // SAFETY: the handler only touches atomics and calls write(2).
            unsafe { sigaction(sig, &act) }
                .map_err(|e| io::Error::other(format!("installing the {sig} handler: {e}")))?;
        }
        Ok(StopSignals {
            wake: rd,
            wake_async: OnceLock::new(),
        })
    }

    /// Set once a stop signal arrived; for loops that poll.
    pub fn flag(&self) -> &'static AtomicBool {
        &STOP
    }

    /// The stop signal that arrived, if any.
    pub fn received(&self) -> Option<&'static str> {
        match SIGNAL.load(Ordering::SeqCst) {
            0 => None,
            libc::SIGTERM => Some("SIGTERM"),
            libc::SIGINT => Some("SIGINT"),
            _ => Some("a stop signal"),
        }
    }

    /// Waits for a stop signal and names it. Needs a tokio runtime.
    pub async fn recv(&self) -> &'static str {
        let fd = self.wake_async.get_or_init(|| {
            self.wake
                .try_clone()
                .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd)
        });
        loop {
            if let Some(s) = self.received() {
                return s;
            }
            match fd {
                Ok(rx) => match rx.readable().await {
                    Ok(()) => {
                        // Drain, so the next wait sleeps until a new byte.
                        let mut buf = [0u8; 64];
                        let _ = rx.try_read(&mut buf);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                // Cannot happen short of fd exhaustion; the flag still works.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_takes_the_first_of_several() {
        // A variable of this test only: the process environment is shared.
        let var = "CONNTRACK_VMSTATE_TEST_DIRECTORY";
        unsafe { std::env::set_var(var, "/run/a:/run/b") };
        assert_eq!(directory(var), Some(PathBuf::from("/run/a")));
        unsafe { std::env::set_var(var, "") };
        assert_eq!(directory(var), None);
        unsafe { std::env::remove_var(var) };
        assert_eq!(directory(var), None);
        assert_eq!(
            state_dir(Some(PathBuf::from("/x"))),
            PathBuf::from("/x"),
            "--state-dir wins"
        );
    }

    #[test]
    fn stderr_is_not_the_journal_without_journal_stream() {
        if std::env::var_os("JOURNAL_STREAM").is_none() {
            assert!(!stderr_is_journal());
        }
    }

    /// What systemd reads from NOTIFY_SOCKET, sent to a socket of ours.
    #[test]
    fn notifications_reach_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Only this test sets NOTIFY_SOCKET in the library's tests.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify_ready("Serving 0 VMs");
        notify_status("Serving 1 VM");
        notify_watchdog();
        notify_stopping();
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        for _ in 0..4 {
            let n = sock.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1\nSTATUS=Serving 0 VMs\n",
                "STATUS=Serving 1 VM\n",
                "WATCHDOG=1\n",
                "STOPPING=1\nSTATUS=Stopping\n"
            ]
        );
    }

    /// The handler records the signal and wakes an awaiting event loop.
    /// (The only test of the library that installs signal handlers.)
    #[test]
    fn a_stop_signal_is_recorded_and_wakes_recv() {
        let stop = StopSignals::install().unwrap();
        assert_eq!(stop.received(), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let waiter = stop.recv();
            tokio::pin!(waiter);
            // Not ready before the signal.
            assert!(tokio::time::timeout(Duration::from_millis(50), &mut waiter)
                .await
                .is_err());
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT).unwrap();
            tokio::time::timeout(Duration::from_secs(5), waiter).await
        });
        assert_eq!(got.unwrap(), "SIGINT");
        assert!(stop.flag().load(Ordering::SeqCst));
    }
}
