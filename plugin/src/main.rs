//! The binary the runtime executes: reads the environment and stdin, runs the command, exits.

use std::collections::HashMap;
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    // VERSION may come without stdin; an unreadable stdin then parses as an empty config.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let mut stdout = std::io::stdout().lock();
    match vnet_cni::run(&env, &stdin, &mut stdout) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
