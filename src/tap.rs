//! What the relay shows of the traffic it moves: a `Tap` sees every chunk going either `Way`,
//! in order, as it is read. The command observer (`imap::scan::Observer`) is a tap; the
//! session's tap wraps it with the byte counters. A tap must be quick and cannot change the
//! bytes. The relay owns it, so it lives exactly as long as the relay (and may report on drop).

/// A direction of a proxied session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    ClientToBackend,
    BackendToClient,
}

pub trait Tap: Send + 'static {
    /// `bytes` were read going `way`, and are about to be written on.
    fn observe(&mut self, way: Way, bytes: &[u8]);

    /// How many of the octets coming next `way` the tap has no need to see (the rest of a
    /// literal). The plain relay moves that many with splice(2) when it is worth it and the
    /// backend says `splice: true`, and
    /// reports them with `passed_unseen`.
    fn unseen_ahead(&self, _way: Way) -> u64 {
        0
    }

    /// `n` octets went `way` unseen, within what `unseen_ahead` allowed.
    fn passed_unseen(&mut self, _way: Way, _n: usize) {}

    /// Whether the backend still owes answers (commands in flight). Only then can it be
    /// holding a piece back for our ACK (Nagle), so only then is an immediate ACK worth its
    /// packet; once every command is answered, the client's next command carries the ACK.
    fn awaits_backend(&self) -> bool {
        true
    }

    /// Whether what went `way` so far ends where a new response (or command) may begin: no
    /// line or literal half through. `None` when the tap cannot tell (a compressed stream).
    /// The relay closes a session there, so the client's last complete response is followed
    /// by a BYE instead of being cut.
    fn at_boundary(&self, _way: Way) -> Option<bool> {
        None
    }
}

/// No observation.
impl Tap for () {
    fn observe(&mut self, _: Way, _: &[u8]) {}
}
