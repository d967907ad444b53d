//! A private system bus: a real `dbus-daemon` with a system-type config made of
//! Debian's default system policy and the project's own bus policy file
//! (`systemd/org.bypassd.Bypassd1.conf`), listening on a socket in a temp dir.
//! Point processes at it with [`SystemBus::env`] (`DBUS_SYSTEM_BUS_ADDRESS`).
use crate::TempDir;
use anyhow::{Context, Result, bail};
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The project's bus policy file.
pub fn project_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/org.bypassd.Bypassd1.conf")
}

/// A policy that lets everyone own any name and call anything: stands in for a
/// broken or missing policy file, to test bypassd's own uid check.
pub const PERMISSIVE_POLICY: &str = r#"<busconfig>
  <policy context="default">
    <allow own="*"/>
    <allow send_type="method_call"/>
  </policy>
</busconfig>
"#;

/// The default system policy of /usr/share/dbus-1/system.conf (Debian 12), without
/// the parts that need a real system (user switch, fork, pid file, syslog,
/// activation helper, system.d directories).
const SYSTEM_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
"#;

pub struct SystemBus {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
}

impl SystemBus {
    /// A system bus with the project's policy file included.
    pub fn start() -> Result<SystemBus> {
        Self::start_with(&[project_policy()])
    }

    /// A system bus with a permissive policy instead of the project's.
    pub fn start_permissive() -> Result<SystemBus> {
        let dir = TempDir::new();
        let p = dir.path().join("permissive.conf");
        std::fs::write(&p, PERMISSIVE_POLICY)?;
        Self::start_in(dir, &[p])
    }

    /// A system bus including the given policy files (after the default policy).
    pub fn start_with(includes: &[PathBuf]) -> Result<SystemBus> {
        Self::start_in(TempDir::new(), includes)
    }

    /// Where a bus started with [`SystemBus::start_in`] on `dir` listens: lets a test
    /// point bypassd at a bus that does not exist yet.
    pub fn socket_in(dir: &TempDir) -> PathBuf {
        dir.path().join("system_bus_socket")
    }

    /// A system bus listening in `dir` (see [`SystemBus::socket_in`]), which it owns
    /// from now on.
    pub fn start_in(dir: TempDir, includes: &[PathBuf]) -> Result<SystemBus> {
        for i in includes {
            anyhow::ensure!(i.exists(), "bus policy file {} is missing", i.display());
        }
        // Unprivileged test clients (setpriv --reuid=nobody) must reach the socket.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let socket = Self::socket_in(&dir);
        let includes: String = includes
            .iter()
            .map(|p| format!("  <include>{}</include>\n", std::fs::canonicalize(p).unwrap_or(p.clone()).display()))
            .collect();
        let config = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={}</listen>
{SYSTEM_POLICY}
{includes}</busconfig>
"#,
            socket.display()
        );
        let conf = dir.path().join("system.conf");
        std::fs::write(&conf, config)?;
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1", "--nosyslog"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("dbus-daemon.log"))?)
            .spawn()
            .context("starting dbus-daemon (install the `dbus` package)")?;
        // It prints its address once it listens.
        let mut line = String::new();
        let stdout = child.stdout.take().context("dbus-daemon stdout")?;
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim().is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("dbus-daemon.log")).unwrap_or_default();
            bail!("dbus-daemon did not start: {log}");
        }
        let bus = SystemBus { child: Some(child), dir, socket };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !bus.socket.exists() {
            if Instant::now() > deadline {
                bail!("dbus-daemon did not create {}", bus.socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(bus)
    }

    /// The address, as DBUS_SYSTEM_BUS_ADDRESS and `busctl --address` take it.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    /// The environment variable that points bypassd/bypassctl at this bus.
    pub fn env(&self) -> (&'static str, String) {
        ("DBUS_SYSTEM_BUS_ADDRESS", self.address())
    }

    /// `busctl --address=<this bus> ARGS`, run to completion.
    pub fn busctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("busctl")
            .arg(format!("--address={}", self.address()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running busctl (install systemd)")
    }

    /// What dbus-daemon logged (policy rejections and the like).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dbus-daemon.log")).unwrap_or_default()
    }

    /// Stop the bus now (the drop does it too).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        self.stop();
    }
}
