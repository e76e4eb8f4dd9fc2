//! Shared by the integration tests: a development PKI, agents on loopback with the fake (or a
//! real) checkpoint backend, polling.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_agent::AgentClient;
use automigrate_agent::agent::{Agent, AgentOptions};
use automigrate_agent::checkpointer::Checkpointer;
use automigrate_agent::checkpointer::testing::{FakeBackend, fake};
use automigrate_agent::metrics::AgentMetrics;
use automigrate_agent::prober::{Latencies, ProbeOptions};
use automigrate_agent::server::{Listeners, RunningAgent, ServeOptions};
use automigrate_transfer::TlsConfig;
use automigrate_transfer::devcerts::DevCa;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A CA; node identities are made per agent.
pub struct Pki {
    ca: DevCa,
}

impl Pki {
    pub fn new() -> Self {
        Self {
            ca: DevCa::generate("agent test CA", 2).unwrap(),
        }
    }

    /// The CA, a certificate for `node` and its key as PEM files in `dir`, for the binary.
    pub fn write_identity(&self, node: &str, dir: &Path) -> [PathBuf; 3] {
        let cert = self
            .ca
            .node(node, &["127.0.0.1".into(), "localhost".into()], 2)
            .unwrap();
        let paths = [
            dir.join("ca.pem"),
            dir.join(format!("{node}.pem")),
            dir.join(format!("{node}-key.pem")),
        ];
        for (path, pem) in paths
            .iter()
            .zip([self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem])
        {
            std::fs::write(path, pem).unwrap();
        }
        paths
    }

    pub fn identity(&self, node: &str) -> TlsConfig {
        let cert = self
            .ca
            .node(node, &["127.0.0.1".into(), "localhost".into()], 2)
            .unwrap();
        TlsConfig::from_pem(
            self.ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )
        .unwrap()
    }
}

/// Adjusts a test agent's options before it starts.
pub type Tune = Box<dyn FnOnce(&mut AgentOptions, &mut ServeOptions)>;

/// What to change from the defaults of a test agent.
pub struct Setup {
    pub token: Option<String>,
    pub fake: FakeBackend,
    pub checkpointer: Option<Arc<dyn Checkpointer>>,
    pub tune: Tune,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            token: Some(TOKEN.to_string()),
            fake: FakeBackend::default(),
            checkpointer: None,
            tune: Box::new(|_, _| {}),
        }
    }
}

pub struct TestAgent {
    pub node: String,
    pub running: Option<RunningAgent>,
    pub client: AgentClient,
    pub fake: Option<Arc<FakeBackend>>,
    pub dir: tempfile::TempDir,
    pub base_url: String,
    pub transfer_addr: std::net::SocketAddr,
}

impl TestAgent {
    pub fn agent(&self) -> &Agent {
        &self.running.as_ref().unwrap().agent
    }

    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn store_root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn peer(&self) -> automigrate_agent::api::Peer {
        automigrate_agent::api::Peer {
            node: self.node.clone(),
            address: self.transfer_addr.to_string(),
        }
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // A test that failed half-way: the runtime ends and takes the tasks with it.
        let _ = self.running.take();
    }
}

pub async fn start_agent(pki: &Pki, node: &str, setup: Setup) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    let data_root = dir.path().join("data");
    let store_root = dir.path().join("store");
    let mut options = AgentOptions::new(node, &data_root, &store_root, pki.identity(node));
    let mut serve = ServeOptions::new(&data_root);
    serve.token = setup.token.clone();
    serve.probe = ProbeOptions {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        window: 10,
    };
    serve.ingest_interval = Duration::from_millis(50);
    (setup.tune)(&mut options, &mut serve);
    let (checkpointer, fake_handle) = match setup.checkpointer {
        Some(checkpointer) => (checkpointer, None),
        None => {
            let (checkpointer, handle) = fake(setup.fake);
            (checkpointer, Some(handle))
        }
    };
    let latencies = Latencies::default();
    let agent = Agent::new(
        options,
        checkpointer,
        AgentMetrics::new(),
        latencies.clone(),
    )
    .unwrap();
    let listeners = Listeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let running = RunningAgent::start(agent, listeners, serve, latencies)
        .await
        .unwrap();
    let base_url = running.base_url();
    let transfer_addr = running.transfer_addr;
    let client = AgentClient::new(&base_url, setup.token).unwrap();
    let agent = TestAgent {
        node: node.to_string(),
        running: Some(running),
        client,
        fake: fake_handle,
        dir,
        base_url,
        transfer_addr,
    };
    let client = agent.client.clone();
    wait_until("the agent to be ready", || {
        let client = client.clone();
        async move { client.ready().await.is_ok() }
    })
    .await;
    agent
}

