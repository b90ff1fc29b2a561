//! The binary the runtime executes: reads the environment and stdin, runs the command, exits.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // VERSION may come without stdin; an unreadable stdin then parses as an empty config.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let mut stdout = std::io::stdout().lock();
    // vars_os: std::env::vars panics on a variable that is not UTF-8.
    match vnet_cni::run_os(std::env::vars_os(), &stdin, &mut stdout) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
