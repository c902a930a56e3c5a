//! Connection caps: in total (`limits.max_connections`) and per client address
//! (`limits.per_ip`), held by permits that give their place back when dropped; and the
//! open-connection gauge, held the same way.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;

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

/// One open client connection in `imapgate_connections_active`, until dropped.
pub struct OpenConnection(Gauge);

impl OpenConnection {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        OpenConnection(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
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

/// Holds one connection's place; gives it back on drop.
pub struct Permit {
    caps: Arc<ConnectionCaps>,
    ip: IpAddr,
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
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total.load(Ordering::Relaxed) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::MaxConnections);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip.load(Ordering::Relaxed) {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::PerIp);
        }
        *count += 1;
        Ok(Permit {
            caps: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut per_ip = self.caps.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
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
}
