//! The kernel's policy decisions must agree with the pure-Rust reference matcher on
//! every case of a table, socket by socket, on real connections.
use bypass_testsupport::{Daemon, PinDir, TempDir, TestCgroup, bin, require_root, unique};
use bypassd::{
    datapath::Datapath,
    policy::{self, Action, RuleSpec, SocketView},
};
use bypassd_ebpf::abi::Counter;
use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, PartialEq)]
enum Who {
    App,
    Proxy,
}

struct Case {
    name: &'static str,
    rules: &'static str,
    default: &'static str,
    /// Listen address, connect address (the port is added).
    listen: &'static str,
    connect: &'static str,
    server: Who,
    client: Who,
    client_uid: u32,
}

const fn case(name: &'static str, rules: &'static str, default: &'static str, listen: &'static str, connect: &'static str) -> Case {
    Case { name, rules, default, listen, connect, server: Who::App, client: Who::App, client_uid: 0 }
}

fn cases() -> Vec<Case> {
    vec![
        case("default accelerate", "", "accelerate", "127.0.0.1", "127.0.0.1"),
        case("default kernel", "", "kernel", "127.0.0.1", "127.0.0.1"),
        case("server side only by local port", "[[policy.rules]]\naction = \"accelerate\"\nlocal_ports = \"PORT\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        case(
            "both sides by local and remote port",
            "[[policy.rules]]\naction = \"accelerate\"\nlocal_ports = \"PORT\"\n[[policy.rules]]\naction = \"accelerate\"\nremote_ports = \"PORT-PORT\"\n",
            "kernel",
            "127.0.0.1",
            "127.0.0.1",
        ),
        case("port range excludes", "[[policy.rules]]\naction = \"accelerate\"\nremote_ports = \"1-1000\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        case(
            "v4 cidr matches 127.0.0.2",
            "[[policy.rules]]\naction = \"accelerate\"\nremote_cidr = \"127.0.0.2/32\"\n[[policy.rules]]\naction = \"accelerate\"\nlocal_cidr = \"127.0.0.2\"\n",
            "kernel",
            "127.0.0.2",
            "127.0.0.2",
        ),
        case(
            "v4 cidr misses 127.0.0.1",
            "[[policy.rules]]\naction = \"accelerate\"\nremote_cidr = \"127.0.0.2/32\"\n[[policy.rules]]\naction = \"accelerate\"\nlocal_cidr = \"127.0.0.2\"\n",
            "kernel",
            "127.0.0.1",
            "127.0.0.1",
        ),
        case("v6 cidr ::1", "[[policy.rules]]\naction = \"accelerate\"\nremote_cidr = \"::1/128\"\n", "kernel", "::1", "::1"),
        case("::/0 matches IPv4 too (mapped)", "[[policy.rules]]\naction = \"accelerate\"\nremote_cidr = \"::/0\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        case("v6 host rule misses IPv4", "[[policy.rules]]\naction = \"accelerate\"\nremote_cidr = \"::1/128\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        case("v4 rule matches a dual-stack listener", "[[policy.rules]]\naction = \"accelerate\"\nlocal_cidr = \"127.0.0.0/8\"\n[[policy.rules]]\naction = \"accelerate\"\nremote_cidr = \"127.0.0.0/8\"\n", "kernel", "::", "127.0.0.1"),
        case("first match wins (kernel first)", "[[policy.rules]]\naction = \"kernel\"\nremote_ports = \"PORT\"\n[[policy.rules]]\naction = \"accelerate\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        case("kernel rule under default accelerate", "[[policy.rules]]\naction = \"kernel\"\nlocal_ports = \"PORT\"\n", "accelerate", "127.0.0.1", "127.0.0.1"),
        Case { server: Who::App, client: Who::Proxy, ..case("cgroup admits the app only", "[[policy.rules]]\naction = \"accelerate\"\ncgroup = \"APP\"\n", "kernel", "127.0.0.1", "127.0.0.1") },
        Case { server: Who::App, client: Who::App, ..case("cgroup admits both in app", "[[policy.rules]]\naction = \"accelerate\"\ncgroup = \"APP\"\n", "kernel", "127.0.0.1", "127.0.0.1") },
        Case { client_uid: 65534, ..case("uid admits nobody's client only", "[[policy.rules]]\naction = \"accelerate\"\nuid = 65534\n", "kernel", "127.0.0.1", "127.0.0.1") },
        case("ports admits both ends in one rule", "[[policy.rules]]\naction = \"accelerate\"\nports = \"PORT\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        case("ports range excludes both ends", "[[policy.rules]]\naction = \"accelerate\"\nports = \"1-1000\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        case("ports kernel rule before accelerate", "[[policy.rules]]\naction = \"kernel\"\nports = \"PORT\"\n[[policy.rules]]\naction = \"accelerate\"\n", "kernel", "127.0.0.1", "127.0.0.1"),
        Case { client_uid: 65534, ..case("ports carries the rule's uid to both kernel rules", "[[policy.rules]]\naction = \"accelerate\"\nports = \"PORT\"\nuid = 65534\n", "kernel", "127.0.0.1", "127.0.0.1") },
        Case { client_uid: 65534, ..case("uid and port together", "[[policy.rules]]\naction = \"accelerate\"\nuid = 0\nlocal_ports = \"PORT\"\n[[policy.rules]]\naction = \"accelerate\"\nuid = 65534\n", "kernel", "127.0.0.1", "127.0.0.1") },
    ]
}

