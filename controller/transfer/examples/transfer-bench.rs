//! `transfer-bench`: the transfer engine against the tools people use, across emulated links.
//!
//! One emulated pair of network namespaces (`automigrate-netem`: delay, random loss and a rate
//! cap, in user space) carries every run; the source lives in namespace A, the destination in
//! B. For each link (RTT × loss × congestion control), dataset and tool, the harness starts the
//! tool's receiving side in B, starts the clock, runs the sending side in A, stops the clock
//! when the receiving side has everything, then checks every byte against the source. Results
//! go to a JSON-lines file as they are measured, so an interrupted matrix resumes where it
//! stopped; `table` turns that file into the Markdown tables of `docs/transfer.md`, and `plot`
//! into its SVG chart. `--scale` shrinks (or grows) the datasets to fit a time budget.
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
    /// Write an SVG chart of the throughputs in a results file.
    Plot {
        /// JSON-lines results.
        results: PathBuf,
        /// SVG file to write.
        #[arg(long)]
        out: PathBuf,
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
    /// Dataset scale, at most 4: 0.5 halves the file count of medium and small and the file
    /// size of large (4 files stay 4), so a whole matrix fits in less time; 2 doubles them.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
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
    /// When the sending process exited (seconds from its start); `secs` also waits for the
    /// receiving side.
    #[serde(default)]
    sender_exit_secs: f64,
    /// This engine only: the sender's own duration, from its report (start of `send` to the
    /// receiver's `Complete` and the streams closed).
    #[serde(default)]
    engine_secs: Option<f64>,
    /// Load average (1 min) of the host just before the run: other work on its 2 cores.
    #[serde(default)]
    load_before: Option<f64>,
    /// Dataset scale (see `--scale`).
    #[serde(default = "full_scale")]
    scale: f64,
}

fn full_scale() -> f64 {
    1.0
}

type Key = (u64, String, String, String, String, u32);

impl Record {
    fn key(&self) -> Key {
        (
            self.rtt_ms,
            format!("{}", self.loss),
            self.cc.clone(),
            dataset_label(&self.dataset, self.scale),
            self.tool.clone(),
            self.repeat,
        )
    }
}

/// `large`, or `large ×0.5` for a scaled one.
fn dataset_label(name: &str, scale: f64) -> String {
    if scale == 1.0 {
        name.to_owned()
    } else {
        format!("{name} ×{scale}")
    }
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::Run(args) => run(&args),
        Cli::Table { results } => table(&results),
        Cli::Plot { results, out } => plot(&results, &out),
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

/// The three dataset shapes, scaled from the seed paper's Table IV, times `scale`.
fn dataset_shape(name: &str, scale: f64) -> Result<(usize, u64)> {
    if !(scale > 0.0 && scale <= 4.0) {
        bail!("--scale must be in (0, 4]");
    }
    let count = |full: f64| ((full * scale).round() as usize).max(1);
    Ok(match name {
        "large" => (4, ((64.0 * scale).round() as u64).max(1) * MIB),
        "medium" => (count(64.0), 4 * MIB),
        "small" => (count(600.0), 432 * 1024),
        other => bail!("unknown dataset `{other}` (large, medium, small)"),
    })
}

/// Writes a dataset once (incompressible bytes from the BLAKE3 output stream).
fn ensure_dataset(work: &Path, name: &str, scale: f64) -> Result<PathBuf> {
    let (count, size) = dataset_shape(name, scale)?;
    let dir = work.join("data").join(if scale == 1.0 {
        name.to_owned()
    } else {
        format!("{name}-x{scale}")
    });
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

/// The 1-minute load average.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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
        // scp -r copies the directory under its own name; rsync is told the same name.
        let source_name = source.file_name().context("dataset directory")?.to_owned();
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
                (None, send, dest_root.join(&source_name))
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
                        dest_root.join(&source_name).display()
                    ));
                (None, send, dest_root.join(&source_name))
            }
            other => bail!("unknown tool `{other}`"),
        };

        let mut sender_command = sender_command;
        sender_command.stdout(Stdio::null()).stderr(Stdio::piped());
        let load_before = load_average();
        let started = Instant::now();
        let deadline = started + deadline_after;
        let link_before = self.pair.stats(Side::A)?;
        let mut sender = spawn_group(sender_command)?;
        let sender_status = wait_until(&mut sender, deadline)?;
        let sender_exit_secs = started.elapsed().as_secs_f64();
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
            let bytes =
                dataset_shape(dataset, self.args.scale).map(|(count, size)| count as u64 * size)?;
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
            .as_ref()
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
            sender_exit_secs,
            engine_secs: report_json
                .as_ref()
                .and_then(|report| report["duration_secs"].as_f64()),
            load_before,
            scale: self.args.scale,
        };
        let _ = std::fs::remove_dir_all(&dest_root);
        Ok(record)
    }
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        if let Some(child) = self.sshd.as_mut() {
            // sshd's per-connection processes start their own sessions: stop them by id too.
            let listener = child.id();
            for session in children_of(listener) {
                let _ = Command::new("kill").arg(session.to_string()).status();
            }
            kill_group(child);
        }
    }
}

