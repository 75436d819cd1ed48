//! The private nats-servers that `weir dev`, the demo and these tests start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use async_nats::jetstream::stream;
use weir::dev::{NatsCluster, NatsServer};

/// A port someone else holds is not mistaken for the server's own: the
/// start fails with the server's reason instead of passing for started
/// (the port answers, but not this server), and the free-port start moves
/// on to a port of its own.
#[test]
fn a_server_whose_port_is_taken_does_not_pass_for_started() {
    let dir = tempfile::tempdir().unwrap();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let error = NatsServer::start(&dir.path().join("taken"), port)
        .err()
        .expect("a start on a taken port fails");
    assert!(format!("{error:#}").contains("exited"), "{error:#}");

    let mut server = NatsServer::start_on_free_port(&dir.path().join("free"), "").unwrap();
    assert_ne!(server.port(), port);
    assert!(server.is_running());
    drop(squatter);
}

/// `weir dev --cluster`'s cluster: the first node on the port asked for,
/// and a restart in the same directory finds what the last run stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_cluster_takes_the_first_port_and_keeps_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    let first = weir::dev::free_port().unwrap();
    let cluster = NatsCluster::start_kept(dir.path(), Some(first), 3).unwrap();
    assert_eq!(cluster.nodes[0].port(), first);
    let js = cluster_context(&cluster.nodes[0].url()).await;
    wait_for(|| async {
        js.get_or_create_stream(stream::Config {
            name: "KEPT".into(),
            subjects: vec!["kept.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .is_ok()
    })
    .await;
    js.publish("kept.one", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    drop(cluster);

    let cluster = NatsCluster::start_kept(dir.path(), None, 3).unwrap();
    let js = cluster_context(&cluster.nodes[0].url()).await;
    let started = std::time::Instant::now();
    let messages = loop {
        if let Ok(mut kept) = js.get_stream("KEPT").await
            && let Ok(info) = kept.info().await
        {
            break info.state.messages;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the restarted cluster never served KEPT"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert_eq!(messages, 1);
}

async fn cluster_context(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url).await.unwrap();
    async_nats::jetstream::new(client)
}

/// Until `ready` holds, for at most a minute: a new cluster elects its
/// leaders a moment after its nodes are up.
async fn wait_for<F: std::future::Future<Output = bool>>(mut ready: impl FnMut() -> F) {
    let started = std::time::Instant::now();
    while !ready().await {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the cluster never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
