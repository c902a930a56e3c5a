//! The observer's cost: scanning a synthetic mix of commands and FETCH responses with large
//! literals, and the relay over loopback with and without the observer.
//!
//! `cargo bench --bench relay`. The target: the observer costs under 3% of relay
//! throughput on large-literal traffic (compare `relay/observed` with `relay/plain`).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use imapgate::{CommandId, CommandSink, Completion, Observer, Stream, Way, relay};

struct Discard;
impl CommandSink for Discard {
    fn command(&self, _: CommandId, _: Completion, _: Option<Duration>) {}
}

/// One round of traffic: the client's commands and the backend's answers, FETCH bodies from
/// 16 KiB to 1 MiB holding CRLFs, braces and lines that look like completions.
fn mix() -> (Vec<u8>, Vec<u8>) {
    let mut client = Vec::new();
    let mut server = Vec::new();
    let mut x: u64 = 7;
    let mut size = 16 * 1024;
    for n in 1..=24u32 {
        client.extend_from_slice(format!("a{n} UID FETCH {n} (BODY.PEEK[] FLAGS)\r\n").as_bytes());
        server.extend_from_slice(
            format!("* {n} FETCH (UID {n} FLAGS (\\Seen) BODY[] {{{size}}}\r\n").as_bytes(),
        );
        let start = server.len();
        while server.len() - start < size {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            server.extend_from_slice(format!("{x:016x} a{n} OK fake {{12}}\r\n").as_bytes());
        }
        server.truncate(start + size);
        server.extend_from_slice(format!(")\r\na{n} OK UID FETCH completed\r\n").as_bytes());
        client.extend_from_slice(format!("b{n} NOOP\r\n").as_bytes());
        server.extend_from_slice(format!("* {n} EXISTS\r\nb{n} OK NOOP\r\n").as_bytes());
        size = (size * 3 / 2).min(1 << 20);
    }
    (client, server)
}

fn observer(c: &mut Criterion) {
    let (client, server) = mix();
    let round = (client.len() + server.len()) as u64;
    let rounds = (1u64 << 30) / round;
    let mut group = c.benchmark_group("observer");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(round * rounds));
    group.bench_function("1GiB_mix_in_32KiB_reads", |b| {
        b.iter(|| {
            let mut observer = Observer::new(Discard);
            for _ in 0..rounds {
                for chunk in client.chunks(32 * 1024) {
                    observer.observe(Way::ClientToBackend, chunk);
                }
                for chunk in server.chunks(32 * 1024) {
                    observer.observe(Way::BackendToClient, chunk);
                }
            }
        })
    });
    // The worst case for the observer: no literals, only short lines it must frame.
    let mut lines = Vec::new();
    for n in 0..200_000u32 {
        lines.extend_from_slice(
            format!("* {n} FETCH (UID {n} FLAGS (\\Seen \\Answered))\r\n").as_bytes(),
        );
    }
    let rounds = (1u64 << 30) / lines.len() as u64;
    group.throughput(Throughput::Bytes(lines.len() as u64 * rounds));
    group.bench_function("1GiB_untagged_lines_in_32KiB_reads", |b| {
        b.iter(|| {
            let mut observer = Observer::new(Discard);
            for _ in 0..rounds {
                for chunk in lines.chunks(32 * 1024) {
                    observer.observe(Way::BackendToClient, chunk);
                }
            }
        })
    });
    group.finish();
}

/// Bytes pushed through the relay per measured iteration.
const RELAY_BYTES: usize = 256 << 20;

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.unwrap(), b.unwrap().0)
}

/// User + system CPU time of this whole process so far.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we pass.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[derive(Clone, Copy)]
enum Clock {
    Wall,
    /// CPU time of the process (writer, relay and reader together): the observer's cost shows
    /// here without the scheduling noise of wall time on a small machine.
    Cpu,
}

/// backend writer → [relay] → client reader; returns the time to move RELAY_BYTES.
async fn one_run(server: &[u8], observed: bool, clock: Clock) -> Duration {
    let cpu_started = cpu_time();
    let (mut client_end, proxy_client) = pair().await;
    let (proxy_backend, mut backend_end) = pair().await;
    let payload = server.to_vec();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < RELAY_BYTES {
            backend_end.write_all(&payload).await.unwrap();
            sent += payload.len();
        }
        backend_end.shutdown().await.unwrap();
        // Keep the socket open until the relay has finished reading.
        let mut rest = Vec::new();
        let _ = backend_end.read_to_end(&mut rest).await;
    });
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = client_end.read(&mut buf).await.unwrap();
            if n == 0 {
                break got;
            }
            got += n;
        }
    });
    let (client, backend) = (Stream::Plain(proxy_client), Stream::Plain(proxy_backend));
    let half_close = Duration::from_secs(10);
    if observed {
        let observer = Observer::new(Discard);
        let _ = relay(
            client,
            backend,
            half_close,
            observer,
            Vec::new(),
            Vec::new(),
            true,
        )
        .await;
    } else {
        let _ = relay(
            client,
            backend,
            half_close,
            (),
            Vec::new(),
            Vec::new(),
            true,
        )
        .await;
    }
    let got = reader.await.unwrap();
    let elapsed = match clock {
        Clock::Wall => started.elapsed(),
        Clock::Cpu => cpu_time() - cpu_started,
    };
    writer.await.unwrap();
    assert!(got >= RELAY_BYTES);
    elapsed
}

fn relay_throughput(c: &mut Criterion) {
    let (_, server) = mix();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (group_name, clock) in [("relay_wall", Clock::Wall), ("relay_cpu", Clock::Cpu)] {
        let mut group = c.benchmark_group(group_name);
        group.sample_size(20);
        group.throughput(Throughput::Bytes(RELAY_BYTES as u64));
        // Alternate the two within one run so machine noise hits both alike.
        for round in 1..=3 {
            for observed in [false, true] {
                let name = format!("{}_{round}", if observed { "observed" } else { "plain" });
                group.bench_function(&name, |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| runtime.block_on(one_run(&server, observed, clock)))
                            .sum()
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, observer, relay_throughput);
criterion_main!(benches);
