//! A throw-away nginx (Debian's `nginx-light`) in front of jobcast nodes, run
//! as a child process (`daemon off`) with its pid, logs and temp files in a
//! temporary directory, serving exactly the documented config
//! `docs/nginx/jobcast.conf` with only the addresses replaced.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The node addresses and listen line as written in the documented config.
pub const DOC_NODES: [&str; 2] = ["jobcast-1:7700", "jobcast-2:7700"];
/// The listen line of the documented config.
pub const DOC_LISTEN: &str = "listen 80;";
/// The log directory of the documented config.
pub const DOC_LOGS: &str = "/var/log/nginx/";

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The documented config, as the file holds it.
pub fn documented_conf() -> String {
    documented("jobcast.conf")
}

/// A file of docs/nginx/.
pub fn documented(name: &str) -> String {
    let path = repo().join("docs/nginx").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The listen line of the documented TLS + HTTP/2 config.
pub const DOC_LISTEN_H2: &str = "listen 443 ssl http2;";
/// Its certificate and key paths.
pub const DOC_CERT: &str = "/etc/ssl/jobcast/cert.pem";
/// Its key path.
pub const DOC_KEY: &str = "/etc/ssl/jobcast/key.pem";

/// The nginx binary; a clear failure when it is missing.
pub fn binary() -> PathBuf {
    let candidates = [
        std::env::var("JOBCAST_NGINX").unwrap_or_default(),
        "/usr/sbin/nginx".to_owned(),
    ];
    for c in candidates.iter().filter(|c| !c.is_empty()) {
        if Path::new(c).exists() {
            return PathBuf::from(c);
        }
    }
    panic!(
        "nginx is not installed (looked for $JOBCAST_NGINX and /usr/sbin/nginx): \
         scripts/test installs Debian's nginx-light; or run `apt-get install nginx-light`"
    );
}

/// A running nginx; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Nginx {
    pub url: String,
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with the documented config in front of the nodes on
    /// these loopback ports (exactly two, as the documented upstream has).
    pub fn start(nodes: [u16; 2]) -> Nginx {
        Self::start_documented("jobcast.conf", DOC_LISTEN, "", &[], nodes)
    }

    /// Starts nginx with docs/nginx/jobcast-h2.conf (TLS with HTTP/2) and
    /// this certificate and key; its `url` is `https://localhost:PORT`.
    pub fn start_h2(nodes: [u16; 2], cert: &Path, key: &Path) -> Nginx {
        let mut n = Self::start_documented(
            "jobcast-h2.conf",
            DOC_LISTEN_H2,
            " ssl http2",
            &[
                (DOC_CERT, cert.display().to_string()),
                (DOC_KEY, key.display().to_string()),
            ],
            nodes,
        );
        n.url = format!("https://localhost:{}", n.port);
        n
    }

    fn start_documented(
        file: &str,
        listen: &str,
        listen_tail: &str,
        replace: &[(&str, String)],
        nodes: [u16; 2],
    ) -> Nginx {
        let bin = binary();
        let mut conf = documented(file);
        for (doc, with) in replace {
            assert_eq!(
                conf.matches(doc).count(),
                1,
                "docs/nginx/{file} names {doc} once"
            );
            conf = conf.replace(doc, with);
        }
        for (doc, port) in DOC_NODES.iter().zip(nodes) {
            assert_eq!(
                conf.matches(doc).count(),
                1,
                "docs/nginx/{file} names {doc} once"
            );
            conf = conf.replace(doc, &format!("127.0.0.1:{port}"));
        }
        assert_eq!(
            conf.matches(listen).count(),
            1,
            "docs/nginx/{file} has `{listen}` once"
        );
        // A free port: taken from the kernel, released, then given to nginx
        // (another process could take it in between: then start fails clearly).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        conf = conf.replace(listen, &format!("listen 127.0.0.1:{port}{listen_tail};"));

        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        assert!(
            conf.contains(DOC_LOGS),
            "docs/nginx/{file} logs to {DOC_LOGS}"
        );
        conf = conf.replace(DOC_LOGS, &format!("{d}/"));
        std::fs::write(dir.path().join("jobcast.conf"), conf).expect("write jobcast.conf");
        // The process frame around the documented http-level config: paths
        // inside the temporary directory, one worker, running as this user.
        let main = format!(
            "user root root;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               access_log {d}/access.log;\n\
               client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               include {d}/jobcast.conf;\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).expect("write nginx.conf");
        let child = Command::new(&bin)
            .args(["-p", &d, "-c", &format!("{d}/nginx.conf"), "-e"])
            .arg(format!("{d}/error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut nginx = Nginx {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child,
            dir,
        };
        nginx.wait_ready();
        nginx
    }

    /// Waits (bounded) until nginx accepts connections.
    fn wait_ready(&mut self) {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nginx exited ({status}): {}", self.error_log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nginx did not listen on {}: {}",
            self.port,
            self.error_log()
        );
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM makes the master stop its worker too (SIGKILL would orphan it).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
