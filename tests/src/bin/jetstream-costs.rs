//! What each JetStream primitive the host uses costs, per message: rate,
//! and CPU time of nats-server and of this client (from /proc), in one run
//! against one server. The numbers behind the commit design in
//! ARCHITECTURE.md ("Group commit").
//!
//! ```sh
//! cargo run --release -p weir-integration-tests --bin jetstream-costs -- [MESSAGES]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer};
use bytes::Bytes;
use futures::StreamExt;
use weir_integration_tests::{command_line, cpu, stream_state};

/// A rate and the CPU per message of nats-server and of this client, from
/// one stretch of the run.
struct Probe {
    wall: Instant,
    cpu: cpu::Meter,
}

impl Probe {
    fn start(pid: u32) -> Self {
        Probe {
            wall: Instant::now(),
            cpu: cpu::Meter::start(pid),
        }
    }
    fn report(self, label: &str, n: usize) {
        self.report_per(label, n, "msg");
    }
    fn report_per(self, label: &str, n: usize, unit: &str) {
        let wall = self.wall.elapsed().as_secs_f64();
        let spent = self.cpu.per_event(n);
        println!(
            "{label:<60} {:>9.0}/s  server {:>6.1} us/{unit}  client {:>6.1} us/{unit}",
            n as f64 / wall,
            spent.server_us,
            spent.this_us
        );
    }
}

