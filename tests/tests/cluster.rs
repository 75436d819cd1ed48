//! Replicated streams and state on a three-node JetStream cluster: the
//! `replicas` settings reach the streams and the plugin's bucket, a
//! stateful plugin's effects come out exactly once, and two hosts lose and
//! duplicate nothing when the node leading the input stream, or the one
//! leading the plugin's state bucket, is killed -9 and restarted. Needs
//! `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::time::Duration;

use async_nats::jetstream;
use weir::dev::{NatsCluster, NatsServer, free_port};
use weir_integration_tests::{
    WeirProcess, cluster_client, count, custom_section, dist, header, publish_all, read_stream,
    version_of, wait_until, weir_cli,
};

/// Three nats-servers routed into one cluster; their client URLs.
fn cluster(dir: &std::path::Path) -> (Vec<NatsServer>, String) {
    let cluster = NatsCluster::start_on_free_ports(dir, 3).unwrap();
    let urls = cluster.urls();
    (cluster.nodes, urls)
}

/// The tally guest as plugin `tally` and a config with everything R3;
/// returns the config's path.
fn host_config(dir: &std::path::Path, urls: &str) -> std::path::PathBuf {
    install_tally(dir);
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{urls}\"\n[plugins]\ndir = \"plugins\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\nreplicas = 3\n[dead-letter]\nreplicas = 3\n\
             [[streams]]\nname = \"HOSTILE\"\nsubjects = [\"hostile.>\"]\nreplicas = 3\n"
        ),
    )
    .unwrap();
    config
}

/// The tally guest as plugin `tally` in `dir/plugins`.
fn install_tally(dir: &std::path::Path) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let wasm = dist("test-guests/hostile.wasm");
    std::fs::copy(&wasm, plugins.join("tally.wasm")).unwrap();
    let manifest = std::fs::read_to_string(wasm.with_extension("toml"))
        .unwrap()
        .replace("start = \"all\"", "start = \"all\"\nconcurrency = 4")
        .replace("max-deliveries = 3", "max-deliveries = 50");
    std::fs::write(plugins.join("tally.toml"), manifest).unwrap();
}

/// The input stream, the dead letters and the tally's state bucket each
/// have a leader and two replicas.
async fn assert_replicated_three_ways(js: &jetstream::Context) {
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
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_streams_and_state_on_a_three_node_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (_servers, urls) = cluster(dir.path());
    let js = cluster_client(&urls).await;
    let config = host_config(dir.path(), &urls);
    let mut host = WeirProcess::start(&config, &dir.path().join("weir.log"));
    host.wait_ready();

    let events: Vec<String> = (0..300).map(|i| format!("tally k{}", i % 3)).collect();
    publish_all(&js, "hostile.in", &events, None).await;
    wait_until(Duration::from_secs(60), "300 outputs", || async {
        count(&js, "HOSTILE", "hostile.out").await == 300
    })
    .await;

    assert_replicated_three_ways(&js).await;
    let kv = js.get_key_value("weir_state_tally").await.unwrap();
    for k in 0..3 {
        let value = kv.get(format!("s.tally.k{k}")).await.unwrap().unwrap();
        assert_eq!(value.as_ref(), b"100", "k{k}");
    }
}

