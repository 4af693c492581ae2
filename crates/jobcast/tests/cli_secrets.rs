//! The database password never reaches the binary's output: not in the
//! "listening" line, not in the error when the store cannot be opened, at
//! the debug log level, for a password in the URL's userinfo and in a
//! `?password=` parameter.

mod cli_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use cli_support::pg::{self, TestDb};

const PASSWORD: &str = "hunter2-Sekr1t-pw";

/// The URLs of one database with the password in each place a URL carries one.
fn with_password(db: &str, hostport: &str) -> Vec<String> {
    vec![
        format!("postgres://postgres:{PASSWORD}@{hostport}/{db}"),
        format!("postgresql://postgres:{PASSWORD}@{hostport}/{db}?sslmode=disable"),
        format!("postgres://postgres@{hostport}/{db}?password={PASSWORD}&sslmode=disable"),
    ]
}

/// Runs `jobcast serve --db url` until it logs "listening" (then stops it
/// with SIGKILL) or exits; returns (listened, stdout + stderr).
fn serve(url: &str) -> (bool, String) {
    let mut child = Command::new(cli_support::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db", url])
        .env("JOBCAST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn jobcast serve");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let (tx, rx) = std::sync::mpsc::channel();
    let err = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("jobcast listening") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let listened = rx.recv_timeout(Duration::from_secs(60)).is_ok();
    if listened {
        // Give a debug line that would follow the listening line a moment.
        std::thread::sleep(Duration::from_millis(300));
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    let text = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    assert!(
        listened || !status.success(),
        "pid {pid}: neither listened nor failed"
    );
    (listened, text)
}

#[tokio::test]
async fn a_reachable_postgres_password_is_never_printed() {
    let db = TestDb::create().await;
    let hostport = pg::addr().to_string();
    for url in with_password(&db.name, &hostport) {
        let (listened, text) = serve(&url);
        assert!(listened, "{url}: did not start:\n{text}");
        assert!(
            !text.contains(PASSWORD),
            "the password was printed:\n{text}"
        );
        assert!(
            text.contains("127.0.0.1"),
            "the host is still shown:\n{text}"
        );
    }
}

#[test]
fn an_unreachable_postgres_password_is_never_printed() {
    for url in with_password("nowhere", "127.0.0.1:1") {
        let (listened, text) = serve(&url);
        assert!(!listened, "{url}: listened without a store");
        assert!(
            !text.contains(PASSWORD),
            "the password was printed:\n{text}"
        );
        assert!(
            text.contains("opening the store"),
            "the error says what failed:\n{text}"
        );
    }
}
