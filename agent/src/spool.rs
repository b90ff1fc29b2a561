//! The release spool: `<state_dir>/spool/*.json`, one [`vnet_api::ReleaseRequest`] per file,
//! written by the plugin when it could not reach the agent on DEL.
//!
//! The agent drains it at start-up before it serves any allocation (a spooled address must not
//! look allocated to a new pod's ADD), and again periodically in case a DEL raced the start-up.
//! A file is deleted only once its release is durable in the store. A file that does not parse
//! is renamed to `*.invalid` (kept for a person, never retried). Before the agent allocates for
//! an attachment it applies that attachment's spooled release, if any
//! ([`crate::agent::Agent::apply_spool_file`]): otherwise a stale release, drained later, could
//! free the newer allocation.

use std::path::{Path, PathBuf};

use vnet_api::ReleaseRequest;

#[derive(Debug)]
pub struct SpoolEntry {
    pub path: PathBuf,
    pub request: ReleaseRequest,
}

/// Reads every spooled release, oldest file name first. Unparsable files are set aside.
pub fn read_spool(dir: &Path) -> std::io::Result<Vec<SpoolEntry>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        match read_file(&path) {
            Ok(Some(request)) => out.push(SpoolEntry { path, request }),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read spooled release; retried at the next drain")
            }
        }
    }
    Ok(out)
}

/// Reads one spooled release; `None` when the file does not exist, or did not parse (then it is
/// set aside as `.invalid`).
pub fn read_file(path: &Path) -> std::io::Result<Option<ReleaseRequest>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<ReleaseRequest>(&bytes) {
        Ok(request) => Ok(Some(request)),
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "spooled release is invalid; set aside as .invalid");
            set_aside(path);
            Ok(None)
        }
    }
}

/// Keeps a file that must not be retried for a person to look at.
pub fn set_aside(path: &Path) {
    let _ = std::fs::rename(path, path.with_extension("invalid"));
}

/// Deletes a drained file (its release is durable).
pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %e, "cannot delete drained spool file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_valid_files_and_sets_aside_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let key = "abc/eth0".parse().unwrap();
        let req = ReleaseRequest {
            key,
            dying_veth: Some("vdel0123456789a".into()),
        };
        let name = vnet_api::spool_file_name(&req.key);
        std::fs::write(dir.path().join(&name), serde_json::to_vec(&req).unwrap()).unwrap();
        std::fs::write(dir.path().join("broken.json"), "{").unwrap();
        std::fs::write(dir.path().join("other.txt"), "x").unwrap();
        let entries = read_spool(dir.path()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].request, req);
        assert!(dir.path().join("broken.invalid").exists());
        remove(&entries[0].path);
        assert!(!dir.path().join(name).exists());
        assert!(read_spool(&dir.path().join("missing")).unwrap().is_empty());
    }
}
