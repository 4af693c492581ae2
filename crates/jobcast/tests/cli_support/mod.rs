//! Support for the CLI tests: the real `jobcast` binary as a server (on a
//! given or free loopback port, killable with SIGKILL and restartable on the
//! same address and store) and as a client command with a deadline; for the
//! multi-node tests also a test PostgreSQL database ([`pg`]), a TCP proxy that
//! can cut it off ([`proxy`]), an SSE reader that resumes ([`sse`]) and a
//! throw-away nginx ([`nginx`]); for the history checker a recorded history
//! of producers and watchers and its checker ([`history`]).
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod history;
pub mod nginx;
pub mod pg;
pub mod proxy;
pub mod sse;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The longest a CLI command may take in these tests.
pub const T: Duration = Duration::from_secs(40);

/// The binary under test: `JOBCAST_BIN` (scripts/test points it at the
/// release build), else the one cargo built for this test run.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var("JOBCAST_BIN") {
        Ok(b) if !b.is_empty() => b,
        _ => env!("CARGO_BIN_EXE_jobcast").to_owned(),
    })
}

/// How many of a server's last log lines are kept for failure messages.
const LOG_LINES: usize = 200;

/// A `jobcast serve` process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub db: String,
    extra: Vec<String>,
    /// The last [`LOG_LINES`] lines the server wrote to stderr.
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Starts on a free port with a new store in `dir`.
    pub fn start(dir: &std::path::Path) -> Server {
        let db = format!("sqlite://{}", dir.join("jobcast.db").display());
        Self::start_on(&db, 0).expect("start jobcast serve")
    }

    /// Starts on `port` (0: any) with the store `db`; None if it did not come up.
    pub fn start_on(db: &str, port: u16) -> Option<Server> {
        Self::start_with(db, port, &[])
    }

    /// Like [`Server::start_on`], with extra `serve` flags.
    pub fn start_with(db: &str, port: u16, extra: &[&str]) -> Option<Server> {
        let mut child = Command::new(bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--db",
                db,
            ])
            // Short reconnect floor and shutdown grace keep the tests quick.
            .args(["--retry", "100ms", "--shutdown-grace", "2s"])
            .args(extra)
            .env("JOBCAST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn jobcast serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let keep = log.clone();
        // JOBCAST_TEST_ECHO=1 echoes every server's log (to debug a test).
        let echo = std::env::var_os("JOBCAST_TEST_ECHO").is_some();
        let pid = child.id();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[jobcast {pid}] {line}");
                }
                {
                    let mut keep = keep.lock().unwrap();
                    if keep.len() == LOG_LINES {
                        keep.pop_front();
                    }
                    keep.push_back(line.clone());
                }
                if let Some(addr) = line.split("addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => {
                let port = addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                Some(Server {
                    child,
                    url: format!("http://{addr}"),
                    port,
                    db: db.to_owned(),
                    extra: extra.iter().map(|s| (*s).to_owned()).collect(),
                    log,
                })
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    /// The last lines of the server's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// kill -9.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }

    /// Starts again on the same port, store and flags (retrying while the port is busy).
    pub fn restart(&mut self) {
        let extra = self.extra.clone();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        for _ in 0..50 {
            if let Some(s) = Server::start_with(&self.db, self.port, &extra) {
                let old = std::mem::replace(self, s);
                drop(old);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart on port {}", self.port);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole log of `stream` through the JSON pages, following `next`.
pub async fn read_log(client: &reqwest::Client, url: &str, stream: &str) -> Vec<serde_json::Value> {
    let mut log = Vec::new();
    let mut after = String::new();
    for page in 0.. {
        assert!(page < 10_000, "paging did not end");
        let q = if after.is_empty() {
            String::new()
        } else {
            format!("&after={after}")
        };
        let v: serde_json::Value = client
            .get(format!("{url}/v1/streams/{stream}/events?limit=1000{q}"))
            .send()
            .await
            .expect("page")
            .json()
            .await
            .expect("page JSON");
        let events = v["events"].as_array().expect("events").clone();
        if events.is_empty() {
            break;
        }
        log.extend(events);
        match v["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
    }
    log
}

/// The outcome of a command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A `jobcast` client command against `url`, with optional stdin.
pub fn command(url: &str, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(bin());
    c.args(args)
        .env("JOBCAST_URL", url)
        .env_remove("JOBCAST_TOKEN")
        .env_remove("JOBCAST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Waits for a spawned command (with a deadline) and collects its output.
pub async fn finish(child: tokio::process::Child) -> Run {
    let out = tokio::time::timeout(T, child.wait_with_output())
        .await
        .expect("the command did not finish in time")
        .expect("wait");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command to completion.
pub async fn run(url: &str, args: &[&str]) -> Run {
    finish(command(url, args).spawn().expect("spawn")).await
}

/// Runs a command with `input` on stdin.
pub async fn run_with_stdin(url: &str, args: &[&str], input: &str) -> Run {
    use tokio::io::AsyncWriteExt;
    let mut child = command(url, args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("write stdin");
    drop(stdin);
    finish(child).await
}

/// Waits until `stream` has at least one SSE watcher on the server.
pub async fn wait_for_watcher(url: &str, stream: &str) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let v: serde_json::Value = match reqwest::get(format!("{url}/v1/streams/{stream}")).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        if v["watchers"].as_u64().unwrap_or(0) >= 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watcher on {stream}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
