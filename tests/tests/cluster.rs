//! Replicated streams and state on a three-node JetStream cluster: the
//! `replicas` settings reach the streams and the plugin's bucket, and a
//! stateful plugin's effects come out exactly once. Needs `cargo xtask
//! build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::time::Duration;

use async_nats::jetstream;
use weir::dev::{NatsServer, free_port};
use weir_integration_tests::{WeirProcess, count, dist, publish_all, wait_until};

/// Three nats-servers routed into one cluster; their client URLs.
fn cluster(dir: &std::path::Path) -> (Vec<NatsServer>, String) {
    let client: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
    let routes: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
    let servers = (0..3)
        .map(|i| {
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                .collect();
            let conf = format!(
                "server_name: n{i}\ncluster {{ name: weir-test, listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
                routes[i],
                others.join(", ")
            );
            NatsServer::start_with_conf(&dir.join(format!("n{i}")), client[i], &conf).unwrap()
        })
        .collect();
    let urls: Vec<String> = client
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    (servers, urls.join(","))
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_streams_and_state_on_a_three_node_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (_servers, urls) = cluster(dir.path());
    let client = async_nats::ConnectOptions::new()
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(client);
    // The cluster needs a moment to elect a meta leader.
    wait_until(
        Duration::from_secs(60),
        "a JetStream meta leader",
        || async { js.query_account().await.is_ok() },
    )
    .await;

    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let wasm = dist("test-guests/hostile.wasm");
    std::fs::copy(&wasm, plugins.join("tally.wasm")).unwrap();
    let manifest = std::fs::read_to_string(wasm.with_extension("toml"))
        .unwrap()
        .replace("start = \"all\"", "start = \"all\"\nconcurrency = 4");
    std::fs::write(plugins.join("tally.toml"), manifest).unwrap();
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{urls}\"\n[plugins]\ndir = \"plugins\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\nreplicas = 3\n[dead-letter]\nreplicas = 3\n\
             [[streams]]\nname = \"HOSTILE\"\nsubjects = [\"hostile.>\"]\nreplicas = 3\n"
        ),
    )
    .unwrap();
    let mut host = WeirProcess::start(&config, &dir.path().join("weir.log"));
    host.wait_ready();

    let events: Vec<String> = (0..300).map(|i| format!("tally k{}", i % 3)).collect();
    publish_all(&js, "hostile.in", &events, None).await;
    wait_until(Duration::from_secs(60), "300 outputs", || async {
        count(&js, "HOSTILE", "hostile.out").await == 300
    })
    .await;

    for stream in ["HOSTILE", "WEIR_DLQ", "KV_weir_state_tally"] {
        let mut handle = js.get_stream(stream).await.unwrap();
        let info = handle.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        let cluster = info.cluster.as_ref().expect("cluster info");
        assert_eq!(
            cluster.replicas.len(),
            2,
            "{stream}: a leader and two replicas"
        );
    }
    let kv = js.get_key_value("weir_state_tally").await.unwrap();
    for k in 0..3 {
        let value = kv.get(format!("s.tally.k{k}")).await.unwrap().unwrap();
        assert_eq!(value.as_ref(), b"100", "k{k}");
    }
}