/// Polls until `condition` holds. The limit only guards against a hang; no test asserts on
/// how long it took.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !condition().await {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a transfer to end and returns its last status.
pub async fn finished_transfer(
    client: &AgentClient,
    id: &str,
) -> automigrate_agent::api::TransferStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = client.transfer_status(id).await.unwrap();
        if status.state != automigrate_agent::api::TransferState::Running {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for transfer {id}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn write(root: &Path, relative: &str, data: &[u8]) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

pub const SKIP_VARIABLE: &str = "AUTOMIGRATE_SKIP_PRIVILEGED";

/// True when a privileged test may run. With `AUTOMIGRATE_SKIP_PRIVILEGED=1` it says loudly
/// that it skips; otherwise a missing prerequisite FAILS the test, naming it.
pub fn privileged(test: &str) -> bool {
    use std::io::Write as _;
    use std::process::Command;
    if std::env::var(SKIP_VARIABLE).as_deref() == Ok("1") {
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n************************************************************\n\
             SKIPPED {test}: {SKIP_VARIABLE}=1 is set.\n\
             This test needs root and CRIU >= 4 (criu check passing);\n\
             it did NOT run. CI never sets {SKIP_VARIABLE}.\n\
             ************************************************************\n"
        );
        return false;
    }
    let mut missing = Vec::new();
    let uid = Command::new("id").arg("-u").output();
    if !matches!(&uid, Ok(out) if String::from_utf8_lossy(&out.stdout).trim() == "0") {
        missing.push("root (run the tests as root)".to_string());
    }
    match Command::new("criu").arg("--version").output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let major = text
                .lines()
                .find_map(|line| line.strip_prefix("Version: "))
                .and_then(|version| version.split('.').next())
                .and_then(|major| major.trim().parse::<u32>().ok());
            if major.is_none_or(|major| major < 4) {
                missing.push(format!("criu >= 4 (found: {})", text.trim()));
            } else if !Command::new("criu")
                .arg("check")
                .output()
                .is_ok_and(|out| out.status.success())
            {
                missing.push("a passing `criu check`".to_string());
            }
        }
        Err(error) => missing.push(format!("criu on PATH ({error})")),
    }
    if !Path::new("/usr/bin/python3").exists() {
        missing.push("/usr/bin/python3".to_string());
    }
    assert!(
        missing.is_empty(),
        "{test} cannot run: missing {}.\nInstall them with `sudo scripts/install-node-deps.sh`, \
         or set {SKIP_VARIABLE}=1 to skip privileged tests (loudly).",
        missing.join(", ")
    );
    true
}

/// Bytes per counter record: `TTTTTTTTTT IIIIIIIII\n`.
pub const SLOT: usize = 21;
pub const SLOTS: usize = 200_000;

/// A Python counter that keeps its output file open and writes record `i` (its random run tag
/// and `i`) at offset `21 * i` every 10 ms; the file is preallocated so its size never changes
/// (CRIU checks the size of open files on restore). A restored program keeps its tag.
pub const COUNTER_PY: &str = r#"
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
tag = random.randrange(1, 2_000_000_000)
i = 0
while True:
    i += 1
    os.pwrite(fd, b"%010d %09d\n" % (tag, i), 21 * i)
    time.sleep(0.01)
"#;

/// Written records as (slot, tag, value), in slot order.
pub fn records(log: &Path) -> Vec<(usize, u64, u64)> {
    let bytes = std::fs::read(log).unwrap();
    bytes
        .chunks(SLOT)
        .enumerate()
        .filter(|(_, chunk)| chunk[0] != 0)
        .map(|(slot, chunk)| {
            let text = std::str::from_utf8(chunk).unwrap();
            (
                slot,
                text[..10].parse().unwrap(),
                text[11..20].parse().unwrap(),
            )
        })
        .collect()
}

/// Kills what a test started, even when it fails half-way.
#[derive(Default)]
pub struct KillOnDrop(pub Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .output();
        }
    }
}
