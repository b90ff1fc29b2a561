//! Logging: one line per event to stderr and, when configured, appended to a file. Never stdout,
//! which belongs to the CNI protocol. Kept tiny on purpose: the plugin starts for every pod.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(Level::Error),
            "warn" | "warning" => Ok(Level::Warn),
            "info" => Ok(Level::Info),
            "debug" | "trace" => Ok(Level::Debug),
            other => Err(format!(
                "logLevel {other:?} is not one of error, warn, info, debug"
            )),
        }
    }
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

struct Logger {
    level: Level,
    /// Command and attachment, prefixed to every line so one file can hold many invocations.
    context: String,
    file: Option<Mutex<File>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Sets up logging once per process. A file that cannot be opened is reported on stderr and
/// skipped: logging must never fail a CNI call.
pub fn init(level: Level, file: Option<&str>, context: String) {
    let file =
        file.and_then(
            |path| match OpenOptions::new().create(true).append(true).open(path) {
                Ok(f) => Some(Mutex::new(f)),
                Err(e) => {
                    eprintln!("vnet-cni: cannot open logFile {path}: {e}");
                    None
                }
            },
        );
    let _ = LOGGER.set(Logger {
        level,
        context,
        file,
    });
}

pub fn enabled(level: Level) -> bool {
    // Before init (config not parsed yet), only warnings and errors get through.
    LOGGER.get().map_or(Level::Warn, |l| l.level) >= level
}

pub fn emit(level: Level, args: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let context = LOGGER.get().map_or("", |l| l.context.as_str());
    let line = format!(
        "{}.{:03} vnet-cni[{}] {} {} {}\n",
        now.as_secs(),
        now.subsec_millis(),
        std::process::id(),
        level.as_str(),
        context,
        args
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(file) = LOGGER.get().and_then(|l| l.file.as_ref())
        && let Ok(mut f) = file.lock()
    {
        let _ = f.write_all(line.as_bytes());
    }
}

#[macro_export]
macro_rules! log_error { ($($t:tt)*) => { $crate::logging::emit($crate::logging::Level::Error, format_args!($($t)*)) } }
#[macro_export]
macro_rules! log_warn { ($($t:tt)*) => { $crate::logging::emit($crate::logging::Level::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! log_info { ($($t:tt)*) => { $crate::logging::emit($crate::logging::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! log_debug { ($($t:tt)*) => { $crate::logging::emit($crate::logging::Level::Debug, format_args!($($t)*)) } }
