//! Network namespaces for fault tests: a backend behind a veth pair, with faults made by
//! iptables rules inside its namespace (`ip netns` + veth, as root).
//!
//! Each `Netns` is `ig<pid>n<counter>` with its own /30 out of 10.64.0.0/10 (from the process id
//! and the counter, so tests in parallel and test processes side by side do not meet): the host
//! side of the veth is `.1`, the namespace side `.2`. Dropping a `Netns` deletes the namespace,
//! which takes the veth pair (both ends) and every rule in it along; a process still inside
//! (a Dovecot) must be stopped first.
//!
//! Faults, all inside the namespace, on its veth only:
//! - `blackhole`: every packet in and out dropped (what 100 % loss or a dead link does: nothing
//!   arrives, nothing is refused);
//! - `drop_incoming` / `drop_outgoing`: packets carrying some octets dropped (a link that dies
//!   just as those are sent, e.g. the credentials or the greeting);
//! - `reset`: the namespace's TCP connections aborted with `ss -K`, which sends a RST;
//! - `delay`: every packet coming into the namespace held for a while before it is delivered
//!   (latency).
//!
//! This kernel (and many CI kernels) has no `sch_netem`, so latency is made without tc: the
//! packets go to an NFQUEUE and a thread of the test holds each one for the delay before it
//! accepts it (`Delay`, a few lines of nfnetlink_queue below). Needs `ip` and `ss` (iproute2)
//! and `iptables` (Debian's iptables, nf_tables backend: the string match and NFQUEUE targets).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// Whether namespaces can be made here: root, iproute2 and iptables installed, and a probe
/// namespace with a veth pair and an iptables rule in it works (see `support::external` for
/// what happens when not).
pub fn available() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        for (tool, package) in [
            ("ip", "iproute2"),
            ("ss", "iproute2"),
            ("iptables", "iptables"),
        ] {
            if !on_path(tool) {
                return Err(format!("{tool} is not installed: install {package}"));
            }
        }
        let ns = Netns::try_new()?;
        ns.try_iptables(&["-A", "INPUT", "-i", &ns.inner, "-j", "ACCEPT"])?;
        Ok(())
    });
    match probe {
        Ok(()) => true,
        Err(e) => super::external(
            false,
            &format!(
                "network namespaces are not available ({e}): the fault tests need root \
                 (CAP_NET_ADMIN), iproute2 and iptables"
            ),
        ),
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// One namespace with a veth pair to the host namespace.
pub struct Netns {
    pub name: String,
    /// The veth's end in the host namespace, and its address.
    outer: String,
    pub host_addr: Ipv4Addr,
    /// The veth's end in the namespace, and its address.
    inner: String,
    pub addr: Ipv4Addr,
}

impl Netns {
    pub fn new() -> Netns {
        Netns::try_new().unwrap_or_else(|e| panic!("cannot make a network namespace: {e}"))
    }

    fn try_new() -> Result<Netns, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 20 bits of block number: 14 from the pid, 6 from the counter; /30 blocks of 10.64/10.
        let block = ((pid & 0x3fff) << 6) | (n & 0x3f);
        let base = u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (block << 2);
        let ns = Netns {
            name: format!("ig{pid}n{n}"),
            outer: format!("ig{pid}h{n}"),
            host_addr: Ipv4Addr::from(base + 1),
            inner: format!("ig{pid}i{n}"),
            addr: Ipv4Addr::from(base + 2),
        };
        // From here on, Drop removes whatever was made.
        run(&["ip", "netns", "add", &ns.name])?;
        run(&[
            "ip", "link", "add", &ns.outer, "type", "veth", "peer", "name", &ns.inner,
        ])?;
        run(&["ip", "link", "set", &ns.inner, "netns", &ns.name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.outer,
        ])?;
        run(&["ip", "link", "set", &ns.outer, "up"])?;
        ns.try_exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.addr),
            "dev",
            &ns.inner,
        ])?;
        ns.try_exec(&["ip", "link", "set", &ns.inner, "up"])?;
        ns.try_exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `args` inside the namespace; panics with its stderr if it fails.
    pub fn exec(&self, args: &[&str]) {
        self.try_exec(args).unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    fn try_iptables(&self, rule: &[&str]) -> Result<(), String> {
        let mut args = vec!["iptables", "-w"];
        args.extend_from_slice(rule);
        self.try_exec(&args)
    }

    fn iptables(&self, rule: &[&str]) {
        self.try_iptables(rule).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Drops every packet in and out of the namespace (until `heal`).
    pub fn blackhole(&self) {
        self.iptables(&["-I", "INPUT", "-i", &self.inner, "-j", "DROP"]);
        self.iptables(&["-I", "OUTPUT", "-o", &self.inner, "-j", "DROP"]);
    }

    /// Drops packets coming into the namespace that carry `octets` (until `heal`): TCP
    /// retransmits them as they were, so the connection is dead from the first such segment on.
    pub fn drop_incoming(&self, octets: &str) {
        self.drop_carrying("INPUT", "-i", octets);
    }

    /// Drops packets leaving the namespace that carry `octets` (until `heal`), likewise.
    pub fn drop_outgoing(&self, octets: &str) {
        self.drop_carrying("OUTPUT", "-o", octets);
    }

    fn drop_carrying(&self, chain: &str, interface: &str, octets: &str) {
        self.iptables(&[
            "-I",
            chain,
            interface,
            &self.inner,
            "-p",
            "tcp",
            "-m",
            "string",
            "--algo",
            "bm",
            "--string",
            octets,
            "-j",
            "DROP",
        ]);
    }

    /// Removes every fault rule: packets flow again (the connections were not told anything).
    pub fn heal(&self) {
        self.iptables(&["-F", "INPUT"]);
        self.iptables(&["-F", "OUTPUT"]);
    }

    /// Aborts every TCP connection of the namespace to the host side (`ss -K`): the socket in
    /// the namespace is closed and a RST goes to the peer, at once.
    pub fn reset(&self) {
        self.exec(&["ss", "-tnK", "dst", &self.host_addr.to_string()]);
    }

    /// Holds every packet coming into the namespace for `delay` before it is delivered (every
    /// round trip is `delay` longer), until the returned `Delay` is dropped (the rule stays,
    /// and what is queued then is dropped: drop it last).
    ///
    /// Incoming, not outgoing: a packet held on its way out still counts against its sender's
    /// TCP Small Queues budget (netem orphans it, NFQUEUE does not), which would let the
    /// sender have only a couple of packets in flight: a 1 MiB FETCH took 70 s. Packets from
    /// the host side are orphaned when they cross the veth, so holding them costs only time.
    pub fn delay(&self, delay: Duration) -> Delay {
        let queue = Delay::start(&self.name, delay);
        self.iptables(&[
            "-A",
            "INPUT",
            "-i",
            &self.inner,
            "-j",
            "NFQUEUE",
            "--queue-num",
            "0",
        ]);
        queue
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The veth's inner end is in the namespace: both ends go with it. The outer end is
        // deleted too in case the move never happened.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A thread holding each packet of NFQUEUE 0 of a namespace for a fixed time, then accepting
/// it (latency without netem). Stops (and releases the queue) on drop.
pub struct Delay {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

// nfnetlink_queue, from linux/netfilter/nfnetlink.h and nfnetlink_queue.h.
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
/// Whole GSO packets to user space (fewer, larger packets: no software segmentation).
const NFQA_CFG_F_GSO: u32 = 1 << 2;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;

impl Delay {
    fn start(netns: &str, delay: Duration) -> Delay {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, bound) = mpsc::channel();
        let (name, stopping) = (netns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let socket = match bind_queue(&name) {
                Ok(s) => {
                    let _ = ready.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            hold_and_accept(&socket, delay, &stopping);
        });
        bound
            .recv()
            .expect("the delay thread answers")
            .unwrap_or_else(|e| panic!("cannot bind NFQUEUE 0 in {netns}: {e}"));
        Delay {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This thread enters `netns` (it stays there: it is the queue's own thread) and binds queue 0
/// there, copying packet metadata only.
fn bind_queue(netns: &str) -> Result<OwnedFd, String> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).map_err(|e| e.to_string())?;
    // SAFETY: plain system calls on descriptors this function owns.
    unsafe {
        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let size: libc::c_int = 8 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let mut config = Message::new(NFQNL_MSG_CONFIG, libc::AF_UNSPEC as u8, true);
        config.attr(
            NFQA_CFG_CMD,
            &[NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8],
        );
        send(&socket, &config)?;
        let mut params = Message::new(NFQNL_MSG_CONFIG, libc::AF_UNSPEC as u8, true);
        let mut p = 0u32.to_be_bytes().to_vec();
        p.push(NFQNL_COPY_META);
        params.attr(NFQA_CFG_PARAMS, &p);
        params.attr(NFQA_CFG_QUEUE_MAXLEN, &65536u32.to_be_bytes());
        params.attr(NFQA_CFG_MASK, &NFQA_CFG_F_GSO.to_be_bytes());
        params.attr(NFQA_CFG_FLAGS, &NFQA_CFG_F_GSO.to_be_bytes());
        send(&socket, &params)?;
        Ok(socket)
    }
}

/// Receives packets, and once the oldest has waited `delay`, accepts it and every packet before
/// it with one batch verdict (all wait the same time, so they leave in order).
fn hold_and_accept(socket: &OwnedFd, delay: Duration, stop: &AtomicBool) {
    let mut held: VecDeque<(u32, Instant)> = VecDeque::new();
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let due = held.iter().take_while(|(_, at)| *at <= now).last().copied();
        if let Some((id, _)) = due {
            while held.front().is_some_and(|(i, _)| *i != id) {
                held.pop_front();
            }
            held.pop_front();
            let mut verdict = Message::new(NFQNL_MSG_VERDICT_BATCH, libc::AF_UNSPEC as u8, false);
            let mut v = NF_ACCEPT.to_be_bytes().to_vec();
            v.extend_from_slice(&id.to_be_bytes());
            verdict.attr(NFQA_VERDICT_HDR, &v);
            if send(socket, &verdict).is_err() {
                return;
            }
            continue;
        }
        let wait = held
            .front()
            .map_or(Duration::from_millis(20), |(_, at)| {
                at.saturating_duration_since(now)
            })
            .min(Duration::from_millis(20));
        let mut poll = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on a descriptor we own; a buffer we own.
        let n = unsafe {
            if libc::poll(&mut poll, 1, wait.as_millis().max(1) as i32) <= 0 {
                continue;
            }
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            continue;
        }
        let arrived = Instant::now();
        for id in packet_ids(&buf[..n as usize]) {
            held.push_back((id, arrived + delay));
        }
    }
}

/// The packet ids in a batch of netlink messages from the queue.
fn packet_ids(mut data: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        if len < 16 || len > data.len() {
            break;
        }
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            // After the netlink header (16) and nfgenmsg (4): attributes.
            let mut attrs = &data[20.min(len)..len];
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes(attrs[0..2].try_into().unwrap()) as usize;
                let atype = u16::from_ne_bytes(attrs[2..4].try_into().unwrap()) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if atype == NFQA_PACKET_HDR && alen >= 8 {
                    ids.push(u32::from_be_bytes(attrs[4..8].try_into().unwrap()));
                }
                attrs = &attrs[(alen + 3) & !3..];
            }
        }
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    ids
}

/// An nfnetlink message to the queue subsystem, for queue 0.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, family: u8, ack: bool) -> Message {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `send`
        m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        let flags = libc::NLM_F_REQUEST as u16 | if ack { libc::NLM_F_ACK as u16 } else { 0 };
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // sequence
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        m.extend_from_slice(&[family, 0]); // nfgenmsg: family, version 0
        m.extend_from_slice(&0u16.to_be_bytes()); // queue number
        Message(m)
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        self.0
            .extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
}

/// Sends `message`; when it asks for an acknowledgement, waits for it and returns its error.
fn send(socket: &OwnedFd, message: &Message) -> Result<(), String> {
    let mut m = message.0.clone();
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    let ack = u16::from_ne_bytes([m[6], m[7]]) & libc::NLM_F_ACK as u16 != 0;
    // SAFETY: a buffer we own, on a descriptor we own.
    let sent = unsafe { libc::send(socket.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
    if sent < 0 {
        return Err(format!("send: {}", std::io::Error::last_os_error()));
    }
    if !ack {
        return Ok(());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: as above.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 20 {
        return Err(format!(
            "no acknowledgement: {}",
            std::io::Error::last_os_error()
        ));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    let error = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
    if kind == NLMSG_ERROR && error != 0 {
        return Err(format!(
            "the kernel refused: {}",
            std::io::Error::from_raw_os_error(-error)
        ));
    }
    Ok(())
}