#[tokio::main]
async fn main() {
    const USAGE: &str = "jetstream-costs [MESSAGES (20000)]";
    let n = command_line::count(&command_line::args(USAGE), 0, 20_000, USAGE);
    let dir = tempfile::tempdir().unwrap();
    let server = weir::dev::NatsServer::start_on_free_port(&dir.path().join("nats"), "").unwrap();
    let pid = server.pid().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "IN".into(),
        subjects: vec!["in.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_stream(jetstream::stream::Config {
        name: "KV".into(),
        subjects: vec!["kv.>".into()],
        max_messages_per_subject: 1,
        allow_atomic_publish: true,
        allow_message_ttl: true,
        allow_batch_publish: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let payload = Bytes::from(vec![b'x'; 200]);
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(
            js.publish(format!("in.{}", i % 50), payload.clone())
                .await
                .unwrap(),
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks.drain(..) {
        a.await.unwrap();
    }
    let stream = js.get_stream("IN").await.unwrap();
    for (label, double) in [("consume + ack", false), ("consume + double_ack", true)] {
        let c = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("c{double}")),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let probe = Probe::start(pid);
        let mut messages = c.messages().await.unwrap();
        if double {
            let mut pending = futures::stream::FuturesUnordered::new();
            for _ in 0..n {
                let m = messages.next().await.unwrap().unwrap();
                pending.push(async move { m.double_ack().await.unwrap() });
                if pending.len() >= 64 {
                    pending.next().await;
                }
            }
            while pending.next().await.is_some() {}
        } else {
            for _ in 0..n {
                let m = messages.next().await.unwrap().unwrap();
                m.ack_with(AckKind::Ack).await.unwrap();
            }
        }
        probe.report(label, n);
    }

    // KV-like writes, pipelined, 1000 outstanding.
    for (label, guard, ttl) in [
        ("publish, pipelined PubAcks", false, false),
        ("publish + TTL", false, true),
        ("publish + TTL + must-not-exist guard", true, true),
    ] {
        let probe = Probe::start(pid);
        for i in 0..n {
            let mut h = HeaderMap::new();
            if guard {
                h.insert("Nats-Expected-Last-Subject-Sequence", "0");
            }
            if ttl {
                h.insert("Nats-TTL", "600");
            }
            acks.push(
                js.publish_with_headers(
                    format!("kv.{label:.3}{guard}{ttl}.{i}"),
                    h,
                    payload.clone(),
                )
                .await
                .unwrap(),
            );
            if acks.len() == 1000 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks.drain(..) {
            a.await.unwrap();
        }
        probe.report(label, n);
    }

    // Core publish, no ack requested.
    let probe = Probe::start(pid);
    for i in 0..n {
        client
            .publish(format!("kv.core.{i}"), payload.clone())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // Wait until stored.
    loop {
        if stream_state(&js, "KV").await.messages >= 4 * n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    probe.report("core publish (no PubAck), flushed", n);

    // Atomic batches of k.
    for k in [2usize, 16, 100, 500] {
        let probe = Probe::start(pid);
        let batches = n / k;
        let mut inflight = futures::stream::FuturesUnordered::new();
        for b in 0..batches {
            let messages = (0..k).map(|j| (format!("kv.atomic{k}.{b}.{j}"), payload.clone()));
            inflight.push(atomic_batch(
                &client,
                format!("b{k}x{b}"),
                messages.collect(),
            ));
            if inflight.len() >= 8 {
                inflight.next().await;
            }
        }
        while inflight.next().await.is_some() {}
        probe.report(
            &format!("atomic batches of {k} (guard+TTL), 8 in flight"),
            batches * k,
        );
    }

    // A group as the loyalty plugin's committer writes it under load
    // (BENCHMARKS.md, peer benchmark): 114 state keys of a few bytes each
    // and a 24 KB done block, one group in flight; then the same values
    // packed into one message beside the block. What packing state would
    // save the server, per group.
    let groups = (n / GROUP_KEYS).max(1);
    for packed in [false, true] {
        let probe = Probe::start(pid);
        for g in 0..groups {
            let mut messages: Vec<(String, Bytes)> = if packed {
                vec![(
                    format!("kv.packed.{g}"),
                    Bytes::from(vec![b'v'; GROUP_KEYS * 32]),
                )]
            } else {
                (0..GROUP_KEYS)
                    .map(|j| (format!("kv.keys.{g}.{j}"), Bytes::from_static(b"1234")))
                    .collect()
            };
            messages.push((
                format!("kv.block.{packed}.{g}"),
                Bytes::from(vec![b'd'; 24 * 1024]),
            ));
            atomic_batch(&client, format!("g{packed}x{g}"), messages).await;
        }
        let label = if packed {
            "a group packed: 1 state message + block"
        } else {
            "a group: 114 state messages + block"
        };
        probe.report_per(label, groups, "group");
    }

    commit_records(&js, pid, groups).await;
}

/// How a commit record's state writes reach their per-key messages.
#[derive(Clone, Copy, PartialEq)]
enum Apply {
    /// Not at all: what the records alone cost.
    Never,
    /// In atomic batches of 500 keys and a watermark.
    InAtomicBatches,
    /// Pipelined plain publishes, each key overwriting its last value,
    /// then the watermark once every PubAck is in.
    Pipelined,
}

/// The layout a single-message commit would use (BENCHMARKS.md, "What a
/// single-message commit would save"): each group is one record on
/// `<log>.<n>`, guarded on the last sequence of `<log>.>` (every commit of
/// the plugin, whichever host made it), so no atomic batch is staged per
/// group; the records' state writes reach per-key messages once per
/// `GROUPS_PER_APPLY` groups, where writes of one key collapse, or after
/// every group, where they do not. Keys as in loyalty's drain: 1,000
/// customers.
async fn commit_records(js: &jetstream::Context, pid: u32, groups: usize) {
    const GROUPS_PER_APPLY: usize = 40;
    const KEYS: usize = 1_000;
    let client = js.client();
    // A loyalty group's record: per event its sequence, a 200-byte
    // outbox and a state value of a few bytes.
    let record = Bytes::from(vec![b'r'; GROUP_KEYS * 240]);
    let guarded = |log: &str, last: u64| {
        let mut h = HeaderMap::new();
        h.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last.to_string().as_str(),
        );
        h.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            format!("{log}.>").as_str(),
        );
        h
    };
    let seq_of = |reply: &async_nats::Message| -> Result<u64, String> {
        let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        match ack["seq"].as_u64() {
            Some(seq) if ack.get("error").is_none() => Ok(seq),
            _ => Err(String::from_utf8_lossy(&reply.payload).into_owned()),
        }
    };
    let every_group =
        format!("records, each applied at once ({GROUP_KEYS} keys + block, pipelined)");
    for (apply, every, label) in [
        (
            Apply::Never,
            GROUPS_PER_APPLY,
            "one record per group, guarded on <log>.>",
        ),
        (
            Apply::InAtomicBatches,
            GROUPS_PER_APPLY,
            &format!("records, applied every {GROUPS_PER_APPLY} groups (atomic)"),
        ),
        (
            Apply::Pipelined,
            GROUPS_PER_APPLY,
            &format!("records, applied every {GROUPS_PER_APPLY} groups (pipelined)"),
        ),
        (Apply::Pipelined, 1, &every_group),
    ] {
        let log = format!("kv.log{}x{every}", apply as u8);
        let probe = Probe::start(pid);
        let mut last = 0;
        let mut written = std::collections::BTreeSet::new();
        for g in 0..groups {
            let reply = client
                .request_with_headers(format!("{log}.{g}"), guarded(&log, last), record.clone())
                .await
                .unwrap();
            last = seq_of(&reply).expect("a record guarded on the log's last sequence is stored");
            written.extend((0..GROUP_KEYS).map(|j| (g * GROUP_KEYS + j) % KEYS));
            if apply == Apply::Never || (g + 1) % every != 0 {
                continue;
            }
            let keys = std::mem::take(&mut written);
            // Applied at once, the watermark stands for the group's done block.
            let size = if every == 1 { 24 * 1024 } else { 512 };
            let watermark = (format!("{log}-applied"), Bytes::from(vec![b'd'; size]));
            if apply == Apply::InAtomicBatches {
                let keys: Vec<(String, Bytes)> = keys
                    .into_iter()
                    .map(|k| (format!("kv.applied.{g}.{k}"), Bytes::from_static(b"1234")))
                    .collect();
                for (i, chunk) in keys.chunks(500).enumerate() {
                    let mut messages = chunk.to_vec();
                    messages.push((format!("{}.{g}.{i}", watermark.0), watermark.1.clone()));
                    atomic_batch(&client, format!("a{g}x{i}"), messages).await;
                }
            } else {
                let mut acks = Vec::with_capacity(keys.len());
                for k in keys {
                    let subject = format!("kv.state.{k}");
                    acks.push(
                        js.publish(subject, Bytes::from_static(b"1234"))
                            .await
                            .unwrap(),
                    );
                }
                for ack in acks {
                    ack.await.unwrap();
                }
                js.publish(watermark.0, watermark.1)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
        probe.report_per(label, groups, "group");
        // The guard holds: a record built on a stale view of the log is
        // refused, which is what lets several hosts share it.
        let stale = client
            .request_with_headers(
                format!("{log}.stale"),
                guarded(&log, last - 1),
                record.clone(),
            )
            .await
            .unwrap();
        assert!(seq_of(&stale).is_err(), "a stale guard was not refused");
    }
    // The same records guarded on every subject of the bucket (`kv.>`,
    // by now hundreds of thousands of subjects), so that a write anywhere
    // in it, a host's or one made behind Weir's back, refuses a record
    // built before it: what finding the last sequence of so wide a
    // wildcard costs the server.
    let state = stream_state(js, "KV").await;
    let (subjects, mut last) = (state.subjects_count, state.last_sequence);
    let probe = Probe::start(pid);
    for g in 0..groups {
        let reply = client
            .request_with_headers(format!("kv.whole.{g}"), guarded("kv", last), record.clone())
            .await
            .unwrap();
        last = seq_of(&reply).expect("a record guarded on the bucket's last sequence is stored");
    }
    probe.report_per(
        &format!("one record per group, guarded on all {subjects} subjects"),
        groups,
        "group",
    );
}

/// Keys one loyalty group writes, on average, under load.
const GROUP_KEYS: usize = 114;

/// Store `messages` as one atomic batch, each guarded by "must not exist"
/// and given a TTL as the committer's are, and wait for its PubAck.
async fn atomic_batch(client: &async_nats::Client, id: String, messages: Vec<(String, Bytes)>) {
    let last = messages.len();
    for (j, (subject, payload)) in messages.into_iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Batch-Id", id.as_str());
        h.insert("Nats-Batch-Sequence", (j + 1).to_string().as_str());
        h.insert("Nats-TTL", "600");
        h.insert("Nats-Expected-Last-Subject-Sequence", "0");
        if j + 1 < last {
            client
                .publish_with_headers(subject, h, payload)
                .await
                .unwrap();
        } else {
            h.insert("Nats-Batch-Commit", "1");
            let r = client
                .request_with_headers(subject, h, payload)
                .await
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&r.payload).contains("error"),
                "{}",
                String::from_utf8_lossy(&r.payload)
            );
        }
    }
}
