//! `transfer-bench`: the transfer engine against the tools people use, across emulated links.
//!
//! One emulated pair of network namespaces (`automigrate-netem`: delay, random loss and a rate
//! cap, in user space) carries every run; the source lives in namespace A, the destination in
//! B. For each link (RTT × loss × congestion control), dataset and tool, the harness starts the
//! tool's receiving side in B, starts the clock, runs the sending side in A, stops the clock
//! when the receiving side has everything, then checks every byte against the source. Results
//! go to a JSON-lines file as they are measured, so an interrupted matrix resumes where it
//! stopped; `table` turns that file into the Markdown tables of `docs/transfer.md`.
//!
//! Tools: `adaptive` (this engine, given the link estimate an agent would have), `blind` (this
//! engine with no estimate: RTT from the handshake, loss assumed 0), `single` (this engine,
//! one stream), `tar` (a tar stream over one TCP connection, what `kubectl cp` does, minus the
//! API server), `scp` and `rsync` over ssh (an sshd runs in B with a generated host key).
//!
//! Run it through `controller/transfer/bench/run.sh`, which installs what it needs.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use automigrate_netem::{EmulatedPair, Link, Side};
use clap::Parser as _;
use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;
const ENGINE_PORT: u16 = 7847;
const TAR_PORT: u16 = 9000;
const SSH_PORT: u16 = 2222;

#[derive(Debug, clap::Parser)]
#[command(name = "transfer-bench")]
enum Cli {
    /// Run (part of) the matrix, appending to the results file.
    Run(RunArgs),
    /// Print Markdown tables and goal checks from a results file.
    Table {
        /// JSON-lines results.
        results: PathBuf,
    },
    /// Helper for the tar tool: accept one TCP connection and copy it to stdout.
    PipeListen {
        /// Address to listen on.
        addr: SocketAddr,
    },
    /// Helper for the tar tool: copy stdin to one TCP connection.
    PipeSend {
        /// Address to connect to.
        addr: SocketAddr,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Working directory: datasets, destination, keys, results.
    #[arg(long, default_value = "/var/tmp/automigrate-bench")]
    work: PathBuf,
    /// Round-trip times.
    #[arg(long, value_delimiter = ',', default_value = "10ms,20ms,30ms,70ms", value_parser = humantime::parse_duration)]
    rtt: Vec<Duration>,
    /// Loss probabilities (each direction).
    #[arg(long, value_delimiter = ',', default_value = "0,0.001")]
    loss: Vec<f64>,
    /// Congestion control algorithms.
    #[arg(long, value_delimiter = ',', default_value = "cubic,bbr")]
    cc: Vec<String>,
    /// Datasets: large (4 × 64 MiB), medium (64 × 4 MiB), small (600 × 432 KiB).
    #[arg(long, value_delimiter = ',', default_value = "large,medium,small")]
    datasets: Vec<String>,
    /// Tools: adaptive, blind, single, tar, scp, rsync.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "adaptive,blind,single,tar,scp,rsync"
    )]
    tools: Vec<String>,
    /// Link rate cap, bits per second.
    #[arg(long, default_value_t = 200_000_000)]
    rate_bps: u64,
    /// Give up on one run after this long (recorded as a timeout: a lower bound on its time).
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Chunk size for this engine.
    #[arg(long, default_value = "2MiB")]
    chunk_size: String,
    /// Stream ceiling for this engine.
    #[arg(long, default_value_t = 64)]
    max_streams: u32,
    /// Repetitions of each cell.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Results file (JSON lines); cells already in it are skipped.
    #[arg(long)]
    out: PathBuf,
}