/// Processes whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the command name, which is in parentheses.
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
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
    let mut done: HashSet<Key> = HashSet::new();
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
        sources.insert(
            dataset.clone(),
            ensure_dataset(&args.work, dataset, args.scale)?,
        );
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
                                dataset_label(dataset, args.scale),
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

const TOOLS: [&str; 6] = ["adaptive", "blind", "single", "tar", "scp", "rsync"];
const DATASETS: [&str; 3] = ["large", "medium", "small"];

fn load_records(results: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(results)?;
    Ok(text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

/// (cc, loss, rtt) of every link in the records, sorted.
fn links_of(records: &[Record]) -> Vec<(String, String, u64)> {
    let mut links: Vec<(String, String, u64)> = records
        .iter()
        .map(|r| (r.cc.clone(), format!("{}", r.loss), r.rtt_ms))
        .collect();
    links.sort();
    links.dedup();
    links
}

/// (dataset, scale) pairs in the records, in the order large, medium, small, full size first.
fn shapes_of(records: &[Record]) -> Vec<(&'static str, f64)> {
    let mut shapes: Vec<(&'static str, f64)> = Vec::new();
    for dataset in DATASETS {
        let mut scales: Vec<f64> = records
            .iter()
            .filter(|r| r.dataset == dataset)
            .map(|r| r.scale)
            .collect();
        scales.sort_by(|a, b| b.total_cmp(a));
        scales.dedup();
        shapes.extend(scales.into_iter().map(|scale| (dataset, scale)));
    }
    shapes
}

fn of_cell<'a>(
    records: &'a [Record],
    (cc, loss, rtt): (&str, &str, u64),
    (dataset, scale): (&str, f64),
    tool: &str,
) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| {
            r.cc == cc
                && format!("{}", r.loss) == loss
                && r.rtt_ms == rtt
                && r.dataset == dataset
                && r.scale == scale
                && r.tool == tool
        })
        .collect()
}

