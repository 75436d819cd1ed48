//! Every way the host connects to NATS, against real nats-servers set up
//! for each: a credentials file of a JWT account (operator mode), user and
//! password, token, nkey, TLS with server verification, and mutual TLS.
//! Each works end to end (a JetStream round trip), and each wrong
//! credential stops `weir run` at start-up with a message that says what
//! is wrong. Certificates, nkeys and JWTs are made fresh for every run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use weir::config::HostConfig;
use weir::dev::{NatsServer, free_port};
use weir_integration_tests::weir_binary;

/// A nats-server started with `conf`, in its own directory.
fn server(dir: &Path, conf: &str) -> NatsServer {
    NatsServer::start_on_free_port(&dir.join("nats"), conf).unwrap()
}

/// The `[nats]` part of a host config for `server`, plus `extra` lines.
fn nats_config(server: &NatsServer, extra: &str) -> String {
    format!("[nats]\nurl = \"{}\"\n{extra}\n", server.url())
}

/// Connect as the host does and make a JetStream round trip: a stream
/// created and a message stored, acknowledged by the server.
async fn round_trip(dir: &Path, config: &str) -> anyhow::Result<()> {
    let config = HostConfig::parse(config, dir).map_err(anyhow::Error::msg)?;
    let client = weir::jetstream::connection::connect(&config).await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(jetstream::stream::Config {
        name: "CONN".into(),
        subjects: vec!["conn.>".into()],
        ..Default::default()
    })
    .await?;
    js.publish("conn.test", "hello".into()).await?.await?;
    Ok(())
}

/// `weir run` with `config` must refuse to start: its exit status and
/// what it printed.
fn run_fails(dir: &Path, config: &str) -> String {
    let path = dir.join(format!("weir-{}.toml", free_port().unwrap()));
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    std::fs::write(
        &path,
        format!("{config}\n[plugins]\ndir = \"plugins\"\n[admin]\nenabled = false\n"),
    )
    .unwrap();
    let mut child = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "weir run started with bad credentials");
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return stderr;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("weir run neither started nor failed with bad credentials within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn user_and_password() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        dir.path(),
        "authorization { user: weir, password: s3cret }\n",
    );
    let good = nats_config(&server, "user = \"weir\"\npassword = \"s3cret\"");
    round_trip(dir.path(), &good).await.unwrap();
    let bad = nats_config(&server, "user = \"weir\"\npassword = \"guess\"");
    let stderr = run_fails(dir.path(), &bad);
    assert!(stderr.contains("authorization violation"), "{stderr}");
    assert!(stderr.contains("connecting to NATS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), "authorization { token: t0ken }\n");
    round_trip(dir.path(), &nats_config(&server, "token = \"t0ken\""))
        .await
        .unwrap();
    let stderr = run_fails(dir.path(), &nats_config(&server, "token = \"t0k3n\""));
    assert!(stderr.contains("authorization violation"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nkey() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let server = server(
        dir.path(),
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    );
    let seed_file = |name: &str, key: &nkeys::KeyPair| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{}\n", key.seed().unwrap())).unwrap();
        path
    };
    let good = seed_file("user.nk", &user);
    round_trip(
        dir.path(),
        &nats_config(&server, &format!("nkey-seed-file = {:?}", good)),
    )
    .await
    .unwrap();
    let stranger = seed_file("stranger.nk", &nkeys::KeyPair::new_user());
    let stderr = run_fails(
        dir.path(),
        &nats_config(&server, &format!("nkey-seed-file = {:?}", stranger)),
    );
    assert!(stderr.contains("authorization violation"), "{stderr}");
    let missing = dir.path().join("missing.nk");
    let stderr = run_fails(
        dir.path(),
        &nats_config(&server, &format!("nkey-seed-file = {:?}", missing)),
    );
    assert!(
        stderr.contains("nkey seed") && stderr.contains("missing.nk"),
        "{stderr}"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, and a second CA nobody uses, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_params = || {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
    };
    let ca = CertifiedIssuer::self_signed(ca_params(), KeyPair::generate().unwrap()).unwrap();
    let other = CertifiedIssuer::self_signed(ca_params(), KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["weir-host".into()]);
    Pki {
        ca: write("ca.pem", ca.pem()),
        other_ca: write("other-ca.pem", other.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server-key.pem", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client-key.pem", client_key),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_server_verification() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = server(
        dir.path(),
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?} }}\n",
            pki.server_cert, pki.server_key
        ),
    );
    let tls = |ca: &Path| format!("[nats.tls]\nrequired = true\nca-file = {ca:?}");
    round_trip(dir.path(), &nats_config(&server, &tls(&pki.ca)))
        .await
        .unwrap();
    // A server whose certificate the configured CA did not sign is refused.
    let stderr = run_fails(dir.path(), &nats_config(&server, &tls(&pki.other_ca)));
    assert!(stderr.contains("connecting to NATS"), "{stderr}");
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = server(
        dir.path(),
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n",
            pki.server_cert, pki.server_key, pki.ca
        ),
    );
    let with_client = format!(
        "[nats.tls]\nrequired = true\nca-file = {:?}\ncert-file = {:?}\nkey-file = {:?}",
        pki.ca, pki.client_cert, pki.client_key
    );
    round_trip(dir.path(), &nats_config(&server, &with_client))
        .await
        .unwrap();
    // Without a client certificate the server closes the connection.
    let without = format!("[nats.tls]\nrequired = true\nca-file = {:?}", pki.ca);
    let stderr = run_fails(dir.path(), &nats_config(&server, &without));
    assert!(stderr.contains("connecting to NATS"), "{stderr}");
    assert!(stderr.contains("CertificateRequired"), "{stderr}");
}

/// A JWT for `claims`, signed by `issuer` (the NATS JWT v2 format).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{subject}-{name}"),
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(payload.as_bytes()).unwrap();
    format!("{payload}.{}", b64(&signature))
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_file_with_a_jwt_account() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "weir",
        serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let server = server(
        dir.path(),
        &format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{ {sys}: {system_jwt}, {}: {account_jwt} }}\n",
            account.public_key(),
            sys = system.public_key(),
        ),
    );
    let creds = |name: &str, signer: &nkeys::KeyPair| {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            signer,
            &user.public_key(),
            name,
            serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                               "type": "user", "version": 2}),
        );
        let path = dir.path().join(format!("{name}.creds"));
        std::fs::write(
            &path,
            format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().unwrap()
            ),
        )
        .unwrap();
        path
    };
    let good = creds("weir-host", &account);
    round_trip(
        dir.path(),
        &nats_config(&server, &format!("credentials-file = {good:?}")),
    )
    .await
    .unwrap();
    // A user signed by an account the server does not know.
    let forged = creds("forged", &nkeys::KeyPair::new_account());
    let stderr = run_fails(
        dir.path(),
        &nats_config(&server, &format!("credentials-file = {forged:?}")),
    );
    assert!(stderr.contains("connecting to NATS"), "{stderr}");
    assert!(stderr.contains("authorization violation"), "{stderr}");
}
