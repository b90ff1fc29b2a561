//! Plain-text tables for the terminal.

use std::fmt::Write as _;

use crate::lab::{Lab, proc_alive};

/// Left-aligned columns sized to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let width = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(width(cell));
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(width(cell));
            let _ = write!(s, "{cell}{}", " ".repeat(pad));
            if i + 1 < cells.len() {
                s.push_str("  ");
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    out += &line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    );
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Nodes with their agents' pool figures.
pub fn nodes_table(lab: &Lab) -> String {
    let st = lab.state();
    let rows: Vec<Vec<String>> = st
        .nodes
        .iter()
        .map(|n| {
            let pid = st.process(&format!("agent:{}", n.name));
            let agent = match pid {
                Some(p) if proc_alive(p) => format!("pid {}", p.pid),
                _ => "down".to_owned(),
            };
            match lab.agent_status(&n.name) {
                Ok(s) => vec![
                    n.name.clone(),
                    n.kind.as_str().to_owned(),
                    n.ip.to_string(),
                    agent,
                    s.pool.total.to_string(),
                    s.pool.allocated.to_string(),
                    s.pool.free.to_string(),
                    s.pool.cooldown.to_string(),
                    if s.can_allocate {
                        "yes".into()
                    } else {
                        s.reason.unwrap_or_else(|| "no".into())
                    },
                ],
                Err(_) => vec![
                    n.name.clone(),
                    n.kind.as_str().to_owned(),
                    n.ip.to_string(),
                    agent,
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "agent unreachable".into(),
                ],
            }
        })
        .collect();
    table(
        &[
            "node",
            "kind",
            "NIC IP",
            "agent",
            "pool total",
            "allocated",
            "free",
            "cooldown",
            "can allocate",
        ],
        &rows,
    )
}

pub fn pods_table(lab: &Lab) -> String {
    let st = lab.state();
    let rows: Vec<Vec<String>> = st
        .pods
        .iter()
        .map(|p| {
            vec![
                p.node.clone(),
                p.name.clone(),
                p.ip.to_string(),
                p.host_veth.clone(),
                p.ns.clone(),
            ]
        })
        .collect();
    table(&["node", "pod", "IP", "host veth", "netns"], &rows)
}

/// What `vnetctl lab status` prints.
pub fn status(lab: &Lab) -> String {
    let st = lab.state();
    let mut out = format!(
        "lab {} (token {}, state {})\nsubnet {}, gateway {} (router netns {}), mock cloud http://{}\nplain VM {} {} (netns {}), internet {} (netns {})\n\n",
        st.name,
        st.token,
        st.dir.display(),
        st.subnet,
        st.gateway,
        st.router_ns,
        st.mock_addr,
        st.vm.name,
        st.vm.ip,
        st.vm.ns,
        st.internet.ip,
        st.internet.ns
    );
    let procs: Vec<Vec<String>> = st
        .processes
        .iter()
        .map(|p| {
            vec![
                p.role.clone(),
                p.pid.to_string(),
                if proc_alive(p) {
                    "running".into()
                } else {
                    "gone".into()
                },
                p.log.display().to_string(),
            ]
        })
        .collect();
    out += &table(&["process", "pid", "state", "log"], &procs);
    out.push('\n');
    out += &nodes_table(lab);
    out.push('\n');
    if st.pods.is_empty() {
        out += "no pods\n";
    } else {
        out += &pods_table(lab);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_characters_not_bytes() {
        let t = table(
            &["a", "mark"],
            &[
                vec!["xyz".into(), "✓".into()],
                vec!["q".into(), "✗ no".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a    mark");
        assert_eq!(lines[1], "---  ----");
        assert_eq!(lines[2], "xyz  ✓");
        assert_eq!(lines[3], "q    ✗ no");
    }
}
