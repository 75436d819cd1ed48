//! A deliberately badly behaved plugin for the host's sandbox tests.
//!
//! The payload names the misbehaviour, so one loaded plugin can show that a
//! bad event fails alone and the next event is served.

use std::sync::atomic::{AtomicU64, Ordering};

use weir_guest::{Event, Plugin, Result, config, emit, reject, retry, retry_after, state};

pub struct Hostile;

/// Events this instance has handled: what a plugin keeping a global
/// counter sees (the host may or may not reuse an instance).
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// Zero unless an event scribbled on this instance's globals.
static POISON: AtomicU64 = AtomicU64::new(0);

/// Recursion with scalar frames only: each level costs wasm call stack, not
/// linear memory, so it exhausts the engine's stack limit. The rotate-xor
/// keeps the optimiser from turning it into a loop.
#[inline(never)]
fn deep(n: u64) -> u64 {
    if n == u64::MAX {
        return 0;
    }
    deep(n + 1).rotate_left(1) ^ n
}

/// Recursion with big frames: Rust keeps arrays on its shadow stack in
/// linear memory, which overflows before the wasm call stack does.
#[inline(never)]
fn deep_frames(n: u64) -> u64 {
    if n == u64::MAX {
        return 0;
    }
    let frame = std::hint::black_box([n; 256]);
    deep_frames(n + 1) ^ frame[(n % 256) as usize]
}

