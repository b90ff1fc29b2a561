//! External commands with a timeout, optionally started inside a named network namespace.
//!
//! Namespaces are entered in the forked child (`pre_exec`), never in one of our own threads, so a
//! command runs in a node's namespace exactly as it would on that node, and we pay no extra
//! `ip netns exec` process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where `ip netns add` puts the namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} did not finish within {secs} s (killed)")]
    Timeout { what: String, secs: u64 },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: String,
        stderr: String,
    },
    #[error("cannot open network namespace {ns}: {source}")]
    Netns {
        ns: String,
        #[source]
        source: io::Error,
    },
}

pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Makes `cmd` start inside the network namespace `ns` (and, with `detach`, in a new session so
/// it outlives the terminal that started the lab).
pub fn enter_netns(cmd: &mut Command, ns: &str, detach: bool) -> Result<(), ExecError> {
    let handle = File::open(netns_path(ns)).map_err(|source| ExecError::Netns {
        ns: ns.to_owned(),
        source,
    })?;
    let fd = handle.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe syscalls setns(2) and setsid(2); `handle` is moved into the closure, so
    // the fd stays open until the Command is dropped (it is O_CLOEXEC, closed at exec).
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &handle;
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if detach && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Short description of a command for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    if s.len() > 200 {
        s.truncate(200);
        s.push('…');
    }
    s
}

/// Runs `cmd` to completion with captured output, killing it after `timeout`. Returns the
/// output whatever the exit status (see [`run_ok`]) and how long it took.
pub fn run_timed(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<(Output, Duration), ExecError> {
    let what = describe(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        what: what.clone(),
        source,
    })?;
    if let Some(input) = stdin {
        use std::io::Write;
        if let Some(mut pipe) = child.stdin.take() {
            // A child that exits without reading its stdin is not our error to report here.
            let _ = pipe.write_all(input);
        }
    }
    let (done, watchdog) = kill_after(&child, timeout);
    let output = child
        .wait_with_output()
        .map_err(|source| ExecError::Spawn {
            what: what.clone(),
            source,
        })?;
    let elapsed = start.elapsed();
    drop(done);
    if watchdog.join().unwrap_or(false) {
        return Err(ExecError::Timeout {
            what,
            secs: timeout.as_secs(),
        });
    }
    Ok((output, elapsed))
}

/// Like [`run_timed`] but a non-zero exit is an error; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String, ExecError> {
    let (output, _) = run_timed(cmd, None, timeout)?;
    check(cmd, output)
}

pub fn check(cmd: &Command, output: Output) -> Result<String, ExecError> {
    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        }
        return Err(ExecError::Failed {
            what: describe(cmd),
            status: output.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A thread that SIGKILLs the child when `timeout` passes before the returned sender is dropped.
/// The join value tells whether it fired.
fn kill_after(
    child: &Child,
    timeout: Duration,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<bool>) {
    let (tx, rx) = mpsc::channel::<()>();
    let pid = child.id() as libc::pid_t;
    let handle = std::thread::spawn(move || match rx.recv_timeout(timeout) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // SAFETY: kill(2) on the pid of a child we spawned. Until the waiter reaps it the pid
            // cannot be reused; the waiter drops the sender right after reaping, so only a timeout
            // expiring within that instant could reach a recycled pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        }
        _ => false,
    });
    (tx, handle)
}

/// `ip <args>` with the usual timeout.
pub fn ip(args: &[&str]) -> Result<String, ExecError> {
    run_ok(Command::new("ip").args(args), Duration::from_secs(20))
}

/// Feeds `lines` to `ip -n <ns> -batch -` (one process for many changes).
pub fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<(), ExecError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let input = lines.join("\n") + "\n";
    let (output, _) = run_timed(&mut cmd, Some(input.as_bytes()), Duration::from_secs(30))?;
    check(&cmd, output).map(|_| ())
}