fn table(results: &Path) -> Result<()> {
    let records = load_records(results)?;
    let links = links_of(&records);
    let shapes = shapes_of(&records);
    println!(
        "Time from starting the sender to the receiver having everything (median of the runs; \
         this engine's time includes its fsyncs and read-back checks), then goodput in Mbit/s. \
         `>N s` = stopped at the N s limit, with the rate of what had landed by then; \
         adaptive/blind: most streams used in brackets; `–` = not run."
    );
    let mut current: Option<(String, String)> = None;
    for (cc, loss, rtt) in &links {
        if current.as_ref() != Some(&(cc.clone(), loss.clone())) {
            let loss_pct = loss.parse::<f64>().unwrap_or(0.0) * 100.0;
            let loads: Vec<f64> = records
                .iter()
                .filter(|r| &r.cc == cc && format!("{}", r.loss) == *loss)
                .filter_map(|r| r.load_before)
                .collect();
            let (low, high) = loads
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &l| (lo.min(l), hi.max(l)));
            println!("\n#### {cc}, loss {loss_pct}% each way\n");
            if !loads.is_empty() {
                println!("Load average (1 min) before the runs: {low:.1} to {high:.1}.\n");
            }
            print!("| RTT | dataset |");
            for tool in TOOLS {
                print!(" {tool} |");
            }
            println!();
            print!("|---|---|");
            for _ in TOOLS {
                print!("---|");
            }
            println!();
            current = Some((cc.clone(), loss.clone()));
        }
        for &(dataset, scale) in &shapes {
            let link = (cc.as_str(), loss.as_str(), *rtt);
            if TOOLS
                .iter()
                .all(|tool| of_cell(&records, link, (dataset, scale), tool).is_empty())
            {
                continue;
            }
            print!("| {rtt} ms | {} |", dataset_label(dataset, scale));
            for tool in TOOLS {
                let of_tool = of_cell(&records, link, (dataset, scale), tool);
                match cell(&of_tool) {
                    None => print!(" – |"),
                    Some((secs, true, _)) => {
                        let partial = of_tool.iter().map(|r| r.partial_bytes).max().unwrap_or(0);
                        print!(" >{secs:.0} s, ~{:.0} |", partial as f64 * 8.0 / secs / 1e6);
                    }
                    Some((secs, false, streams)) => {
                        let bytes = of_tool.iter().find(|r| r.ok).map_or(0, |r| r.bytes);
                        let mbps = bytes as f64 * 8.0 / secs / 1e6;
                        let runs = of_tool.iter().filter(|r| r.ok).count();
                        let runs = if runs > 1 {
                            format!(", {runs} runs")
                        } else {
                            String::new()
                        };
                        match streams {
                            Some(streams) if tool == "adaptive" || tool == "blind" => {
                                print!(" {secs:.1} s, {mbps:.0} ({streams}{runs}) |")
                            }
                            _ => print!(" {secs:.1} s, {mbps:.0}{runs} |"),
                        }
                    }
                }
            }
            println!();
        }
    }

    println!("\n#### Goals\n");
    for (cc, loss, rtt) in &links {
        let link = (cc.as_str(), loss.as_str(), *rtt);
        for &(dataset, scale) in &shapes {
            let get = |tool: &str| cell(&of_cell(&records, link, (dataset, scale), tool));
            let label = dataset_label(dataset, scale);
            if dataset == "small"
                && let Some((ours, false, _)) = get("adaptive")
            {
                let peers: Vec<(&str, f64, bool)> = ["tar", "scp", "rsync"]
                    .into_iter()
                    .filter_map(|tool| {
                        get(tool).map(|(secs, timed_out, _)| (tool, secs, timed_out))
                    })
                    .collect();
                if let Some(&(best_tool, best, timed_out)) =
                    peers.iter().min_by(|x, y| x.1.total_cmp(&y.1))
                {
                    let ratio = ours / best;
                    println!(
                        "- {label}, {cc}, loss {loss}, {rtt} ms: adaptive {ours:.2} s vs best peer {best_tool} {}{best:.2} s = {}{ratio:.3}× (goal ≤ 1.05×): {}",
                        if timed_out { ">" } else { "" },
                        if timed_out { "<" } else { "" },
                        if ratio <= 1.05 { "met" } else { "MISSED" }
                    );
                }
            }
            // The link-rate and 10× goals are set for this one cell only.
            if dataset == "large"
                && scale == 1.0
                && cc == "cubic"
                && *rtt == 70
                && loss == "0.001"
                && let Some((ours, false, _)) = get("adaptive")
            {
                let of = of_cell(&records, link, (dataset, scale), "adaptive");
                let bytes = of.iter().find(|r| r.ok).map_or(0, |r| r.bytes) as f64;
                let rate = of.first().map_or(200e6, |r| r.rate_bps as f64);
                let share = bytes * 8.0 / ours / rate;
                let all: Vec<String> = of
                    .iter()
                    .filter(|r| r.ok)
                    .map(|r| format!("{:.1}", bytes * 8.0 / r.secs / rate * 100.0))
                    .collect();
                println!(
                    "- {label}, {cc}, 70 ms, 0.1 %: adaptive reaches {:.1} % of the link rate (median of {} runs: {} %) (goal ≥ 90 %): {}",
                    share * 100.0,
                    all.len(),
                    all.join(", "),
                    if share >= 0.9 { "met" } else { "MISSED" }
                );
                for tool in ["single", "tar", "scp", "rsync"] {
                    if let Some((theirs, timed_out, _)) = get(tool) {
                        let factor = theirs / ours;
                        println!(
                            "  - vs {tool}: {}{factor:.1}× faster (goal ≥ 10×): {}",
                            if timed_out { "more than " } else { "" },
                            if factor >= 10.0 {
                                "met"
                            } else if timed_out {
                                "not shown (the limit was too short)"
                            } else {
                                "MISSED"
                            }
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Grouped bars of goodput, one panel per congestion control and loss; a run stopped at the
/// time limit is drawn pale at the rate of what had landed by then.
fn plot(results: &Path, out: &Path) -> Result<()> {
    use std::fmt::Write as _;
    let records = load_records(results)?;
    let links = links_of(&records);
    let shapes = shapes_of(&records);
    let mut panels: Vec<(String, String)> = links
        .iter()
        .map(|(cc, loss, _)| (cc.clone(), loss.clone()))
        .collect();
    panels.dedup();
    let colors = [
        "#1b9e77", "#66a61e", "#7570b3", "#d95f02", "#e7298a", "#a6761d",
    ];
    let (bar, gap, left, panel_height, top) = (5.0, 8.0, 60.0, 230.0, 40.0);
    // Groups per panel: every (rtt, shape) with any record in that panel.
    let groups: Vec<Vec<(u64, (&str, f64))>> = panels
        .iter()
        .map(|(cc, loss)| {
            let mut groups = Vec::new();
            for (lcc, lloss, rtt) in &links {
                if lcc != cc || lloss != loss {
                    continue;
                }
                for &shape in &shapes {
                    let link = (cc.as_str(), loss.as_str(), *rtt);
                    if TOOLS
                        .iter()
                        .any(|tool| !of_cell(&records, link, shape, tool).is_empty())
                    {
                        groups.push((*rtt, shape));
                    }
                }
            }
            groups
        })
        .collect();
    let widest = groups.iter().map(Vec::len).max().unwrap_or(1);
    let group_width = bar * TOOLS.len() as f64 + gap;
    // At least as wide as the title and legend.
    let width = (left + widest as f64 * group_width + 20.0).max(560.0);
    let height = top + panels.len() as f64 * (panel_height + 70.0) + 20.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="10">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="16" font-size="13">Goodput over an emulated 200 Mbit/s link (Mbit/s; pale = stopped at the time limit)</text>"#
    );
    for (index, tool) in TOOLS.iter().enumerate() {
        let x = left + index as f64 * 80.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="24" width="10" height="10" fill="{}"/><text x="{}" y="33">{tool}</text>"#,
            colors[index],
            x + 14.0
        );
    }
    let max_mbps = 200.0;
    for (panel_index, ((cc, loss), groups)) in panels.iter().zip(&groups).enumerate() {
        let base = top + 20.0 + panel_index as f64 * (panel_height + 70.0) + panel_height;
        let y = |mbps: f64| base - mbps.min(max_mbps) / max_mbps * panel_height;
        let loss_pct = loss.parse::<f64>().unwrap_or(0.0) * 100.0;
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="{:.1}" font-size="12">{cc}, loss {loss_pct} % each way</text>"#,
            base - panel_height - 6.0
        );
        for tick in [0.0, 50.0, 100.0, 150.0, 200.0] {
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{tick:.0}</text>"##,
                width - 20.0,
                y(tick),
                y(tick),
                left - 4.0,
                y(tick) + 3.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#c00" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#c00" text-anchor="end">90 %</text>"##,
            width - 20.0,
            y(180.0),
            y(180.0),
            width - 20.0,
            y(180.0) - 2.0
        );
        for (group_index, (rtt, shape)) in groups.iter().enumerate() {
            let x0 = left + group_index as f64 * group_width + gap / 2.0;
            let link = (cc.as_str(), loss.as_str(), *rtt);
            for (tool_index, tool) in TOOLS.iter().enumerate() {
                let of = of_cell(&records, link, *shape, tool);
                let Some((secs, timed_out, _)) = cell(&of) else {
                    continue;
                };
                let bytes = if timed_out {
                    of.iter().map(|r| r.partial_bytes).max().unwrap_or(0)
                } else {
                    of.iter().find(|r| r.ok).map_or(0, |r| r.bytes)
                };
                let mbps = bytes as f64 * 8.0 / secs / 1e6;
                let x = x0 + tool_index as f64 * bar;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bar}" height="{:.1}" fill="{}" fill-opacity="{}"><title>{tool} {rtt} ms {}: {}{secs:.1} s, {mbps:.0} Mbit/s</title></rect>"#,
                    y(mbps),
                    base - y(mbps),
                    colors[tool_index],
                    if timed_out { 0.3 } else { 1.0 },
                    dataset_label(shape.0, shape.1),
                    if timed_out { ">" } else { "" }
                );
            }
            let label_x = x0 + bar * TOOLS.len() as f64 / 2.0;
            let letter = match shape.0 {
                "large" => "L",
                "medium" => "M",
                _ => "S",
            };
            let short = match shape.1 {
                1.0 => letter.to_owned(),
                0.5 => format!("{letter}½"),
                scale => format!("{letter}×{scale}"),
            };
            let _ = writeln!(
                svg,
                r##"<text x="{label_x:.1}" y="{:.1}" text-anchor="middle">{short}</text><text x="{label_x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{rtt}</text>"##,
                base + 11.0,
                base + 22.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{left}" y="{:.1}" fill="#555">L/M/S = large/medium/small dataset (½: half size); below: RTT in ms</text>"##,
            base + 36.0
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(out, svg)?;
    Ok(())
}
