//! Moving a literal's body socket → pipe → socket with splice(2), never through user space.
//!
//! The observer skips literal octets by count anyway, so once it says how many are coming
//! (`Tap::unseen_ahead`) the relay does not need to read them at all. On Linux, splicing a
//! TCP socket into a pipe takes references to the received pages and splicing the pipe into
//! the other socket hands them on: the two copies a read/write relay makes per byte are gone.
//!
//! Whether that is cheaper depends on the kernel: on this project's first test machines it
//! nearly halved the CPU per GB of a large FETCH; on a later kernel over loopback it nearly doubled it
//! and copying relayed 1.75× as fast (BENCHMARKS.md, "Splice or copy"). So it is a backend's
//! choice (`backends[].splice`), off unless set.
//!
//! A pipe is two file descriptors, so pipes are pooled per worker thread and held only while a
//! literal is in flight; an idle session holds none. If no pipe can be made (out of file
//! descriptors), the relay copies as usual.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Literals shorter than this are copied: for them a splice is two syscalls more than a copy.
pub const SPLICE_MIN: u64 = 64 * 1024;
/// Octets asked of one splice into the pipe (a pipe holds 64 KiB unless resized).
pub const PIPE_CHUNK: usize = 64 * 1024;
/// Pipes a worker thread keeps for reuse.
const POOL_MAX: usize = 64;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A non-blocking pipe, from and back to this thread's pool.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// One from the pool, or a new one; `None` if the process is out of descriptors.
    pub fn take() -> Option<Pipe> {
        if let Some(pipe) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Some(pipe);
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return None;
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Some(Pipe { read, write })
    }

    /// Gives an emptied pipe back to this thread's pool. (A pipe dropped with octets in it,
    /// because its session ended mid-literal, is closed instead.)
    pub fn give_back(self) {
        PIPES.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        });
    }

    /// Up to `len` octets from the socket `from` into the pipe. `Ok(0)` is the end of the stream.
    pub fn fill_from(&self, from: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(from.as_raw_fd(), self.write.as_raw_fd(), len)
    }

    /// Up to `len` octets from the pipe into the socket `to`.
    pub fn drain_to(&self, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to.as_raw_fd(), len)
    }
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors the caller owns; no pointers but the null offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