fn wait_port(p: &Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(p)
            && let Ok(v) = s.trim().parse()
        {
            return v;
        }
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }.parse().unwrap()
}

#[test]
fn kernel_policy_agrees_with_the_reference_matcher() {
    require_root();
    let top = TestCgroup::new();
    let (app, proxy) = (top.child("app"), top.child("proxy"));
    let pins = PinDir::new();
    let state = TempDir::new();
    let dir = TempDir::new();
    // Clients that run as nobody write their sent-file here too.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let cgroot = bypass_testsupport::cgroup2_mount();
    // "Accelerated" here means the held receiver gets the 256 KiB redirected before it
    // reads, so the recvmsg-first splice gate is off for this test (policy is orthogonal).
    let base = format!(
        "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\n[datapath]\nsplice_safety = \"off\"\ncoalesce_below = 0\n",
        pins.path().display(),
        top.rel,
        state.path().display()
    );
    let mut daemon = Daemon::start(&format!("{base}[policy]\ndefault = \"kernel\"\n")).expect("start");
    let mut failures = Vec::new();
    for (i, c) in cases().iter().enumerate() {
        let port = 18300 + i as u16;
        let client_port = 18400 + i as u16;
        let rules = c.rules.replace("PORT", &port.to_string()).replace("APP", &app.rel);
        let cfg = format!("{base}[policy]\ndefault = \"{}\"\n{rules}", c.default);
        std::fs::write(&daemon.config, &cfg).unwrap();
        daemon.reload().expect("reload");
        assert!(!daemon.log().contains("reload failed"), "{}: {}", c.name, daemon.log());

        // Reference decision, socket by socket.
        let parsed: toml::Value = toml::from_str(&cfg).unwrap();
        let specs: Vec<RuleSpec> = parsed
            .get("policy")
            .and_then(|p| p.get("rules"))
            .map(|r| r.clone().try_into().unwrap())
            .unwrap_or_default();
        let resolved = policy::resolve(&specs, &cgroot).unwrap();
        let default = if c.default == "accelerate" { Action::Accelerate } else { Action::Kernel };
        let cg_of = |w: Who| if w == Who::App { app.id() } else { proxy.id() };
        // A dual-stack listener sees its IPv4 peer as IPv4-mapped.
        let server_ip = if c.listen == "::" { format!("::ffff:{}", c.connect) } else { c.connect.to_string() };
        let client_ip = if c.listen == "::" { format!("::ffff:{}", c.connect) } else { c.connect.to_string() };
        let server_view = SocketView {
            local: addr(&server_ip, port),
            remote: addr(&client_ip, client_port),
            owner: Some((cg_of(c.server), 0)),
        };
        let client_view = SocketView {
            local: addr(c.connect, client_port),
            remote: addr(c.connect, port),
            owner: Some((cg_of(c.client), c.client_uid)),
        };
        let expected_admitted = [server_view, client_view]
            .iter()
            .filter(|v| policy::decide(&resolved, default, v) == Action::Accelerate)
            .count() as u64;
        let expected_accel = expected_admitted == 2;

        // Kernel decision on a real connection, held open while we look at it.
        let dp = Datapath::open_pinned(pins.path()).unwrap();
        let before = (dp.counter(Counter::SocketsInserted).unwrap(), dp.counter(Counter::RedirectedBytes).unwrap());
        let port_file = dir.path().join(unique("port"));
        let hold = dir.path().join(unique("hold"));
        let sent = dir.path().join(unique("sent"));
        let server_cg = if c.server == Who::App { &app } else { &proxy };
        let client_cg = if c.client == Who::App { &app } else { &proxy };
        let mut srv = server_cg.command(bin("bypass-traffic"));
        srv.args(["serve", "--listen", &addr(c.listen, port).to_string(), "--read-mode", "read-after-file"])
            .arg("--hold-file")
            .arg(&hold)
            .arg("--port-file")
            .arg(&port_file);
        let srv = srv.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        wait_port(&port_file);
        let mut cl = if c.client_uid != 0 {
            let mut cmd = client_cg.command("setpriv");
            cmd.args([&format!("--reuid={}", c.client_uid), "--regid=65534", "--clear-groups"]).arg(bin("bypass-traffic"));
            cmd
        } else {
            client_cg.command(bin("bypass-traffic"))
        };
        cl.args(["send", "--connect", &addr(c.connect, port).to_string(), "--source-port", &client_port.to_string()])
            .args(["--bytes", "262144", "--reply-bytes", "0", "--sent-file"])
            .arg(&sent);
        let cl = cl.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sent.exists() {
            assert!(Instant::now() < deadline, "{}: sender did not finish", c.name);
            std::thread::sleep(Duration::from_millis(10));
        }
        // `sent` is created by the client after connect; sent-file needs the whole
        // stream written, which with hold on the server only completes under
        // acceleration or within socket buffers (256 KiB fits either way).
        let conns = dp.connections().unwrap();
        let paired = conns.iter().any(|x| x.paired && (x.local.port() == port || x.remote.port() == port));
        std::fs::write(&hold, "").unwrap();
        let (so, co) = (srv.wait_with_output().unwrap(), cl.wait_with_output().unwrap());
        assert!(so.status.success() && co.status.success(), "{}: transfer failed: {} {} {} {}", c.name,
            String::from_utf8_lossy(&so.stdout), String::from_utf8_lossy(&so.stderr),
            String::from_utf8_lossy(&co.stdout), String::from_utf8_lossy(&co.stderr));
        let admitted = dp.counter(Counter::SocketsInserted).unwrap() - before.0;
        let redirected = dp.counter(Counter::RedirectedBytes).unwrap() - before.1;
        let kernel_accel = admitted == 2 && redirected >= 262144 && paired;
        let line = format!(
            "{:<45} expected admitted={} accel={} | kernel admitted={} redirected={} paired={}",
            c.name, expected_admitted, expected_accel, admitted, redirected, paired
        );
        eprintln!("{line}");
        if admitted != expected_admitted || kernel_accel != expected_accel || (!expected_accel && redirected > 0) {
            failures.push(line);
        }
    }
    daemon.stop();
    assert!(failures.is_empty(), "kernel and reference disagree:\n{}", failures.join("\n"));
}
