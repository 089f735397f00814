//! A real nginx (Debian's) in front of payments nodes, as a load balancer in
//! production would be: its own prefix directory with a generated config,
//! pid file and logs, on a free loopback port, killed with its workers when
//! dropped.
//!
//! Every POST of the API carries an Idempotency-Key, so nginx may send a
//! request that failed on one node to the next (`non_idempotent`): that is
//! how a balancer hides a node that stops or dies. Each answer names the
//! node that gave it in `X-Upstream`, so tests can tell who served what.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use corral_testkit::{spawn, wait_until, ChildGroup};

/// Where Debian installs nginx, for a `PATH` without the sbin directories.
const DEBIAN_NGINX: &str = "/usr/sbin/nginx";

/// The nginx program, if installed.
pub fn program() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from(DEBIAN_NGINX)).filter(|p| p.is_file()))
}

/// A running nginx balancing over some upstream nodes.
pub struct Nginx {
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    process: ChildGroup,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts `program` (from [`program`]) in front of `nodes`, round
    /// robin, and returns once it accepts connections.
    pub fn start(program: &Path, nodes: &[SocketAddr]) -> Nginx {
        let dir = tempfile::tempdir().expect("nginx prefix directory");
        // Run as root, nginx's workers are `nobody`: they must reach the
        // body buffers kept under the prefix.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("open the prefix directory to nginx's workers");
        // A port that was free a moment ago (outside the range other tests'
        // connections take theirs from); another process taking it in
        // between makes nginx fail to start, which is reported below.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], corral_testkit::free_port()));
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, config_text(dir.path(), addr, nodes)).expect("write nginx.conf");
        let mut command = Command::new(program);
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config)
            .args(["-g", "daemon off;"]);
        let (child, stderr) = spawn(command);
        let mut nginx = Nginx {
            addr,
            process: ChildGroup(child),
            stderr,
            dir,
        };
        let up = wait_until(Duration::from_secs(30), || {
            nginx.exited() || TcpStream::connect(addr).is_ok()
        });
        assert!(
            up && !nginx.exited(),
            "nginx did not start on {addr}; stderr:\n{}\nerror.log:\n{}",
            nginx.stderr.lock().unwrap(),
            nginx.error_log()
        );
        nginx
    }

    fn exited(&mut self) -> bool {
        matches!(self.process.0.try_wait(), Ok(Some(_)))
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// nginx's error log so far (failed upstream attempts are logged there).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// nginx's access log so far: `STATUS UPSTREAMS REQUEST` per line.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// The whole configuration: one worker process (enough for tests, and one
/// round-robin sequence), everything nginx writes under `prefix`.
fn config_text(prefix: &Path, listen: SocketAddr, nodes: &[SocketAddr]) -> String {
    let prefix = prefix.display();
    let servers: String = nodes
        .iter()
        .map(|node| format!("        server {node} max_fails=1 fail_timeout=10s;\n"))
        .collect();
    format!(
        r#"worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{
    worker_connections 1024;
}}
http {{
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    log_format upstreams '$status "$upstream_addr" "$upstream_status" $request_time "$upstream_response_time" "$request"';
    access_log {prefix}/access.log upstreams;
    # Keep-alive to the nodes for plain requests; the WebSocket's
    # `Connection: upgrade` for upgrades.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}
    upstream payments {{
{servers}        keepalive 32;
    }}
    server {{
        listen {listen};
        client_max_body_size 64m;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://payments;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 120s;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"#
    )
}
