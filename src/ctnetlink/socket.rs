//! A raw NETLINK_NETFILTER socket, bound to the network namespace it was
//! opened in.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::consts::{NETLINK_CAP_ACK, SOL_NETLINK};

/// Kernel socket buffers we ask for. Every ACK of a create batch is queued
/// before we read any of them (the kernel handles the whole batch inside our
/// `send`), so the receive buffer bounds the batch size.
const RCVBUF: i32 = 32 << 20;
const SNDBUF: i32 = 8 << 20;

pub struct NlSocket {
    fd: OwnedFd,
}

// The event listener (`events.rs`) needs the descriptor for group
// membership, buffer sizing, poll(2) and non-blocking reads.
impl AsRawFd for NlSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(super) fn setsockopt_int(fd: i32, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live i32 and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

impl NlSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open(timeout: Duration) -> io::Result<NlSocket> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        // FORCE needs CAP_NET_ADMIN; without it the plain option still helps
        // dumps, and creates fail with EPERM anyway.
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF).is_err() {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF)?;
        }
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SNDBUF).is_err() {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, SNDBUF)?;
        }
        // Errors carry only the header of the failed request, not all of it.
        setsockopt_int(raw, SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: pointer to a live timeval and its size.
        cvt(unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        // SAFETY: zeroed sockaddr_nl is valid; pid 0 lets the kernel assign one.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: pointer to a live sockaddr_nl and its size.
        cvt(unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(NlSocket { fd })
    }

    /// Opens a socket in the network namespace `ns` (an open nsfs file). The
    /// calling thread never changes namespace.
    pub fn open_in(ns: &File, timeout: Duration) -> io::Result<NlSocket> {
        in_netns(ns, || NlSocket::open(timeout))
    }

    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: buf and sa are live for the call; lengths match.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r as usize != buf.len() {
                return Err(io::Error::other(format!(
                    "short netlink send: {r} of {} bytes",
                    buf.len()
                )));
            }
            return Ok(());
        }
    }

    /// Receives one datagram into `buf` (resized to its length). Fails with
    /// `WouldBlock`/`TimedOut` after the receive timeout.
    pub fn recv(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let n = recv_datagram(self.fd.as_raw_fd(), buf, 0)?;
        if n > buf.len() {
            return Err(io::Error::other(format!(
                "netlink datagram of {n} bytes exceeds the {}-byte buffer",
                buf.len()
            )));
        }
        Ok(())
    }
}

/// Receives one datagram into `buf` (at least 64 KiB of room) and returns
/// its real length: larger than `buf.len()` when it did not fit and was
/// cut (MSG_TRUNC), which the caller must not parse as complete.
pub(super) fn recv_datagram(
    fd: std::os::fd::RawFd,
    buf: &mut Vec<u8>,
    flags: libc::c_int,
) -> io::Result<usize> {
    let cap = buf.capacity().max(1 << 16);
    buf.clear();
    buf.reserve(cap);
    loop {
        // SAFETY: writes at most `cap` bytes into buf's spare capacity.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), cap, flags | libc::MSG_TRUNC) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = r as usize;
        // SAFETY: the kernel initialised the first min(n, cap) bytes.
        unsafe { buf.set_len(n.min(cap)) };
        return Ok(n);
    }
}

/// Runs `f` in the network namespace `ns`: directly when the calling thread
/// is already there (setns(2) needs CAP_SYS_ADMIN, which the sandboxed
/// helper lacks), otherwise on a short-lived thread, so the caller never
/// changes namespace. Sockets and /proc/sys/net files belong to the
/// namespace they were opened in and keep it after `f` returns.
pub(super) fn in_netns<T: Send>(
    ns: &File,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    use std::os::unix::fs::MetadataExt;
    let here = std::fs::metadata("/proc/thread-self/ns/net")?;
    let there = ns.metadata()?;
    if here.ino() == there.ino() && here.dev() == there.dev() {
        return f();
    }
    let nsfd = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid nsfs descriptor affects only this thread.
            cvt(unsafe { libc::setns(nsfd, libc::CLONE_NEWNET) })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
}
