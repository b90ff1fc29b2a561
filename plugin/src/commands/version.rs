//! VERSION: which spec versions we speak.

use serde_json::{Value, json};

use crate::cni::{self, SUPPORTED_VERSIONS, Version};

pub fn run(stdin: &[u8]) -> Value {
    // Answer in the version asked for when we speak it; libcni only reads supportedVersions.
    let asked = cni::peek_version(stdin).unwrap_or(Version::LATEST);
    json!({
        "cniVersion": asked.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}