impl Plugin for Hostile {
    fn handle(event: Event) -> Result {
        let handled = HANDLED.fetch_add(1, Ordering::Relaxed) + 1;
        match event.text()? {
            "ok" => Ok(()),
            "loop" => loop {
                std::hint::black_box(());
            },
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "stack" => Err(reject(format!("unreachable: {}", deep(0)))),
            "shadow-stack" => Err(reject(format!("unreachable: {}", deep_frames(0)))),
            "panic" => {
                #[allow(clippy::panic)]
                {
                    panic!("hostile guest panics on purpose")
                }
            }
            "read-file" => match std::fs::read("/etc/passwd") {
                Ok(bytes) => Err(reject(format!(
                    "SANDBOX ESCAPE: read {} bytes",
                    bytes.len()
                ))),
                Err(e) => Err(reject(format!("file access denied: {e}"))),
            },
            "socket" => match std::net::TcpStream::connect("127.0.0.1:4222") {
                Ok(_) => Err(reject("SANDBOX ESCAPE: connected".to_string())),
                Err(e) => Err(reject(format!("network access denied: {e}"))),
            },
            "env" => match std::env::vars().next() {
                Some((k, _)) => Err(reject(format!("SANDBOX ESCAPE: saw env {k}"))),
                None => Ok(()),
            },
            "huge-emit" => {
                let big = vec![b'x'; 2 << 20];
                emit::publish("hostile.huge", &big)?;
                Ok(())
            }
            twice if twice.starts_with("emit-twice ") => {
                // Two events of this many bytes: each within the emit
                // limit, together maybe not within one commit message.
                let bytes: usize = twice["emit-twice ".len()..].parse().unwrap_or(0);
                let body = vec![b'x'; bytes];
                emit::publish("hostile.out", &body)?;
                emit::publish("hostile.out", &body)?;
                Ok(())
            }
            "many-emits" => {
                for _ in 0..100_000 {
                    emit::publish("hostile.many", b"x")?;
                }
                Ok(())
            }
            "emit-then-fail" => {
                emit::publish("hostile.out", b"should never be published")?;
                state::set("leak", b"should never be committed")?;
                Err(retry("failing after emitting"))
            }
            "echo" => {
                emit::publish("hostile.out", event.id.as_bytes())?;
                Ok(())
            }
            "slow-echo" => {
                // Busy for a while without calling the host, so shutdown
                // and fault tests catch events in flight.
                let until = std::time::Instant::now() + std::time::Duration::from_millis(20);
                while std::time::Instant::now() < until {
                    std::hint::black_box(());
                }
                emit::publish("hostile.out", event.id.as_bytes())?;
                Ok(())
            }
            "retry" => Err(retry_after(
                "asked to retry",
                std::time::Duration::from_millis(50),
            )),
            "reject" => Err(reject("asked to reject")),
            "instance-count" => {
                // How many events this instance has seen, itself included.
                emit::publish("hostile.out", handled.to_string().as_bytes())?;
                Ok(())
            }
            "corrupt-then-trap" => {
                POISON.store(0xdead_beef, Ordering::Relaxed);
                #[allow(clippy::panic)]
                {
                    panic!("scribbled on my globals, now trapping")
                }
            }
            "check-globals" => match POISON.load(Ordering::Relaxed) {
                0 => {
                    emit::publish("hostile.out", b"pristine")?;
                    Ok(())
                }
                poison => Err(reject(format!(
                    "globals corrupted by an earlier event: {poison:#x}"
                ))),
            },
            "retry-once" if event.attempt == 1 => Err(retry("first attempt always fails")),
            "retry-once" => {
                emit::publish("hostile.out", event.id.as_bytes())?;
                Ok(())
            }
            "count" => {
                let n = state::get_json::<u64>("count")?.unwrap_or(0) + 1;
                state::set_json("count", &n)?;
                emit::publish("hostile.out", n.to_string().as_bytes())?;
                Ok(())
            }
            gated if gated.starts_with("gated-tally ") => {
                // A tally the manifest can switch off: `blocked = true`
                // rejects every event, the fixed version counts them.
                if config::parse::<bool>("blocked")?.unwrap_or(false) {
                    return Err(reject("blocked by the manifest"));
                }
                let key = format!("tally.{}", &gated["gated-tally ".len()..]);
                let n = state::get_json::<u64>(&key)?.unwrap_or(0) + 1;
                state::set_json(&key, &n)?;
                emit::publish("hostile.out", event.id.as_bytes())?;
                Ok(())
            }
            tally if tally.starts_with("tally ") => {
                // Count events per key in state and emit one output per
                // event: the exactly-once crash tests check both. The
                // output also carries this instance's own global count,
                // which differs between runs of the same event: only the
                // committed run's output may ever be published.
                let key = format!("tally.{}", &tally["tally ".len()..]);
                let n = state::get_json::<u64>(&key)?.unwrap_or(0) + 1;
                state::set_json(&key, &n)?;
                emit::Message::new("hostile.out")
                    .header("Instance-Count", handled.to_string())
                    .payload(event.id.as_bytes())
                    .send()?;
                Ok(())
            }
            ordered if ordered.starts_with("ordered ") || ordered.starts_with("ordered-flaky ") => {
                // Sleep (through WASI, so the host thread is free), then
                // report "<subject> <sequence>": the ordering tests check
                // that outputs of one key come out in stream order.
                let mut words = ordered.split(' ');
                let flaky = words.next() == Some("ordered-flaky");
                let delay_ms: u64 = words.next().and_then(|d| d.parse().ok()).unwrap_or(0);
                if flaky && event.attempt == 1 && event.sequence.is_multiple_of(5) {
                    return Err(retry_after(
                        "flaky on first attempt",
                        std::time::Duration::from_millis(20),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                emit::publish(
                    "hostile.out",
                    format!("{} {}", event.subject, event.sequence).as_bytes(),
                )?;
                Ok(())
            }
            after if after.starts_with("retry-after ") => {
                // Retry after this many ms; 0 leaves the delay to the
                // manifest's backoff.
                let ms: u64 = after["retry-after ".len()..].parse().unwrap_or(0);
                match ms {
                    0 => Err(retry("asked to retry with backoff")),
                    ms => Err(retry_after(
                        "asked to retry after a delay",
                        std::time::Duration::from_millis(ms),
                    )),
                }
            }
            sleep if sleep.starts_with("sleep ") => {
                let ms: u64 = sleep["sleep ".len()..].parse().unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            other => Err(reject(format!("unknown command {other:?}"))),
        }
    }
}

weir_guest::export_plugin!(Hostile);
