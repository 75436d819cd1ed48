//! Harness for Weir's integration tests: a real nats-server on a free port
//! with a temporary store, the real `weir` binary as a child process, and
//! helpers to publish events and read streams back.
//!
//! Every test builds its own [`TestEnv`]; dropping it kills the server and
//! the hosts and removes the temporary files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test harness fails by panicking

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use weir::dev::NatsServer;

pub mod bench;
pub mod command_line;
pub mod cpu;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `weir` binary, built once per test process so it is never stale.
pub fn weir_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(workspace()).args([
            "build",
            "--quiet",
            "--package",
            "weir",
            "--bin",
            "weir",
        ]);
        // Cargo gives a test the variables of the crate it belongs to. Some
        // build scripts (ring's) rerun when CARGO_MANIFEST_DIR changes, so
        // passing them on rebuilt the TLS stack and the host (20 s) at every
        // switch between `cargo build` and a test run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|prefix| key.starts_with(prefix))
                || key == "CARGO_TARGET_TMPDIR"
            {
                build.env_remove(&*key);
            }
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the weir binary failed");
        // Test binaries live in <target>/<profile>/deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let bin = profile_dir.join("weir");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// A built guest under `dist/` (run `cargo xtask build` first).
pub fn dist(path: &str) -> PathBuf {
    let p = workspace().join("dist").join(path);
    assert!(
        p.exists(),
        "{} does not exist: run `cargo xtask build`",
        p.display()
    );
    p
}

/// A nats-server, a plugin directory and a config file, all temporary.
pub struct TestEnv {
    pub server: NatsServer,
    pub dir: tempfile::TempDir,
    hosts: Vec<WeirProcess>,
}

impl TestEnv {
    /// Start a server; `streams` is `[(name, subjects)]` created by the host's config.
    pub fn new(streams: &[(&str, &[&str])]) -> Self {
        Self::with_config(streams, "", "")
    }

    /// Like [`TestEnv::new`], with extra lines for the config's `[admin]`
    /// and `[telemetry]` tables. The admin endpoint listens on a free port
    /// (see [`WeirProcess::admin_addr`]) and lag is polled every 200 ms.
    pub fn with_config(streams: &[(&str, &[&str])], admin: &str, telemetry: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = NatsServer::start_on_free_port(&dir.path().join("nats"), "").unwrap();
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        let mut config = format!(
            "[nats]\nurl = \"{}\"\n[plugins]\ndir = \"plugins\"\n[runtime]\nshutdown-grace-ms = 5000\nack-wait-ms = 5000\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n[telemetry]\nlag-poll-ms = 200\n{telemetry}\n",
            server.url()
        );
        for (name, subjects) in streams {
            let subjects: Vec<String> = subjects.iter().map(|s| format!("\"{s}\"")).collect();
            config.push_str(&format!(
                "[[streams]]\nname = \"{name}\"\nsubjects = [{}]\n",
                subjects.join(", ")
            ));
        }
        std::fs::write(dir.path().join("weir.toml"), config).unwrap();
        TestEnv {
            server,
            dir,
            hosts: Vec::new(),
        }
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// Add `toml` (whole tables) to the host's config, for hosts started
    /// from now on.
    pub fn append_config(&self, toml: &str) {
        let path = self.config_path();
        let mut config = std::fs::read_to_string(&path).unwrap();
        config.push('\n');
        config.push_str(toml);
        std::fs::write(path, config).unwrap();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("weir.toml")
    }

    /// Copy a built guest into the plugin directory as `name`, with its
    /// manifest passed through `edit`.
    pub fn install(&self, guest: &str, name: &str, edit: impl FnOnce(String) -> String) {
        let wasm = dist(&format!("{guest}.wasm"));
        let manifest = std::fs::read_to_string(wasm.with_extension("toml")).unwrap();
        std::fs::copy(&wasm, self.plugins_dir().join(format!("{name}.wasm"))).unwrap();
        std::fs::write(
            self.plugins_dir().join(format!("{name}.toml")),
            edit(manifest),
        )
        .unwrap();
    }

    /// Deploy `guest` as plugin `name` the way a careful operator does:
    /// manifest first, then the component, each written beside its target
    /// and renamed into place. `tag` makes a distinct version of the same
    /// code (a custom section changes the bytes, not the behaviour).
    pub fn deploy(
        &self,
        guest: &str,
        name: &str,
        tag: Option<&str>,
        edit: impl FnOnce(String) -> String,
    ) {
        let wasm_src = dist(&format!("{guest}.wasm"));
        let manifest = edit(std::fs::read_to_string(wasm_src.with_extension("toml")).unwrap());
        let mut wasm = std::fs::read(&wasm_src).unwrap();
        if let Some(tag) = tag {
            wasm.extend(custom_section("weir-test-version", tag.as_bytes()));
        }
        let dir = self.plugins_dir();
        let tmp = dir.join(format!(".{name}.toml.tmp"));
        std::fs::write(&tmp, manifest).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.toml"))).unwrap();
        let tmp = dir.join(format!(".{name}.wasm.tmp"));
        std::fs::write(&tmp, wasm).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
    }

    /// Start a `weir run` host on this environment and wait until it has
    /// started every plugin it can; returns its index.
    pub fn start_host(&mut self) -> usize {
        let log = self
            .dir
            .path()
            .join(format!("host-{}.log", self.hosts.len()));
        let mut host = WeirProcess::start(&self.config_path(), &log);
        host.wait_ready();
        self.hosts.push(host);
        self.hosts.len() - 1
    }

    /// Start host `i` again (after a kill), with the same log file.
    pub fn restart_host(&mut self, i: usize) {
        let log = self.dir.path().join(format!("host-{i}.log"));
        let mut host = WeirProcess::start(&self.config_path(), &log);
        host.wait_ready_after(self.hosts[i].ready_lines());
        self.hosts[i] = host;
    }

    pub fn host(&mut self, i: usize) -> &mut WeirProcess {
        &mut self.hosts[i]
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.server.url()).await.unwrap()
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }

