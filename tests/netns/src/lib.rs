//! Fixtures for tests that need root: uniquely named network namespaces and veth pairs that are
//! removed when dropped, also when the test panics.
//!
//! Names carry the test process's PID (`vnt-<pid>-<n>-<tag>` for namespaces), so
//! [`sweep_stale`] can remove what a killed test run left behind without touching a concurrent
//! run's fixtures. Every command runs under `timeout(1)` so a wedged `ip` cannot hang a test.

use std::io;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Prefix of every namespace this crate creates.
pub const NETNS_PREFIX: &str = "vnt-";
/// Prefix of every link this crate names with [`unique_link_name`].
pub const LINK_PREFIX: &str = "vt";
/// The limit on one external command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// Panics with a clear message unless the test runs as root: such a test must never pass by
/// silently doing nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc_geteuid() };
    assert!(
        euid == 0,
        "this test needs root (it creates network namespaces and veths); run the suite as root, e.g. `sudo -E cargo test`"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs `program args` under `timeout`, returning its output, or an error that includes stderr
/// when it fails.
pub fn run(program: &str, args: &[&str]) -> io::Result<Output> {
    let output = Command::new("timeout")
        .arg("--kill-after=5")
        .arg(COMMAND_TIMEOUT.as_secs().to_string())
        .arg(program)
        .args(args)
        .output()?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Like [`run`], for commands whose failure is the expected case (cleanup of what may be gone).
fn run_quiet(program: &str, args: &[&str]) {
    let _ = Command::new("timeout")
        .arg("--kill-after=5")
        .arg(COMMAND_TIMEOUT.as_secs().to_string())
        .arg(program)
        .args(args)
        .output();
}

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A link name unique to this process and call, at most 15 bytes: `vt` + 5 hex digits of the PID
/// + 4 hex digits of a counter + up to 4 bytes of `tag`.
pub fn unique_link_name(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(4)
        .collect();
    format!(
        "{LINK_PREFIX}{:05x}{:04x}{tag}",
        std::process::id() & 0xfffff,
        next_id() & 0xffff
    )
}

/// Removes namespaces left by test processes that no longer exist (a run that was killed before
/// its destructors ran). Runs once per process; fixtures of live concurrent runs are left alone.
pub fn sweep_stale() {
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !PathBuf::from(format!("/proc/{pid}")).exists() {
                run_quiet("ip", &["netns", "del", &name]);
            }
        }
    });
}

/// A network namespace, deleted on drop (with everything inside it: veths whose one end is in it
/// go too).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `vnt-<pid>-<n>-<tag>` with its loopback up.
    pub fn new(tag: &str) -> io::Result<Netns> {
        require_root();
        sweep_stale();
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let name = format!("{NETNS_PREFIX}{}-{}-{tag}", std::process::id(), next_id());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path a CNI runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace (`ip netns exec`), under the timeout.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A `Command` that runs `program` inside the namespace, for callers that need stdin, env or
    /// a background child. The caller owns its timeout.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Deletes the namespace now (as a runtime does after DEL). Dropping afterwards is a no-op.
    pub fn delete(&mut self) -> io::Result<()> {
        if self.name.is_empty() {
            return Ok(());
        }
        let result = run("ip", &["netns", "del", &self.name]).map(|_| ());
        self.name.clear();
        result
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            run_quiet("ip", &["netns", "del", &self.name]);
        }
    }
}

/// A veth pair, one end in `a` and the other in `b` (a namespace, or the root namespace for
/// `None`). Deleting one end deletes both; drop deletes it if it still exists.
#[derive(Debug)]
pub struct VethPair {
    pub a_name: String,
    pub b_name: String,
    a_ns: Option<String>,
}

impl VethPair {
    pub fn new(tag: &str, a: Option<&Netns>, b: Option<&Netns>) -> io::Result<VethPair> {
        require_root();
        let a_name = unique_link_name(tag);
        let b_name = unique_link_name(tag);
        run(
            "ip",
            &[
                "link", "add", &a_name, "type", "veth", "peer", "name", &b_name,
            ],
        )?;
        let pair = VethPair {
            a_name,
            b_name,
            a_ns: None,
        };
        let mut pair = pair;
        if let Some(ns) = b {
            run("ip", &["link", "set", &pair.b_name, "netns", ns.name()])?;
        }
        if let Some(ns) = a {
            run("ip", &["link", "set", &pair.a_name, "netns", ns.name()])?;
            pair.a_ns = Some(ns.name().to_owned());
        }
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        match &self.a_ns {
            Some(ns) => run_quiet(
                "ip",
                &["-n", ns.as_str(), "link", "del", self.a_name.as_str()],
            ),
            None => run_quiet("ip", &["link", "del", self.a_name.as_str()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links_in(ns: Option<&Netns>) -> String {
        let out = match ns {
            Some(ns) => ns.exec("ip", &["-o", "link", "show"]).unwrap(),
            None => run("ip", &["-o", "link", "show"]).unwrap(),
        };
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn netns_list() -> String {
        String::from_utf8_lossy(&run("ip", &["netns", "list"]).unwrap().stdout).into_owned()
    }

    #[test]
    fn link_names_are_unique_and_fit_the_kernel() {
        let a = unique_link_name("test");
        let b = unique_link_name("test");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert!(a.starts_with(LINK_PREFIX));
    }

    #[test]
    fn namespace_and_veth_are_removed_on_drop() {
        let ns = Netns::new("fixture").unwrap();
        let name = ns.name().to_owned();
        let pair = VethPair::new("fx", None, Some(&ns)).unwrap();
        let (host, peer) = (pair.a_name.clone(), pair.b_name.clone());
        assert!(links_in(None).contains(&host));
        assert!(links_in(Some(&ns)).contains(&peer));
        assert!(netns_list().contains(&name));
        drop(pair);
        drop(ns);
        assert!(!links_in(None).contains(&host));
        assert!(!netns_list().contains(&name));
    }

    #[test]
    fn namespace_is_removed_when_the_test_panics() {
        let name = std::sync::Mutex::new(String::new());
        let result = std::panic::catch_unwind(|| {
            let ns = Netns::new("panics").unwrap();
            *name.lock().unwrap() = ns.name().to_owned();
            panic!("test failure");
        });
        assert!(result.is_err());
        let name = name.into_inner().unwrap();
        assert!(!name.is_empty());
        assert!(!netns_list().contains(&name));
    }
}
