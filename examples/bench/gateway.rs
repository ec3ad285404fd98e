//! Running the release gateway for a benchmark: settings, start-up on free
//! loopback ports, `/proc` figures of the process, and a clean stop.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::process::{Child, Command};

/// HS256 secret shared by the gateway and the token minter (32+ bytes).
pub const JWT_SECRET: &str = "cellgate-bench-secret-not-for-production-use";
/// Directory cache lifetime given to the gateway: longer than any phase.
const CACHE_TTL_SECS: u64 = 3600;
/// Longest wait for the gateway to become healthy (and ready).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings handed to every `cellgate` command of one gateway.
pub struct GatewayEnv {
    database_url: String,
    data_dir: PathBuf,
    /// Socket.IO and the HTTP API.
    pub listen: SocketAddr,
    /// `/metrics`.
    pub metrics: SocketAddr,
    extra: Vec<(String, String)>,
    serve_args: Vec<String>,
}

impl GatewayEnv {
    /// A development-profile gateway on two free loopback ports.
    pub fn new(database_url: String, data_dir: &Path) -> Result<Self> {
        let [listen, metrics] = free_ports()?;
        Ok(GatewayEnv {
            database_url,
            data_dir: data_dir.to_owned(),
            listen,
            metrics,
            extra: Vec::new(),
            serve_args: Vec::new(),
        })
    }

    /// Adds a `CELLGATE_*` (or other) variable.
    pub fn var(mut self, key: &str, value: &str) -> Self {
        self.extra.push((key.to_string(), value.to_string()));
        self
    }

    /// `serve --profile production`: what a pod runs (no auto-migration,
    /// JSON logs; `RUST_LOG=warn` keeps them nearly empty).
    pub fn production(mut self) -> Self {
        self.serve_args = vec!["--profile".into(), "production".into()];
        self
    }

    /// A `cellgate` command with these settings and nothing from the
    /// caller's environment that would change what is measured.
    pub fn command(&self, binary: &Path) -> Command {
        let mut command = Command::new(binary);
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("CELLGATE_")) {
            command.env_remove(key);
        }
        for key in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ] {
            command.env_remove(key);
        }
        command
            .env("CELLGATE_LISTEN_ADDR", self.listen.to_string())
            .env("CELLGATE_METRICS_ADDR", self.metrics.to_string())
            .env("CELLGATE_DATABASE_URL", &self.database_url)
            .env("CELLGATE_JWT_SECRET", JWT_SECRET)
            .env("CELLGATE_DATA_DIR", &self.data_dir)
            .env(
                "CELLGATE_DIRECTORY_CACHE_TTL_SECS",
                CACHE_TTL_SECS.to_string(),
            )
            // Nothing is connected at the end: no need to wait out a drain.
            .env("CELLGATE_DRAIN_SECS", "1")
            .env("RUST_LOG", "warn")
            .envs(self.extra.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// The Engine.IO WebSocket URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/socket.io/?EIO=4&transport=websocket", self.listen)
    }

    /// `POST /api/v1/events`.
    pub fn events_url(&self) -> String {
        format!("http://{}/api/v1/events", self.listen)
    }

    fn healthz_url(&self) -> String {
        format!("http://{}/healthz", self.listen)
    }

    fn readyz_url(&self) -> String {
        format!("http://{}/readyz", self.listen)
    }

    /// `/metrics` on the metrics port.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics)
    }
}

