//! The patched async-nats (vendor/README.md): a message whose header block
//! cannot be parsed is delivered with its raw block instead of taking the
//! connection down. Driven by a scripted server so the exact bytes on the
//! wire are ours.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Accept clients, counting them. Each gets the handshake; the first, once
/// it subscribes, gets `messages` (raw protocol, `{sid}` replaced by its
/// subscription id). PINGs are answered.
fn scripted_server(listener: TcpListener, messages: Vec<Vec<u8>>) -> Arc<AtomicUsize> {
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            let messages = if first { messages.clone() } else { Vec::new() };
            tokio::spawn(serve(socket, messages));
        }
    });
    connections
}

async fn serve(socket: tokio::net::TcpStream, messages: Vec<Vec<u8>>) {
    let (read, mut write) = socket.into_split();
    let info = b"INFO {\"server_id\":\"scripted\",\"version\":\"2.15.1\",\"proto\":1,\"headers\":true,\"max_payload\":1048576}\r\n";
    if write.write_all(info).await.is_err() {
        return;
    }
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply: Vec<u8> = if line.starts_with("PING") {
            b"PONG\r\n".to_vec()
        } else if let Some(sub) = line.strip_prefix("SUB test.subject ") {
            let sid = sub.split_whitespace().last().unwrap_or_default();
            messages
                .iter()
                .flat_map(|m| replace(m, b"{sid}", sid.as_bytes()))
                .collect()
        } else {
            continue;
        };
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

fn hmsg(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HMSG test.subject {{sid}} {} {}\r\n",
        header.len(),
        header.len() + payload.len()
    )
    .into_bytes();
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

#[tokio::test]
async fn malformed_header_blocks_are_delivered_raw_and_the_connection_stays() {
    let malformed: [&[u8]; 3] = [
        b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n",
        b"NATS/1.0\r\nBad Name: v\r\n\r\n",
        b"NATS/1.0\r\nno colon here\r\n\r\n",
    ];
    let mut script = vec![b"MSG test.subject {sid} 5\r\nfirst\r\n".to_vec()];
    for block in malformed {
        script.push(hmsg(block, b"bad"));
    }
    script.push(hmsg(b"NATS/1.0\r\nGood: yes\r\n\r\n", b"last"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = scripted_server(listener, script);

    let client = async_nats::connect(format!("nats://{addr}")).await.unwrap();
    let mut subscriber = client.subscribe("test.subject").await.unwrap();
    let mut received = Vec::new();
    for _ in 0..5 {
        let message = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
            .await
            .expect("a message within 5 s")
            .expect("subscription open");
        received.push(message);
    }
    assert_eq!(received[0].payload.as_ref(), b"first");
    for (message, block) in received[1..4].iter().zip(malformed) {
        assert_eq!(message.payload.as_ref(), b"bad");
        let headers = message.headers.as_ref().expect("a header map");
        assert_eq!(headers.malformed(), Some(block));
        assert!(headers.is_empty());
    }
    let last = &received[4];
    assert_eq!(last.payload.as_ref(), b"last");
    let headers = last.headers.as_ref().unwrap();
    assert_eq!(headers.malformed(), None);
    assert_eq!(headers.get("Good").map(|v| v.as_str()), Some("yes"));
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the client reconnected"
    );
    assert_eq!(client.statistics().connects.load(Ordering::SeqCst), 1);
}