/// One measured run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    rtt_ms: u64,
    loss: f64,
    cc: String,
    rate_bps: u64,
    dataset: String,
    tool: String,
    repeat: u32,
    /// Seconds from starting the sender to the receiver having everything; for a timeout, the
    /// limit (a lower bound).
    secs: f64,
    /// `secs` plus a `sync` of the destination filesystem afterwards (this engine already
    /// syncs before it reports; the other tools do not).
    secs_synced: f64,
    bytes: u64,
    mbps: f64,
    ok: bool,
    timed_out: bool,
    error: Option<String>,
    /// This engine only: most streams open at once, connections, rounds.
    streams_max: Option<u32>,
    connections: Option<u64>,
    stream_counts: Option<Vec<u32>>,
    /// This engine only: the measured rounds (seconds into the run, streams, Mbit/s).
    #[serde(default)]
    rounds: Vec<(f64, u32, f64)>,
    /// Packets of the data direction dropped by the emulated bottleneck queue and at random.
    #[serde(default)]
    dropped_queue: u64,
    #[serde(default)]
    dropped_loss: u64,
    /// For a timed-out run: bytes that had landed at the destination (staging included), so
    /// its rate can be estimated.
    #[serde(default)]
    partial_bytes: u64,
}

impl Record {
    fn key(&self) -> (u64, String, String, String, String, u32) {
        (
            self.rtt_ms,
            format!("{}", self.loss),
            self.cc.clone(),
            self.dataset.clone(),
            self.tool.clone(),
            self.repeat,
        )
    }
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::Run(args) => run(&args),
        Cli::Table { results } => table(&results),
        Cli::PipeListen { addr } => pipe_listen(addr),
        Cli::PipeSend { addr } => pipe_send(addr),
    }
}

fn pipe_listen(addr: SocketAddr) -> Result<()> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    eprintln!("listening on {addr}");
    let (mut stream, _) = listener.accept()?;
    let mut stdout = std::io::stdout().lock();
    std::io::copy(&mut stream, &mut stdout)?;
    stdout.flush()?;
    Ok(())
}

fn pipe_send(addr: SocketAddr) -> Result<()> {
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    let mut stdin = std::io::stdin().lock();
    std::io::copy(&mut stdin, &mut stream)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    // Wait for the other side to close, so every byte was read before we exit.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok(())
}

/// The three dataset shapes, scaled from the seed paper's Table IV.
fn dataset_shape(name: &str) -> Result<(usize, u64)> {
    Ok(match name {
        "large" => (4, 64 * MIB),
        "medium" => (64, 4 * MIB),
        "small" => (600, 432 * 1024),
        other => bail!("unknown dataset `{other}` (large, medium, small)"),
    })
}

/// Writes a dataset once (incompressible bytes from the BLAKE3 output stream).
fn ensure_dataset(work: &Path, name: &str) -> Result<PathBuf> {
    let (count, size) = dataset_shape(name)?;
    let dir = work.join("data").join(name);
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut buffer = vec![0_u8; MIB as usize];
    for index in 0..count {
        let mut key = [0_u8; 32];
        key[..8].copy_from_slice(&(index as u64).to_le_bytes());
        key[8..8 + name.len().min(24)].copy_from_slice(&name.as_bytes()[..name.len().min(24)]);
        let mut stream = blake3::Hasher::new_keyed(&key).finalize_xof();
        let mut file = std::fs::File::create(dir.join(format!("{name}-{index:04}.bin")))?;
        let mut left = size;
        while left > 0 {
            let take = left.min(MIB) as usize;
            stream.fill(&mut buffer[..take]);
            file.write_all(&buffer[..take])?;
            left -= take as u64;
        }
    }
    std::fs::write(&done, b"")?;
    Ok(dir)
}

/// (relative path, BLAKE3) of every regular file under `root`, marker files excluded.
fn digest(root: &Path) -> Result<BTreeMap<String, [u8; 32]>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            let name = entry.file_name();
            if name == ".complete" || name == ".automigrate-staging" {
                continue;
            }
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let mut hasher = blake3::Hasher::new();
                hasher.update_reader(std::fs::File::open(&path)?)?;
                let relative = path.strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(relative, *hasher.finalize().as_bytes());
            }
        }
    }
    Ok(out)
}

/// Bytes of every regular file under `root`.
fn landed_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    total += entry.metadata().map_or(0, |metadata| metadata.len());
                }
                _ => {}
            }
        }
    }
    total
}

fn sync_all() {
    let _ = Command::new("sync").status();
}

/// A child in its own process group, so a timeout can stop the whole pipeline it started.
fn spawn_group(mut command: Command) -> Result<Child> {
    use std::os::unix::process::CommandExt as _;
    command.process_group(0);
    command
        .spawn()
        .with_context(|| format!("starting {command:?}"))
}

fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

/// Waits for `child` until `deadline`; `None` on timeout (the group is killed).
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            kill_group(child);
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads the child's stderr until a line containing `marker` (the receiving side is ready).
fn wait_ready(child: &mut Child, marker: &str, limit: Duration) -> Result<()> {
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stderr);
        let mut line = String::new();
        let mut sent = false;
        while reader.read_line(&mut line).is_ok_and(|read| read > 0) {
            if !sent && line.contains(&marker) {
                let _ = tx.send(());
                sent = true;
            } else if sent {
                eprint!("    [receiver] {line}");
            }
            line.clear();
        }
    });
    rx.recv_timeout(limit)
        .map_err(|_| anyhow::anyhow!("the receiving side did not get ready"))
}

struct Bench<'a> {
    args: &'a RunArgs,
    pair: EmulatedPair,
    a: Ipv4Addr,
    b: Ipv4Addr,
    cli: PathBuf,
    me: PathBuf,
    pki: PathBuf,
    ssh: PathBuf,
    sshd: Option<Child>,
}

impl Bench<'_> {
    fn in_ns(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        Ok(self.pair.command(side, program)?)
    }

    fn start_sshd(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.ssh)?;
        std::fs::create_dir_all("/run/sshd")?;
        let host_key = self.ssh.join("host_ed25519");
        let client_key = self.ssh.join("client_ed25519");
        for key in [&host_key, &client_key] {
            if !key.exists() {
                let status = Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(key)
                    .status()
                    .context("ssh-keygen (install openssh-client)")?;
                if !status.success() {
                    bail!("ssh-keygen failed");
                }
            }
        }
        std::fs::copy(
            self.ssh.join("client_ed25519.pub"),
            self.ssh.join("authorized_keys"),
        )?;
        let config = self.ssh.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {SSH_PORT}\nListenAddress {}\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 Subsystem sftp internal-sftp\n",
                self.b,
                host_key.display(),
                self.ssh.join("sshd.pid").display(),
                self.ssh.join("authorized_keys").display(),
            ),
        )?;
        let mut command = self.in_ns(Side::B, "/usr/sbin/sshd")?;
        command
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.sshd = Some(spawn_group(command).context("starting sshd (install openssh-server)")?);
        // Ready when a client gets in.
        for _ in 0..100 {
            let mut probe = self.ssh_command()?;
            probe.arg(format!("root@{}", self.b)).arg("true");
            if probe
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("sshd in namespace B did not accept the client key")
    }

    fn ssh_options(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.ssh.join("client_ed25519").display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    fn ssh_command(&self) -> Result<Command> {
        let mut command = self.in_ns(Side::A, "ssh")?;
        command
            .args(self.ssh_options())
            .args(["-p", &SSH_PORT.to_string()]);
        Ok(command)
    }

    fn engine_tls(&self, node: &str) -> Vec<String> {
        vec![
            "--ca".into(),
            self.pki.join("ca.pem").display().to_string(),
            "--cert".into(),
            self.pki.join(format!("{node}.pem")).display().to_string(),
            "--key".into(),
            self.pki
                .join(format!("{node}-key.pem"))
                .display()
                .to_string(),
        ]
    }

    /// Runs one tool once; returns the record (never fails for a tool failure: that is data).
    fn measure(
        &self,
        link: (Duration, f64, &str),
        dataset: &str,
        source: &Path,
        tool: &str,
        repeat: u32,
    ) -> Result<Record> {
        let (rtt, loss, cc) = link;
        let dest_root = self.args.work.join("dest");
        let _ = std::fs::remove_dir_all(&dest_root);
        std::fs::create_dir_all(&dest_root)?;
        sync_all();
        let report_path = self.args.work.join("report.json");
        let _ = std::fs::remove_file(&report_path);
        let deadline_after = self.args.timeout;

        // (receiver, sender, where the files land)
        let (mut receiver, sender_command, landed): (Option<Child>, Command, PathBuf) = match tool {
            "adaptive" | "blind" | "single" => {
                let mut command = self.in_ns(Side::B, &self.cli)?;
                command
                    .args([
                        "receive",
                        "--listen",
                        &format!("{}:{ENGINE_PORT}", self.b),
                        "--dest",
                    ])
                    .arg(&dest_root)
                    .args(self.engine_tls("node-b"))
                    .args(["--congestion", cc, "--exit-after", "1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let mut child = spawn_group(command)?;
                wait_ready(&mut child, "receiving into", Duration::from_secs(20))?;
                let mut send = self.in_ns(Side::A, &self.cli)?;
                send.args([
                    "send",
                    "--to",
                    &format!("{}:{ENGINE_PORT}", self.b),
                    "--server-name",
                    "node-b",
                ])
                .args(self.engine_tls("node-a"))
                .args(["--congestion", cc, "--quiet", "--target", "run"])
                .args(["--chunk-size", &self.args.chunk_size])
                .args(["--max-streams", &self.args.max_streams.to_string()])
                .arg("--report")
                .arg(&report_path);
                match tool {
                    "adaptive" => {
                        send.args(["--rtt", &format!("{}ms", rtt.as_millis())])
                            .args(["--bandwidth", &format!("{}bit/s", self.args.rate_bps)])
                            .args(["--loss", &format!("{loss}")]);
                    }
                    "single" => {
                        send.args(["--strategy", "single"]);
                    }
                    _ => {}
                }
                send.arg(source);
                (Some(child), send, dest_root.join("run"))
            }
            "tar" => {
                let mut command = self.in_ns(Side::B, "sh")?;
                command
                    .arg("-c")
                    .arg(format!(
                        "'{}' pipe-listen {}:{TAR_PORT} | tar -x -C '{}'",
                        self.me.display(),
                        self.b,
                        dest_root.display()
                    ))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let mut child = spawn_group(command)?;
                wait_ready(&mut child, "listening on", Duration::from_secs(20))?;
                let mut send = self.in_ns(Side::A, "sh")?;
                send.arg("-c").arg(format!(
                    "tar -c -C '{}' . | '{}' pipe-send {}:{TAR_PORT}",
                    source.display(),
                    self.me.display(),
                    self.b
                ));
                (Some(child), send, dest_root.clone())
            }
            "scp" => {
                let mut send = self.in_ns(Side::A, "scp")?;
                send.args(["-q", "-r", "-P", &SSH_PORT.to_string()])
                    .args(self.ssh_options())
                    .arg(source)
                    .arg(format!("root@{}:{}/", self.b, dest_root.display()));
                (None, send, dest_root.join(dataset))
            }
            "rsync" => {
                let mut send = self.in_ns(Side::A, "rsync")?;
                send.args(["-a", "-e"])
                    .arg(format!(
                        "ssh -p {SSH_PORT} {}",
                        self.ssh_options().join(" ")
                    ))
                    .arg(format!("{}/", source.display()))
                    .arg(format!(
                        "root@{}:{}/",
                        self.b,
                        dest_root.join(dataset).display()
                    ));
                (None, send, dest_root.join(dataset))
            }
            other => bail!("unknown tool `{other}`"),
        };

        let mut sender_command = sender_command;
        sender_command.stdout(Stdio::null()).stderr(Stdio::piped());
        let started = Instant::now();
        let deadline = started + deadline_after;
        let link_before = self.pair.stats(Side::A)?;
        let mut sender = spawn_group(sender_command)?;
        let sender_status = wait_until(&mut sender, deadline)?;
        let receiver_status = match receiver.as_mut() {
            Some(child) => wait_until(child, deadline)?,
            None => sender_status,
        };
        let secs = started.elapsed().as_secs_f64();
        let link_after = self.pair.stats(Side::A)?;
        sync_all();
        let secs_synced = started.elapsed().as_secs_f64();
        let mut sender_stderr = String::new();
        if let Some(mut stderr) = sender.stderr.take() {
            let _ = stderr.read_to_string(&mut sender_stderr);
        }
        let logs = self.args.work.join("logs");
        let _ = std::fs::create_dir_all(&logs);
        let _ = std::fs::write(
            logs.join(format!(
                "{cc}-{loss}-{}ms-{dataset}-{tool}-{repeat}.log",
                rtt.as_millis()
            )),
            &sender_stderr,
        );
        if let Some(child) = receiver.as_mut()
            && child.try_wait()?.is_none()
        {
            kill_group(child);
        }
        let timed_out = sender_status.is_none() || receiver_status.is_none();
        let partial_bytes = if timed_out {
            landed_bytes(&dest_root)
        } else {
            0
        };
        let exited_ok = sender_status.is_some_and(|s| s.success())
            && receiver_status.is_some_and(|s| s.success());

        let (bytes, verified) = if timed_out || !exited_ok {
            (0, Err(anyhow::anyhow!("did not finish")))
        } else {
            let expected = digest(source)?;
            let got = digest(&landed).unwrap_or_default();
            let bytes = dataset_shape(dataset).map(|(count, size)| count as u64 * size)?;
            if got == expected {
                (bytes, Ok(()))
            } else {
                (
                    bytes,
                    Err(anyhow::anyhow!(
                        "{} of {} files match",
                        got.iter()
                            .filter(|(k, v)| expected.get(*k) == Some(v))
                            .count(),
                        expected.len()
                    )),
                )
            }
        };
        let report_json = std::fs::read_to_string(&report_path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        let rounds = report_json
            .as_ref()
            .and_then(|report| report["rounds"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|round| {
                (
                    round["at_secs"].as_f64().unwrap_or(0.0),
                    round["streams"].as_u64().unwrap_or(0) as u32,
                    round["bps"].as_f64().unwrap_or(0.0) / 1e6,
                )
            })
            .collect();
        let (streams_max, connections, stream_counts) = report_json
            .map(|report| {
                (
                    report["max_streams_used"].as_u64().map(|v| v as u32),
                    report["connections"].as_u64(),
                    report["rounds"].as_array().map(|rounds| {
                        rounds
                            .iter()
                            .filter_map(|round| round["streams"].as_u64().map(|v| v as u32))
                            .collect()
                    }),
                )
            })
            .unwrap_or((None, None, None));
        let ok = verified.is_ok();
        let error = match (&verified, timed_out) {
            (_, true) => Some(format!("timed out after {:?}", self.args.timeout)),
            (Err(error), false) => Some(format!(
                "{error}; sender said: {}",
                sender_stderr.trim().chars().take(300).collect::<String>()
            )),
            _ => None,
        };
        let record = Record {
            rtt_ms: rtt.as_millis() as u64,
            loss,
            cc: cc.to_owned(),
            rate_bps: self.args.rate_bps,
            dataset: dataset.to_owned(),
            tool: tool.to_owned(),
            repeat,
            secs,
            secs_synced,
            bytes,
            mbps: if ok {
                bytes as f64 * 8.0 / secs / 1e6
            } else {
                0.0
            },
            ok,
            timed_out,
            error,
            streams_max,
            connections,
            stream_counts,
            rounds,
            dropped_queue: link_after
                .dropped_queue
                .saturating_sub(link_before.dropped_queue),
            dropped_loss: link_after
                .dropped_loss
                .saturating_sub(link_before.dropped_loss),
            partial_bytes,
        };
        let _ = std::fs::remove_dir_all(&dest_root);
        Ok(record)
    }
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        if let Some(child) = self.sshd.as_mut() {
            kill_group(child);
        }
    }
}

fn run(args: &RunArgs) -> Result<()> {
    if let Some(missing) = automigrate_netem::missing_prerequisites() {
        bail!("the benchmark needs {missing}");
    }
    std::fs::create_dir_all(&args.work)?;
    let me = std::env::current_exe()?;
    let cli = me.with_file_name("transfer-cli");
    if !cli.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p automigrate-transfer --example transfer-cli`",
            cli.display()
        );
    }
    let pki = args.work.join("pki");
    if !pki.join("ca.pem").exists() {
        automigrate_transfer::devcerts::write_dev_pki(
            &pki,
            &["node-a".into(), "node-b".into()],
            &[],
            30,
        )?;
    }
    let mut done: HashSet<(u64, String, String, String, String, u32)> = HashSet::new();
    if let Ok(text) = std::fs::read_to_string(&args.out) {
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            if let Ok(record) = serde_json::from_str::<Record>(line) {
                done.insert(record.key());
            }
        }
    }
    let mut sources = BTreeMap::new();
    for dataset in &args.datasets {
        eprintln!("dataset {dataset}: preparing");
        sources.insert(dataset.clone(), ensure_dataset(&args.work, dataset)?);
    }

    let pair = EmulatedPair::symmetric("amxbench", Link::ideal())?;
    let (a, b) = (pair.addr(Side::A), pair.addr(Side::B));
    let mut bench = Bench {
        args,
        pair,
        a,
        b,
        cli,
        me: me.clone(),
        pki,
        ssh: args.work.join("ssh"),
        sshd: None,
    };
    if args
        .tools
        .iter()
        .any(|tool| tool == "scp" || tool == "rsync")
    {
        bench.start_sshd()?;
    }
    eprintln!("emulated pair: A {} -> B {}", bench.a, bench.b);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)?;
    let mut seed = 1_u64;
    for cc in &args.cc {
        // tar, scp and rsync cannot choose per socket, so the namespaces' default must be the
        // algorithm, and a namespace may only default to one the host allows: add it there.
        automigrate_netem::allow_congestion_control_host_wide(cc)?;
        bench.pair.set_congestion_control(Side::A, cc)?;
        bench.pair.set_congestion_control(Side::B, cc)?;
        for &loss in &args.loss {
            for &rtt in &args.rtt {
                for dataset in &args.datasets {
                    for tool in &args.tools {
                        for repeat in 0..args.repeat {
                            let key = (
                                rtt.as_millis() as u64,
                                format!("{loss}"),
                                cc.clone(),
                                dataset.clone(),
                                tool.clone(),
                                repeat,
                            );
                            if done.contains(&key) {
                                continue;
                            }
                            // A fresh loss pattern per run, the same for every tool at a given
                            // position in the matrix.
                            seed += 1;
                            let link = Link::delayed(rtt / 2)
                                .with_loss(loss)
                                .with_rate_bps(args.rate_bps)
                                .with_seed(seed);
                            bench.pair.set_link(Side::A, link)?;
                            bench
                                .pair
                                .set_link(Side::B, link.with_seed(seed ^ 0xffff))?;
                            eprint!("{cc} loss {loss} rtt {rtt:?} {dataset} {tool} #{repeat}: ");
                            let record = bench.measure(
                                (rtt, loss, cc),
                                dataset,
                                &sources[dataset],
                                tool,
                                repeat,
                            )?;
                            eprintln!(
                                "{:.2} s ({:.1} Mbit/s){}{}",
                                record.secs,
                                record.mbps,
                                record
                                    .streams_max
                                    .map(|s| format!(", up to {s} streams"))
                                    .unwrap_or_default(),
                                record
                                    .error
                                    .as_deref()
                                    .map(|e| format!(" ERROR {e}"))
                                    .unwrap_or_default()
                            );
                            writeln!(out, "{}", serde_json::to_string(&record)?)?;
                            out.flush()?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Median of the successful runs of a cell, or the timeout bound.
fn cell(records: &[&Record]) -> Option<(f64, bool, Option<u32>)> {
    let mut good: Vec<f64> = records.iter().filter(|r| r.ok).map(|r| r.secs).collect();
    let streams = records.iter().filter_map(|r| r.streams_max).max();
    if good.is_empty() {
        return records
            .iter()
            .find(|r| r.timed_out)
            .map(|r| (r.secs, true, streams));
    }
    good.sort_by(f64::total_cmp);
    Some((good[good.len() / 2], false, streams))
}

fn table(results: &Path) -> Result<()> {
    let text = std::fs::read_to_string(results)?;
    let records: Vec<Record> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let tools = ["adaptive", "blind", "single", "tar", "scp", "rsync"];
    let mut links: Vec<(String, String, u64)> = records
        .iter()
        .map(|r| (r.cc.clone(), format!("{}", r.loss), r.rtt_ms))
        .collect();
    links.sort();
    links.dedup();
    let datasets = ["large", "medium", "small"];
    println!(
        "Times in seconds (median of the runs), throughput in Mbit/s; `>N` = timed out at N s; adaptive/blind show the most streams used.\n"
    );
    let mut current: Option<(String, String)> = None;
    for (cc, loss, rtt) in &links {
        if current.as_ref() != Some(&(cc.clone(), loss.clone())) {
            let loss_pct = loss.parse::<f64>().unwrap_or(0.0) * 100.0;
            println!("\n#### {cc}, loss {loss_pct}% each way\n");
            print!("| RTT | dataset |");
            for tool in tools {
                print!(" {tool} |");
            }
            println!();
            print!("|---|---|");
            for _ in tools {
                print!("---|");
            }
            println!();
            current = Some((cc.clone(), loss.clone()));
        }
        for dataset in datasets {
            let row: Vec<&Record> = records
                .iter()
                .filter(|r| {
                    &r.cc == cc
                        && format!("{}", r.loss) == *loss
                        && r.rtt_ms == *rtt
                        && r.dataset == dataset
                })
                .collect();
            if row.is_empty() {
                continue;
            }
            print!("| {rtt} ms | {dataset} |");
            for tool in tools {
                let of_tool: Vec<&Record> =
                    row.iter().copied().filter(|r| r.tool == tool).collect();
                match cell(&of_tool) {
                    None => print!(" – |"),
                    Some((secs, true, _)) => {
                        let partial = of_tool.iter().map(|r| r.partial_bytes).max().unwrap_or(0);
                        if partial > 0 {
                            print!(" >{secs:.0} s, ~{:.0} |", partial as f64 * 8.0 / secs / 1e6);
                        } else {
                            print!(" >{secs:.0} |");
                        }
                    }
                    Some((secs, false, streams)) => {
                        let bytes = of_tool.iter().find(|r| r.ok).map_or(0, |r| r.bytes);
                        let mbps = bytes as f64 * 8.0 / secs / 1e6;
                        match streams {
                            Some(streams) if tool != "single" => {
                                print!(" {secs:.1} s, {mbps:.0} ({streams} str.) |")
                            }
                            _ => print!(" {secs:.1} s, {mbps:.0} |"),
                        }
                    }
                }
            }
            println!();
        }
    }

    println!("\n#### Goals\n");
    for (cc, loss, rtt) in &links {
        let get = |dataset: &str, tool: &str| {
            let of: Vec<&Record> = records
                .iter()
                .filter(|r| {
                    &r.cc == cc
                        && format!("{}", r.loss) == *loss
                        && r.rtt_ms == *rtt
                        && r.dataset == dataset
                        && r.tool == tool
                })
                .collect();
            cell(&of)
        };
        if let Some((ours, false, _)) = get("small", "adaptive") {
            let peers: Vec<(String, f64)> = ["tar", "scp", "rsync"]
                .iter()
                .filter_map(|tool| {
                    get("small", tool).map(|(secs, _, _)| ((*tool).to_owned(), secs))
                })
                .collect();
            if let Some((best_tool, best)) =
                peers.iter().cloned().min_by(|x, y| x.1.total_cmp(&y.1))
            {
                let ratio = ours / best;
                println!(
                    "- small, {cc}, loss {loss}, {rtt} ms: adaptive {ours:.2} s vs best peer {best_tool} {best:.2} s = {ratio:.3}× (goal ≤ 1.05×): {}",
                    if ratio <= 1.05 { "met" } else { "MISSED" }
                );
            }
        }
        if *rtt == 70
            && loss == "0.001"
            && let Some((ours, false, _)) = get("large", "adaptive")
        {
            let bytes = 4.0 * 64.0 * MIB as f64;
            let rate = records
                .iter()
                .find(|r| &r.cc == cc)
                .map_or(200e6, |r| r.rate_bps as f64);
            let share = bytes * 8.0 / ours / rate;
            println!(
                "- large, {cc}, 70 ms, 0.1 %: adaptive reaches {:.1} % of the link rate (goal ≥ 90 %): {}",
                share * 100.0,
                if share >= 0.9 { "met" } else { "MISSED" }
            );
            for tool in ["single", "tar", "scp", "rsync"] {
                if let Some((theirs, timed_out, _)) = get("large", tool) {
                    let factor = theirs / ours;
                    println!(
                        "  - vs {tool}: {}{factor:.1}× faster (goal ≥ 10×): {}",
                        if timed_out { "more than " } else { "" },
                        if factor >= 10.0 {
                            "met"
                        } else if timed_out {
                            "at least this"
                        } else {
                            "MISSED"
                        }
                    );
                }
            }
        }
    }
    Ok(())
}