/// `weir dev --cluster 3` with a config that asks for no replication:
/// a private three-node cluster, everything Weir creates on it R3, and the
/// plugin served.
#[tokio::test(flavor = "multi_thread")]
async fn weir_dev_starts_a_replicated_cluster() {
    let dir = tempfile::tempdir().unwrap();
    install_tally(dir.path());
    let port = free_port().unwrap();
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"nats://127.0.0.1:{port}\"\n[plugins]\ndir = \"plugins\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [[streams]]\nname = \"HOSTILE\"\nsubjects = [\"hostile.>\"]\n"
        ),
    )
    .unwrap();
    let state_dir = dir.path().join("state");
    let mut host = WeirProcess::start_with(
        &[
            "dev".as_ref(),
            "--cluster".as_ref(),
            "3".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--state-dir".as_ref(),
            state_dir.as_os_str(),
        ],
        &dir.path().join("weir.log"),
    );
    host.wait_ready();
    assert_eq!(host.log_text().matches("cluster node started").count(), 3);
    // The first node took the configured port.
    let js = cluster_client(&format!("nats://127.0.0.1:{port}")).await;
    let events: Vec<String> = (0..100).map(|i| format!("tally k{}", i % 5)).collect();
    publish_all(&js, "hostile.in", &events, None).await;
    wait_until(Duration::from_secs(60), "100 outputs", || async {
        count(&js, "HOSTILE", "hostile.out").await >= 100
    })
    .await;
    assert_replicated_three_ways(&js).await;
    // Stopped as an operator stops it, `weir dev` takes its cluster down
    // with it (a kill -9 at the end of the test left three servers behind).
    assert!(host.terminate().success(), "{}", host.log_text());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a cluster node still listens after weir dev stopped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_survive_the_input_streams_leader_dying() {
    two_hosts_survive_a_leader_dying("HOSTILE").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_survive_the_state_buckets_leader_dying() {
    two_hosts_survive_a_leader_dying("KV_weir_state_tally").await;
}

/// Two hosts drain 20,000 stateful events while the node leading `stream`
/// is killed -9 and restarted: nothing lost, nothing duplicated, state
/// exact, nothing dead-lettered.
async fn two_hosts_survive_a_leader_dying(stream: &str) {
    const EVENTS: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let (mut servers, urls) = cluster(dir.path());
    let js = cluster_client(&urls).await;
    let config = host_config(dir.path(), &urls);
    let mut hosts: Vec<WeirProcess> = (0..2)
        .map(|i| WeirProcess::start(&config, &dir.path().join(format!("weir-{i}.log"))))
        .collect();
    for host in &mut hosts {
        host.wait_ready();
    }
    let events: Vec<String> = (0..EVENTS).map(|i| format!("tally k{}", i % 20)).collect();
    publish_all(&js, "hostile.in", &events, None).await;
    wait_until(Duration::from_secs(120), "a quarter done", || async {
        count(&js, "HOSTILE", "hostile.out").await >= (EVENTS / 4) as u64
    })
    .await;

    // Kill -9 the node leading `stream`, then bring it back.
    let leader = js
        .get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader");
    let victim: usize = leader.trim_start_matches('n').parse().unwrap();
    servers[victim].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    servers[victim].restart().unwrap();

    wait_until(Duration::from_secs(300), "every output", || async {
        outputs_while_failing_over(&js).await >= EVENTS as u64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        EVENTS as u64,
        "no output lost or duplicated"
    );
    let kv = js.get_key_value("weir_state_tally").await.unwrap();
    for k in 0..20 {
        let value = kv.get(format!("s.tally.k{k}")).await.unwrap().unwrap();
        assert_eq!(value.as_ref(), b"1000", "k{k}: state exact");
    }
    assert_eq!(
        count(&js, "WEIR_DLQ", ">").await,
        0,
        "nothing dead-lettered"
    );
}

/// Outputs stored so far; 0 while the cluster cannot answer (a leader
/// election after a node died).
async fn outputs_while_failing_over(js: &jetstream::Context) -> u64 {
    use futures::StreamExt;
    let Ok(stream) = js.get_stream("HOSTILE").await else {
        return 0;
    };
    let Ok(mut subjects) = stream.info_with_subjects("hostile.out").await else {
        return 0;
    };
    let mut total = 0;
    while let Some(entry) = subjects.next().await {
        match entry {
            Ok((_, n)) => total += n as u64,
            Err(_) => return 0,
        }
    }
    total
}

/// Two hosts, each with its own plugin directory, deploy through the plugin
/// bucket while 20,000 stateful events flow: both converge on each
/// release, every event has one output and one state update, and events
/// published after both hosts switched carry the new version. Rollback and
/// fleet-wide removal go through the bucket too.
#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_through_the_bucket_reaches_both_hosts_while_events_flow() {
    const EVENTS: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let (_servers, urls) = cluster(dir.path());
    let js = cluster_client(&urls).await;
    let configs: Vec<std::path::PathBuf> = (0..2)
        .map(|i| {
            std::fs::create_dir_all(dir.path().join(format!("plugins-{i}"))).unwrap();
            let config = dir.path().join(format!("weir-{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[nats]\nurl = \"{urls}\"\n[plugins]\ndir = \"plugins-{i}\"\nbucket = \"weir_plugins\"\nbucket-replicas = 3\n\
                     [admin]\nlisten = \"127.0.0.1:0\"\n[control]\ntoken = \"c0ntrol\"\n\
                     [state]\nreplicas = 3\n[dead-letter]\nreplicas = 3\n\
                     [[streams]]\nname = \"HOSTILE\"\nsubjects = [\"hostile.>\"]\nreplicas = 3\n"
                ),
            )
            .unwrap();
            config
        })
        .collect();
    let mut hosts: Vec<WeirProcess> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| WeirProcess::start(c, &dir.path().join(format!("weir-{i}.log"))))
        .collect();
    for host in &mut hosts {
        host.wait_ready();
    }

    // Two releases of the tally plugin: the same code tagged v1 and v2.
    let release = |tag: &str| {
        let mut wasm = std::fs::read(dist("test-guests/hostile.wasm")).unwrap();
        wasm.extend(custom_section("weir-test-version", tag.as_bytes()));
        let path = dir.path().join(tag).join("tally.wasm");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &wasm).unwrap();
        let manifest = std::fs::read_to_string(dist("test-guests/hostile.toml"))
            .unwrap()
            .replace("start = \"all\"", "start = \"all\"\nconcurrency = 4")
            .replace("max-deliveries = 3", "max-deliveries = 50");
        std::fs::write(path.with_extension("toml"), manifest).unwrap();
        (path, version_of(&wasm))
    };
    let (v1_path, v1) = release("v1");
    let (v2_path, v2) = release("v2");
    let plugins = |args: &[&str]| {
        let args: Vec<&str> = std::iter::once("plugins")
            .chain(args.iter().copied())
            .collect();
        weir_cli(&configs[0], &args, "")
    };

    // Bad releases are refused before upload.
    let notplugin = dist("test-guests/notplugin.wasm");
    let (ok, _, stderr) = plugins(&["deploy", notplugin.to_str().unwrap()]);
    assert!(!ok && stderr.contains("is not a plugin"), "{stderr}");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "subjects = 3\n").unwrap();
    let (ok, _, stderr) = plugins(&[
        "deploy",
        v1_path.to_str().unwrap(),
        "--manifest",
        broken.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("broken.toml"), "{stderr}");

    let (ok, stdout, stderr) = plugins(&["deploy", v1_path.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        stdout.matches(&format!("version {v1}")).count(),
        3,
        "deployed, and both hosts serve it: {stdout}"
    );

    let half: Vec<String> = (0..EVENTS / 2)
        .map(|i| format!("tally k{}", i % 20))
        .collect();
    publish_all(&js, "hostile.in", &half, Some("a")).await;
    wait_until(
        Duration::from_secs(120),
        "part of the first half",
        || async { count(&js, "HOSTILE", "hostile.out").await >= (EVENTS / 8) as u64 },
    )
    .await;
    let (ok, stdout, stderr) = plugins(&["deploy", v2_path.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        stdout.matches(&format!("version {v2}")).count(),
        3,
        "{stdout}"
    );
    // Both hosts serve v2 now: what is published from here runs on it.
    publish_all(&js, "hostile.in", &half, Some("b")).await;
    wait_until(Duration::from_secs(300), "every output", || async {
        count(&js, "HOSTILE", "hostile.out").await >= EVENTS as u64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    assert_eq!(outputs.len(), EVENTS, "no output lost or duplicated");
    let mut versions_of_first_half = std::collections::BTreeSet::new();
    for output in &outputs {
        let version = header(output, "Weir-Plugin-Version").unwrap();
        let cause = header(output, "Weir-Cause-Id").unwrap();
        if cause.starts_with("b-") {
            assert_eq!(version, v2, "{cause} ran after both hosts switched");
        } else {
            assert!(version == v1 || version == v2, "{cause}: {version}");
            versions_of_first_half.insert(version.to_owned());
        }
    }
    assert_eq!(
        versions_of_first_half.len(),
        2,
        "the deploy landed while the first half flowed"
    );
    let kv = js.get_key_value("weir_state_tally").await.unwrap();
    for k in 0..20 {
        let value = kv.get(format!("s.tally.k{k}")).await.unwrap().unwrap();
        assert_eq!(value.as_ref(), b"1000", "k{k}: state exact");
    }
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);

    let (ok, stdout, stderr) = plugins(&["rollback", "tally"]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        stdout.matches(&format!("version {v1}")).count(),
        3,
        "{stdout}"
    );
    let (ok, stdout, _) = plugins(&["list"]);
    assert!(ok);
    assert!(
        stdout.contains("bucket weir_plugins") && stdout.contains("served by 2 of 2 hosts"),
        "{stdout}"
    );
    let (ok, _, stderr) = plugins(&["rollback", "tally"]);
    assert!(!ok && stderr.contains("no earlier release"), "{stderr}");

    let (ok, stdout, stderr) = plugins(&["remove", "tally"]);
    assert!(ok, "{stdout}{stderr}");
    for i in 0..2 {
        let wasm = dir.path().join(format!("plugins-{i}/tally.wasm"));
        wait_until(Duration::from_secs(30), "files removed", || async {
            !wasm.exists()
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, stdout, _) = plugins(&["list"]);
    assert!(!stdout.contains("tally"), "removed everywhere: {stdout}");
}
