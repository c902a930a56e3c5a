//! The observer's cost: scanning a synthetic mix of commands and FETCH responses with large
//! literals, and the relay over loopback with and without the observer.
//!
//! `cargo bench --bench relay`. The target: the observer costs under 3% of relay
//! throughput on large-literal traffic (compare `relay/observed` with `relay/plain`).
//!
//! `cargo bench --bench relay -- compress`: the observer over the same traffic after
//! `COMPRESS DEFLATE` (inflated and observed, or bytes only) next to it uncompressed, each
//! measured per octet of the *inflated* traffic, so the times compare per GB of mail.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use imapgate::config::CompressMode;
use imapgate::{BackendTuning, CommandId, CommandSink, Completion, Observer, Stream, Way, relay};

/// Splice on, as when the figures in BENCHMARKS.md were made (it is off by default now).
const TUNING: BackendTuning = BackendTuning {
    quickack: true,
    splice: true,
};

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

/// `plain` as one raw DEFLATE stream, sync-flushed every 16 KiB (a server flushes per write).
fn deflated(plain: &[u8]) -> Vec<u8> {
    let mut z = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(plain.len() / 2);
    for piece in plain.chunks(16 * 1024) {
        let mut input = piece;
        loop {
            out.reserve(64 * 1024);
            let before = z.total_in();
            z.compress_vec(input, &mut out, flate2::FlushCompress::Sync)
                .unwrap();
            input = &input[(z.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
    }
    out
}

/// The observer after COMPRESS: the mix deflated (both ways) vs plain, 32 KiB reads.
fn compress(c: &mut Criterion) {
    let (client, server) = mix();
    let (client_z, server_z) = (deflated(&client), deflated(&server));
    let inflated = (client.len() + server.len()) as u64;
    eprintln!(
        "compress: {inflated} octets inflated, {} on the wire (ratio {:.2})",
        client_z.len() + server_z.len(),
        inflated as f64 / (client_z.len() + server_z.len()) as f64
    );
    let mut group = c.benchmark_group("compress");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(inflated));
    let run = |observer: &mut Observer<Discard>, client: &[u8], server: &[u8]| {
        for chunk in client.chunks(32 * 1024) {
            observer.observe(Way::ClientToBackend, chunk);
        }
        for chunk in server.chunks(32 * 1024) {
            observer.observe(Way::BackendToClient, chunk);
        }
    };
    // Alternated within one run so the shared machine's noise hits all three alike.
    for round in 1..=2 {
        group.bench_function(format!("plain_{round}"), |b| {
            b.iter(|| run(&mut Observer::new(Discard), &client, &server))
        });
        // The floor: inflating alone (miniz_oxide into an 8 KiB buffer, as the observer does),
        // without framing.
        group.bench_function(format!("inflate_only_{round}"), |b| {
            b.iter(|| {
                for wire in [&client_z, &server_z] {
                    let mut state = miniz_oxide::inflate::stream::InflateState::new_boxed(
                        miniz_oxide::DataFormat::Raw,
                    );
                    let mut out = vec![0u8; 8 * 1024];
                    for chunk in wire.chunks(32 * 1024) {
                        let mut input = chunk;
                        loop {
                            let step = miniz_oxide::inflate::stream::inflate(
                                &mut state,
                                input,
                                &mut out,
                                miniz_oxide::MZFlush::None,
                            );
                            input = &input[step.bytes_consumed..];
                            std::hint::black_box(&out[..step.bytes_written]);
                            if step.bytes_consumed == 0 && step.bytes_written == 0 {
                                break;
                            }
                        }
                    }
                }
            })
        });
        for (name, mode) in [
            ("deflate_observed", CompressMode::Observe),
            ("deflate_bytes_only", CompressMode::BytesOnly),
        ] {
            group.bench_function(format!("{name}_{round}"), |b| {
                b.iter(|| {
                    let mut observer = Observer::with_compress(Discard, mode);
                    observer.observe(Way::ClientToBackend, b"z COMPRESS DEFLATE\r\n");
                    observer.observe(Way::BackendToClient, b"z OK DEFLATE active\r\n");
                    run(&mut observer, &client_z, &server_z);
                })
            });
        }
    }
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
            TUNING,
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
            TUNING,
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

criterion_group!(benches, observer, compress, relay_throughput);
criterion_main!(benches);