    /// A counter of `plugin` as host `i` reports it on `/plugins`
    /// (`processed`, `duplicates`, ...), counted since that host
    /// started: unlike outputs, which JetStream deduplicates, these show an
    /// event handled twice.
    pub fn plugin_counter(&mut self, i: usize, plugin: &str, counter: &str) -> u64 {
        let admin = self.host(i).admin_addr();
        let (status, body) = http_get(&admin, "/plugins", None).unwrap();
        assert_eq!(status, 200, "{body}");
        let plugins: serde_json::Value = serde_json::from_str(&body).unwrap();
        plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == plugin)
            .unwrap_or_else(|| panic!("{plugin} is not on /plugins: {body}"))[counter]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {counter} for {plugin}: {body}"))
    }
}

/// A private nats-server for a benchmark binary, and a client of it; logs
/// at `warn` when `WEIR_LOG` is set. Keep the directory alive as long as
/// the server.
pub async fn bench_broker() -> (tempfile::TempDir, NatsServer, async_nats::Client) {
    if std::env::var_os("WEIR_LOG").is_some() {
        let _ = weir::telemetry::subscriber::init("warn", false, None);
    }
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start_on_free_port(&dir.path().join("nats"), "").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    (dir, server, client)
}

/// The HOSTILE stream with a one-second duplicate window, so a re-publish
/// of the same `Nats-Msg-Id` a moment later is stored again and only
/// Weir's done marks can recognise it.
pub async fn hostile_stream_with_short_dedup(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config {
        name: "HOSTILE".into(),
        subjects: vec!["hostile.>".into()],
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The hostile guest's manifest with one delivery: a failure is
/// dead-lettered at once.
pub fn one_delivery(manifest: String) -> String {
    manifest.replace("max-deliveries = 3", "max-deliveries = 1")
}

/// A wasm custom section (id 0): LEB128 size, LEB128 name length, name, data.
pub fn custom_section(name: &str, data: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb128(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut section = vec![0u8];
    leb128(body.len(), &mut section);
    section.extend(body);
    section
}

/// The version id weir gives a component: the first 12 hex digits of its SHA-256.
pub fn version_of(wasm: &[u8]) -> String {
    weir::PluginVersion::of(wasm).to_string()
}

/// A `weir run` child process; killed on drop.
pub struct WeirProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl WeirProcess {
    pub fn start(config: &Path, log: &Path) -> Self {
        Self::start_with(
            &["run".as_ref(), "--config".as_ref(), config.as_os_str()],
            log,
        )
    }

    /// Run `weir` with `args`, logging to `log`.
    pub fn start_with(args: &[&std::ffi::OsStr], log: &Path) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(weir_binary())
            .args(args)
            .env("WEIR_LOG", "info,weir=debug")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        WeirProcess {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// Wait for the host's "weir is running" line: every plugin that can
    /// start has its consumer by then.
    pub fn wait_ready(&mut self) {
        self.wait_ready_after(0);
    }

    /// How many times this host's log says it became ready.
    pub fn ready_lines(&self) -> usize {
        self.log_text().matches("weir is running").count()
    }

    /// Wait until the log has more than `before` ready lines (a restarted
    /// host appends to the log of the one it replaces).
    pub fn wait_ready_after(&mut self, before: usize) {
        self.wait_for_log("weir is running", before + 1);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Ask for a graceful shutdown and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("host running");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "host did not exit within 30s of SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait until the log contains `needle` at least `times` times.
    pub fn wait_for_log(&mut self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log_text().matches(needle).count() < times {
            assert!(self.is_running(), "host exited; log:\n{}", self.log_text());
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged {times} times within 60s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address the host's admin endpoint bound (the harness asks for a
    /// free port), from its latest start-up log line.
    pub fn admin_addr(&mut self) -> String {
        self.wait_for_log(weir::supervisor::admin::LISTENING, 1);
        addr_in_log(&self.log_text()).unwrap().to_owned()
    }
}

/// The admin address in a host's human-format log, from its latest start.
fn addr_in_log(log: &str) -> Option<&str> {
    log.lines()
        .rev()
        .find(|l| l.contains(weir::supervisor::admin::LISTENING))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
}

/// A plain HTTP/1.1 GET of an admin endpoint: `(status, body)`, or the
/// connection error. Enough for asserting on a few small responses.
pub fn http_get(addr: &str, path: &str, token: Option<&str>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The sum of every series of metric `name` (as exposed, e.g.
/// `weir_events_processed_total`) whose labels include all of `labels`.
pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// An OTLP/HTTP receiver: collects every span exported to `url` as JSON,
/// and every request body with its content type (protobuf ones are kept
/// raw: the tests look for known bytes in them instead of decoding).
pub struct OtlpReceiver {
    pub url: String,
    sink: std::sync::Arc<OtlpSink>,
}

#[derive(Default)]
struct OtlpSink {
    spans: std::sync::Mutex<Vec<serde_json::Value>>,
    requests: std::sync::Mutex<Vec<(String, Vec<u8>)>>,
}

impl OtlpReceiver {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let sink = std::sync::Arc::new(OtlpSink::default());
        let shared = sink.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let sink = shared.clone();
                std::thread::spawn(move || serve_otlp(stream, &sink));
            }
        });
        OtlpReceiver { url, sink }
    }

    /// Every span received so far in JSON requests (OTLP JSON span objects).
    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.sink.spans.lock().unwrap().clone()
    }

    /// Every request so far: its content type and body.
    pub fn requests(&self) -> Vec<(String, Vec<u8>)> {
        self.sink.requests.lock().unwrap().clone()
    }
}

/// Answer OTLP export requests on one keep-alive connection.
fn serve_otlp(stream: std::net::TcpStream, sink: &OtlpSink) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut length = 0usize;
        let mut content_type = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
            if let Some((k, v)) = header.split_once(':')
                && k.eq_ignore_ascii_case("content-type")
            {
                v.trim().clone_into(&mut content_type);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) {
            let mut sink = sink.spans.lock().unwrap();
            for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    sink.extend(scope["spans"].as_array().into_iter().flatten().cloned());
                }
            }
        }
        sink.requests.lock().unwrap().push((content_type, body));
        let reply =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Send `signal` to `pid` with the `kill` command (no `unsafe` libc call).
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Poll `check` until it returns true or `timeout` passes; panics with
/// `what` on timeout.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client of a cluster (`urls` comma-separated, as `NatsCluster::urls`
/// gives them), once it has a JetStream meta leader.
pub async fn cluster_client(urls: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(client);
    wait_until(
        Duration::from_secs(60),
        "a JetStream meta leader",
        || async { js.query_account().await.is_ok() },
    )
    .await;
    js
}

/// Publish `payloads` on `subject`, pipelined, and wait for every PubAck.
/// With `ids`, each message gets `Nats-Msg-Id: <prefix>-<index>`.
pub async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    payloads: &[String],
    id_prefix: Option<&str>,
) {
    for chunk in payloads.chunks(1000).enumerate() {
        let (chunk_index, chunk) = chunk;
        let mut acks = Vec::with_capacity(chunk.len());
        for (i, payload) in chunk.iter().enumerate() {
            let index = chunk_index * 1000 + i;
            let mut publish =
                jetstream::message::PublishMessage::build().payload(payload.clone().into());
            if let Some(prefix) = id_prefix {
                publish = publish.message_id(format!("{prefix}-{index}"));
            }
            acks.push(js.send_publish(subject.to_owned(), publish).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

/// Publish a message with `header_block` sent exactly as given (the
/// `NATS/1.0` line included), over a plain protocol connection: how a
/// producer with a broken client would send malformed headers, which
/// async-nats itself refuses to build. Returns once the server answered a
/// PING after it, so the message has been received.
pub fn publish_raw(url: &str, subject: &str, header_block: &[u8], payload: &[u8]) {
    use std::io::{BufRead, BufReader, Write};
    let addr = url.trim_start_matches("nats://");
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    let mut out = format!(
        "CONNECT {{\"verbose\":false,\"headers\":true,\"protocol\":1}}\r\nHPUB {subject} {} {}\r\n",
        header_block.len(),
        header_block.len() + payload.len()
    )
    .into_bytes();
    out.extend_from_slice(header_block);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    writer.write_all(&out).unwrap();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "server refused: {line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

/// Every message of `stream` whose subject matches `filter`, in order.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Vec<jetstream::Message> {
    let stream = js.get_stream(stream).await.unwrap();
    let config = consumer::pull::Config {
        filter_subject: filter.to_owned(),
        ..Default::default()
    };
    let mut out = Vec::new();
    weir::jetstream::source::read_history(&stream, config, |message| {
        out.push(message);
        Ok(true)
    })
    .await
    .unwrap();
    out
}

/// Number of messages in `stream` on subjects matching `filter`.
pub async fn count(js: &jetstream::Context, stream: &str, filter: &str) -> u64 {
    let stream = js.get_stream(stream).await.unwrap();
    let info = stream.info_with_subjects(filter).await.unwrap();
    let mut total = 0;
    let mut subjects = info;
    while let Some(entry) = subjects.next().await {
        total += entry.unwrap().1 as u64;
    }
    total
}

/// The state of `stream` now: its message count, first and last
/// sequences, subjects.
pub async fn stream_state(js: &jetstream::Context, stream: &str) -> jetstream::stream::State {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone()
}

/// Wait until `plugin`'s consumer on the test guests' stream (`HOSTILE`)
/// has nothing pending or unacknowledged and at least `outputs` messages
/// are on `hostile.out`, the subject the test guest emits on.
pub async fn wait_drained(js: &jetstream::Context, plugin: &str, outputs: u64, timeout: Duration) {
    wait_until(
        timeout,
        &format!("plugin {plugin} to drain with {outputs} outputs"),
        || async {
            count(js, "HOSTILE", "hostile.out").await >= outputs
                && consumer_backlog(js, "HOSTILE", plugin).await == (0, 0)
        },
    )
    .await;
}

/// `(num_pending, num_ack_pending)` of a plugin's durable consumer.
pub async fn consumer_backlog(js: &jetstream::Context, stream: &str, plugin: &str) -> (u64, usize) {
    let stream = js.get_stream(stream).await.unwrap();
    let info = stream
        .consumer_info(weir::jetstream::generation::durable_name(plugin, 0))
        .await
        .unwrap();
    (info.num_pending, info.num_ack_pending)
}

/// The current life of `stream`, which event ids without a `Nats-Msg-Id`
/// name.
pub async fn incarnation(
    js: &jetstream::Context,
    stream: &str,
) -> weir::jetstream::source::Incarnation {
    let mut handle = js.get_stream(stream).await.unwrap();
    let created = handle.info().await.unwrap().created;
    weir::jetstream::source::Incarnation {
        stream: stream.to_owned(),
        created_ns: created.unix_timestamp_nanos(),
        generation: Default::default(),
    }
}

/// Committed `tally.*` counters of a plugin's state bucket.
pub async fn tallies(
    js: &jetstream::Context,
    plugin: &str,
) -> std::collections::BTreeMap<String, u64> {
    let kv = js
        .get_key_value(format!("weir_state_{plugin}"))
        .await
        .unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
    let mut out = std::collections::BTreeMap::new();
    for key in keys.into_iter().filter(|k| k.starts_with("s.tally.")) {
        let value = kv.get(&key).await.unwrap().unwrap();
        out.insert(
            key,
            String::from_utf8(value.to_vec()).unwrap().parse().unwrap(),
        );
    }
    out
}

/// `weir ARGS --config config`, fed `stdin`: (success, stdout, stderr).
pub fn weir_cli(config: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(weir_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("WEIR_CONTROL_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Header value of a message.
pub fn header<'a>(message: &'a jetstream::Message, key: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(key).map(|v| v.as_str())
}

#[cfg(test)]
mod tests {
    #[test]
    fn admin_address_from_the_latest_start() {
        let log = "INFO weir::supervisor::admin: admin endpoint listening addr=127.0.0.1:1\n\
                   INFO weir::supervisor::admin: admin endpoint listening addr=127.0.0.1:2\n";
        assert_eq!(super::addr_in_log(log), Some("127.0.0.1:2"));
        assert_eq!(super::addr_in_log("weir is running"), None);
    }
}