/// Two distinct free loopback ports (free when asked; the gateway binds
/// them a moment later).
fn free_ports() -> Result<[SocketAddr; 2]> {
    let a = TcpListener::bind("127.0.0.1:0").context("no free port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("no free port")?;
    Ok([a.local_addr()?, b.local_addr()?])
}

/// `cellgate migrate` with these settings.
pub async fn migrate(binary: &Path, env: &GatewayEnv) -> Result<()> {
    let output = env
        .command(binary)
        .arg("migrate")
        .output()
        .await
        .with_context(|| format!("cannot run {}", binary.display()))?;
    ensure!(
        output.status.success(),
        "cellgate migrate failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Checks that the gateway binary exists before anything is set up.
pub fn check_binary(binary: &Path) -> Result<()> {
    ensure!(
        binary.is_file(),
        "no gateway binary at {} (run `cargo build --release --locked --bins --examples` first, or pass --gateway)",
        binary.display()
    );
    Ok(())
}

/// A running `cellgate serve`; killed if dropped without [`Gateway::stop`].
pub struct Gateway {
    child: Child,
    log: PathBuf,
    /// Its process id, for `/proc`.
    pub pid: u32,
}

impl Gateway {
    /// Starts `cellgate serve`; its output goes to a log file in the data
    /// directory.
    pub fn spawn(binary: &Path, env: &GatewayEnv) -> Result<Self> {
        let log = env
            .data_dir
            .join(format!("gateway-{}.log", env.listen.port()));
        let file = File::create(&log).context("cannot create the gateway log")?;
        let child = env
            .command(binary)
            .arg("serve")
            .args(&env.serve_args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().context("the gateway has no pid")?;
        Ok(Gateway { child, log, pid })
    }

    /// Waits for `/healthz` (the process serves).
    pub async fn wait_healthy(&mut self, http: &reqwest::Client, env: &GatewayEnv) -> Result<()> {
        self.wait_for(http, &env.healthz_url()).await
    }

    /// Waits for `/readyz` (directory and, in cluster mode, Redis pub/sub).
    pub async fn wait_ready(&mut self, http: &reqwest::Client, env: &GatewayEnv) -> Result<()> {
        self.wait_for(http, &env.readyz_url()).await
    }

    async fn wait_for(&mut self, http: &reqwest::Client, url: &str) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the gateway exited during start-up ({status}):\n{}",
                    self.log_tail(20)
                );
            }
            let answer = http.get(url).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{url} did not answer 200 within {STARTUP_TIMEOUT:?}")
    }

    /// Fails when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the gateway exited ({status}):\n{}", self.log_tail(20));
        }
        Ok(())
    }

    /// CPU time and memory of the process now.
    pub fn stats(&self) -> Result<ProcStats> {
        ProcStats::read(self.pid)
    }

    /// SIGTERM (graceful), then SIGKILL after ten seconds.
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let graceful = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if !matches!(graceful, Ok(Ok(status)) if status.success()) {
            eprintln!("the gateway did not stop cleanly on SIGTERM: {graceful:?}");
            let _ = self.child.kill().await;
        }
    }

    /// Up to `max` lines of the gateway's log that contain `needle`, and how
    /// many there are in all.
    pub fn log_matching(&self, needle: &str, max: usize) -> (Vec<String>, usize) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        let shown = all.iter().take(max).map(|l| l.to_string()).collect();
        (shown, all.len())
    }

    /// The last lines of the gateway's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// What `/proc/<pid>/stat` and `/proc/<pid>/status` say about a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User plus system CPU time, seconds (10 ms resolution).
    pub cpu_secs: f64,
    /// System (kernel) CPU time alone, seconds.
    pub sys_secs: f64,
    /// Resident set now, bytes (`VmRSS`).
    pub rss: u64,
    /// Peak resident set, bytes (`VmHWM`).
    pub peak_rss: u64,
}

impl ProcStats {
    /// Reads a process's figures.
    pub fn read(pid: u32) -> Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        // The command name may hold spaces: fields are counted after its ')'.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("bad /proc stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5) (utime, stime) are 12 and 13 here.
        let ticks = |i: usize| -> Result<f64> {
            Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()? as f64)
        };
        let cpu_secs = (ticks(11)? + ticks(12)?) / clock_ticks();
        let sys_secs = ticks(12)? / clock_ticks();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Ok(ProcStats {
            cpu_secs,
            sys_secs,
            rss: kb("VmRSS:") * 1024,
            peak_rss: kb("VmHWM:") * 1024,
        })
    }

    /// This benchmark's own process.
    pub fn own() -> Result<Self> {
        Self::read(std::process::id())
    }
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` once (100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The value of an unlabelled counter or gauge in a `/metrics` scrape.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Deletes the keys cluster mode left in the shared Redis for this run's
/// classrooms and instructors (by exact prefix; nothing else is touched).
/// Needs `redis-cli`; says so and goes on without it.
pub fn clean_redis(redis_url: &str, patterns: &[String]) {
    let Some((host, port)) = redis_url
        .strip_prefix("redis://")
        .and_then(|rest| rest.trim_end_matches('/').rsplit_once(':'))
    else {
        eprintln!("bench: cannot parse {redis_url}; Redis keys of this run left to expire");
        return;
    };
    let mut removed = 0usize;
    for pattern in patterns {
        let scan = std::process::Command::new("redis-cli")
            .args(["-h", host, "-p", port, "--scan", "--pattern", pattern])
            .stdin(Stdio::null())
            .output();
        let keys = match scan {
            Ok(output) if output.status.success() => {
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
            _ => {
                eprintln!("bench: redis-cli --scan failed; keys {pattern} left to expire");
                continue;
            }
        };
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        for chunk in keys.chunks(500) {
            let done = std::process::Command::new("redis-cli")
                .args(["-h", host, "-p", port, "UNLINK"])
                .args(chunk)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status();
            if done.is_ok_and(|s| s.success()) {
                removed += chunk.len();
            }
        }
    }
    eprintln!("bench: removed {removed} Redis keys of this run");
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Raises this process's open-file limit to its hard limit; the gateways it
/// starts inherit it. Returns the (soft) limit now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum {
        limit.current = Some(max);
        if let Err(error) = setrlimit(Resource::Nofile, limit) {
            eprintln!("bench: cannot raise the open-file limit: {error}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}
