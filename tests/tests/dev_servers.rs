//! The private nats-servers that `weir dev`, the demo and these tests start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::time::Duration;

use async_nats::jetstream::stream;
use weir::dev::{NatsCluster, NatsServer};
use weir_integration_tests::{cluster_client, wait_until};

/// A new cluster elects its leaders a moment after its nodes are up.
const WAIT: Duration = Duration::from_secs(60);

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
    let js = cluster_client(&cluster.urls()).await;
    wait_until(WAIT, "an R3 stream on the new cluster", || async {
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
    let js = cluster_client(&cluster.urls()).await;
    wait_until(WAIT, "the restarted cluster serving KEPT", || async {
        match js.get_stream("KEPT").await {
            Ok(mut kept) => kept.info().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let mut kept = js.get_stream("KEPT").await.unwrap();
    assert_eq!(kept.info().await.unwrap().state.messages, 1);
}
