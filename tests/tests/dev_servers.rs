//! The private nats-servers that `weir dev`, the demo and these tests start.

use weir::dev::NatsServer;

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
