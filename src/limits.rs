//! Connection caps: in total (`limits.max_connections`) and per client address
//! (`limits.per_ip`), held by permits that give their place back when dropped; and the
//! open-connection gauge, held the same way.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The cap that refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MaxConnections,
    PerIp,
}

impl Limit {
    /// The config key's name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::PerIp => "per_ip",
        }
    }
}

/// Caps on open client connections: in total and per client address.
pub struct ConnectionCaps {
    /// Atomics so that a reload can change them; connections over a lowered cap stay.
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection's place; gives it back on drop. Its place under `per_ip` is taken
/// with the client's address: at once, or (behind a PROXY balancer) once the header named it.
pub struct Permit {
    caps: Arc<ConnectionCaps>,
    ip: Option<IpAddr>,
}

impl ConnectionCaps {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionCaps {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// New caps (a reload); they apply to connections accepted from now on.
    pub fn set(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// A permit, or the cap that refused.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Limit> {
        let mut permit = self.admit_unnamed()?;
        permit.name_client(ip)?;
        Ok(permit)
    }

    /// A place under `max_connections` only, for a connection whose client is not known yet
    /// (a PROXY header to come): such connections count from their accept on.
    pub fn admit_unnamed(self: &Arc<Self>) -> Result<Permit, Limit> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total.load(Ordering::Relaxed) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::MaxConnections);
        }
        Ok(Permit {
            caps: self.clone(),
            ip: None,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Permit {
    /// Takes the client's place under `per_ip` (once; a permit named already keeps its name).
    pub fn name_client(&mut self, ip: IpAddr) -> Result<(), Limit> {
        if self.ip.is_some() {
            return Ok(());
        }
        let caps = &self.caps;
        let mut per_ip = caps.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= caps.max_per_ip.load(Ordering::Relaxed) {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return Err(Limit::PerIp);
        }
        *count += 1;
        self.ip = Some(ip);
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.caps.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.caps.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_and_release() {
        let caps = ConnectionCaps::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = caps.admit(a).unwrap();
        let _p2 = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).err(), Some(Limit::PerIp));
        let _p3 = caps.admit(b).unwrap();
        assert_eq!(caps.admit(b).err(), Some(Limit::MaxConnections));
        drop(p1);
        assert_eq!(caps.open(), 2);
        assert!(caps.admit(a).is_ok());
    }

    #[test]
    fn unnamed_connections_count_in_total_then_per_address() {
        let caps = ConnectionCaps::new(2, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut waiting = caps.admit_unnamed().unwrap();
        let _other = caps.admit_unnamed().unwrap();
        assert_eq!(
            caps.admit_unnamed().err(),
            Some(Limit::MaxConnections),
            "headers not in yet count"
        );
        waiting.name_client(a).unwrap();
        drop(_other);
        let mut second = caps.admit_unnamed().unwrap();
        assert_eq!(second.name_client(a).err(), Some(Limit::PerIp));
        drop(waiting);
        assert!(second.name_client(a).is_ok());
        assert_eq!(caps.open(), 1);
    }
}
