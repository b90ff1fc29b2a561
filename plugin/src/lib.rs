//! vnet-cni: the CNI plugin that wires each pod with a routed veth and a VNet /32 from vnet-agent.
//!
//! `main` reads the environment and stdin and calls [`run_os`]; each command lives in its own module
//! under `commands`. stdout carries exactly one JSON document (a result or an error) or nothing.

pub mod agent;
pub mod cni;
mod commands;
pub mod datapath;
pub mod env;
pub mod error;
pub mod logging;
pub mod netns;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;

use serde_json::Value;

use crate::agent::AgentClient;
use crate::cni::{NetConf, Version};
use crate::env::{CniEnv, Command};
use crate::error::{CniError, CniResult, Code};

/// Everything a command needs, validated.
pub struct Context {
    pub env: CniEnv,
    pub conf: NetConf,
    pub agent: AgentClient,
}

/// Runs one CNI call with the process environment as the OS gives it (any bytes). Returns the
/// process exit code (0 on success).
pub fn run_os(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    stdin: &[u8],
    stdout: &mut dyn Write,
) -> i32 {
    let result = env::cni_vars(vars).and_then(|env| dispatch(&env, stdin));
    respond(result, stdin, stdout)
}

/// Runs one CNI call. Returns the process exit code (0 on success).
pub fn run(env: &HashMap<String, String>, stdin: &[u8], stdout: &mut dyn Write) -> i32 {
    respond(dispatch(env, stdin), stdin, stdout)
}

/// Prints the result or the error (in the version the config asked for) and picks the exit code.
fn respond(result: CniResult<Option<Value>>, stdin: &[u8], stdout: &mut dyn Write) -> i32 {
    match result {
        Ok(Some(doc)) => {
            let _ = writeln!(stdout, "{doc}");
            0
        }
        Ok(None) => 0,
        Err(err) => {
            log_error!("{err}");
            let error_version = cni::peek_version(stdin).unwrap_or(Version::LATEST);
            let _ = writeln!(stdout, "{}", err.to_json(error_version.as_str()));
            1
        }
    }
}

fn dispatch(env: &HashMap<String, String>, stdin: &[u8]) -> CniResult<Option<Value>> {
    if env::command(env)? == Command::Version {
        return Ok(Some(commands::version::run(stdin)));
    }
    let cni_env = env::parse(env)?;
    let conf = NetConf::parse(stdin)?;
    let context = match &cni_env.key {
        Some(key) => format!("{} {key}", cni_env.command.as_str()),
        None => cni_env.command.as_str().to_owned(),
    };
    logging::init(conf.log_level, conf.log_file.as_deref(), context);
    let minimum = match cni_env.command {
        Command::Check => Version::V0_4_0,
        Command::Status | Command::Gc => Version::V1_1_0,
        _ => Version::V0_3_0,
    };
    if conf.cni_version < minimum {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{} needs cniVersion {} or later; the config says {}",
                cni_env.command.as_str(),
                minimum.as_str(),
                conf.cni_version.as_str()
            ),
        ));
    }
    log_debug!(
        "start: netns={:?} network={} version={}",
        cni_env.netns,
        conf.name,
        conf.cni_version.as_str()
    );
    let ctx = Context {
        agent: AgentClient::new(conf.agent_socket.clone()),
        env: cni_env,
        conf,
    };
    // One thread, no blocking pool to spin up: the plugin lives for a few milliseconds.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| {
            CniError::new(Code::Io, "cannot start the async runtime").with_details(e.to_string())
        })?;
    let result = runtime.block_on(async {
        match ctx.env.command {
            Command::Add => commands::add::run(&ctx).await.map(Some),
            Command::Del => commands::del::run(&ctx).await.map(|()| None),
            Command::Check => commands::check::run(&ctx).await.map(|()| None),
            Command::Status => commands::status::run(&ctx).await.map(|()| None),
            Command::Gc => commands::gc::run(&ctx).await.map(|()| None),
            Command::Version => unreachable!("answered above"),
        }
    });
    log_debug!("done: ok={}", result.is_ok());
    result
}
