//! What bypassctl prints: tables for people, one JSON document with --json. The JSON
//! schemas are documented in docs/bypassctl.md; add fields, never rename or remove.
use crate::Failure;
use bypassd_api as api;
use serde_json::{Map, Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Out {
    pub json: bool,
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into()));
}

/// Left-aligned columns separated by two spaces; `right` marks right-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            let last = i + 1 == cells.len();
            if right.contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if !last {
                    s.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                s.push_str("  ");
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn ago(t: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(t);
    let (d, h, m) = (s / 86400, s % 86400 / 3600, s % 3600 / 60);
    match (d, h, m) {
        (0, 0, m) => format!("{m}m {}s ago", s % 60),
        (0, h, m) => format!("{h}h {m}m ago"),
        (d, h, _) => format!("{d}d {h}h ago"),
    }
}

/// A rule as `policy list --json` shows it.
fn rule_value(r: &api::PolicyRule) -> Value {
    json!({
        "index": r.index,
        "source": r.source,
        "name": if r.name.is_empty() { Value::Null } else { json!(r.name) },
        "summary": r.summary,
        "rule": crate::rule_json(&r.rule),
        "active": r.active,
        "inactive_reason": if r.active { Value::Null } else { json!(r.inactive_reason) },
    })
}

impl Out {
    pub fn status(&self, s: &api::Status, links: &[api::LinkStatus]) {
        if self.json {
            let mut v = json!(s);
            if let Some(m) = v.as_object_mut() {
                m.insert("links".into(), json!(links));
            }
            return print_json(&v);
        }
        let state = match (s.state.as_str(), s.reason.is_empty()) {
            (st, true) => st.to_string(),
            (st, false) => format!("{st}: {}", s.reason),
        };
        let rows = [
            ("Version", s.version.clone()),
            ("State", state),
            ("Paused", if s.paused { "yes (new connections use the kernel path)".into() } else { "no".into() }),
            ("Cgroup", s.cgroup.clone()),
            ("Pin dir", s.pin_dir.clone()),
            ("Config", s.config_path.clone()),
            ("Config files", s.config_files.join(", ")),
            ("Config sha256", s.config_sha256.clone()),
            ("Started", format!("{} (Unix time {})", ago(s.started_at), s.started_at)),
            ("ABI version", s.abi_version.to_string()),
            ("Capacity", format!("{} sockets", s.capacity)),
            (
                "Policy",
                match s.inactive_rules {
                    0 => "all rules active".to_string(),
                    n => format!("{n} rule(s) inactive: their cgroup does not exist (see `bypassctl policy list`)"),
                },
            ),
        ];
        for (k, v) in rows {
            println!("{:<14} {v}", format!("{k}:"));
        }
        for l in links {
            let state = if l.reason.is_empty() { l.state.clone() } else { format!("{}: {}", l.state, l.reason) };
            let ns = if l.netns.is_empty() { String::new() } else { format!(" (netns {})", l.netns) };
            println!("{:<14} {} {} {state}{ns}", "Link:", l.mode, l.name);
            for i in &l.interfaces {
                let att = if i.attached { "attached" } else if i.ifindex == 0 { "missing" } else { "not attached" };
                println!(
                    "{:<14}   {} (ifindex {}) {att}; {}; in: {} frames redirected, {} passed",
                    "", i.name, i.ifindex, i.offloads, i.redirected_frames, i.passed_frames
                );
            }
        }
    }

    pub fn stats(&self, s: &api::Stats) {
        if self.json {
            let m: Map<String, Value> = s.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            return print_json(&Value::Object(m));
        }
        let rows: Vec<Vec<String>> = s.iter().map(|(k, v)| vec![k.clone(), v.to_string()]).collect();
        println!("{}", table(&["COUNTER", "VALUE"], &rows, &[1]));
    }

    pub fn connections(&self, c: &[api::Connection]) {
        if self.json {
            return print_json(&json!({ "connections": c }));
        }
        if c.is_empty() {
            println!("no accelerated connections");
            return;
        }
        let rows: Vec<Vec<String>> = c
            .iter()
            .map(|c| {
                vec![
                    c.family.clone(),
                    c.local.clone(),
                    c.remote.clone(),
                    if c.netns == 0 { "-".into() } else { c.netns.to_string() },
                    match (c.paired, c.nat) {
                        (true, true) => format!("nat: {}", c.peer),
                        (true, false) => "yes".into(),
                        _ => "no".into(),
                    },
                    c.senders.clone(),
                ]
            })
            .collect();
        println!("{}", table(&["FAMILY", "LOCAL", "REMOTE", "NETNS", "PAIRED", "SENDERS"], &rows, &[]));
        println!("{} accelerated socket(s)", c.len());
    }

    pub fn policy(&self, default: &str, rules: &[api::PolicyRule]) {
        if self.json {
            let rules: Vec<Value> = rules.iter().map(rule_value).collect();
            return print_json(&json!({ "default_action": default, "rules": rules }));
        }
        println!("Default action: {default}");
        if rules.is_empty() {
            println!("no rules: every connection gets the default action");
            return;
        }
        let rows: Vec<Vec<String>> = rules
            .iter()
            .map(|r| {
                vec![
                    r.index.to_string(),
                    r.source.clone(),
                    if r.name.is_empty() { "-".into() } else { r.name.clone() },
                    r.summary.clone(),
                    if r.active { "active".into() } else { format!("inactive: {}", r.inactive_reason) },
                ]
            })
            .collect();
        println!("{}", table(&["#", "SOURCE", "NAME", "RULE", "STATE"], &rows, &[0]));
    }

    /// Result of a write command. People get "changed: ..." or "unchanged: ..." (just
    /// the word when there is nothing to add); JSON gets {"changed": bool, ...extra}.
    pub fn changed(&self, changed: bool, what: &str, why_not: &str, extra: Value) {
        if self.json {
            let mut m = Map::new();
            m.insert("changed".into(), json!(changed));
            if let Value::Object(e) = extra {
                m.extend(e);
            }
            return print_json(&Value::Object(m));
        }
        let (word, text) = if changed { ("changed", what) } else { ("unchanged", why_not) };
        if text.is_empty() { println!("{word}") } else { println!("{word}: {text}") }
    }

    /// `policy apply --dry-run`: people get "would change" with the runtime rules
    /// removed (-) and added (+), or "unchanged"; JSON gets {"changed", "dry_run":
    /// true, "before", "after"} with rules as `policy list` shows them.
    pub fn policy_diff(&self, changed: bool, before: &[api::PolicyRule], after: &[api::PolicyRule]) {
        if self.json {
            return print_json(&json!({
                "changed": changed,
                "dry_run": true,
                "before": before.iter().map(rule_value).collect::<Vec<_>>(),
                "after": after.iter().map(rule_value).collect::<Vec<_>>(),
            }));
        }
        if !changed {
            println!("unchanged");
            return;
        }
        println!("would change: {} runtime rule(s) -> {}", before.len(), after.len());
        let line = |sign: char, r: &api::PolicyRule| {
            let name = if r.name.is_empty() { String::new() } else { format!(" ({})", r.name) };
            println!("{sign} {}{name}: {}", r.index, r.summary);
        };
        let same = |a: &api::PolicyRule, b: &api::PolicyRule| a.index == b.index && a.rule == b.rule;
        before.iter().filter(|r| !after.iter().any(|a| same(a, r))).for_each(|r| line('-', r));
        after.iter().filter(|r| !before.iter().any(|b| same(b, r))).for_each(|r| line('+', r));
    }

    pub fn failure(&self, f: &Failure) {
        eprintln!("bypassctl: {}", f.message);
        if self.json {
            print_json(&json!({
                "error": {
                    "kind": f.kind(),
                    "exit_code": f.code,
                    "name": f.name,
                    "message": f.message,
                }
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "NUM"], &[vec!["long-name".into(), "1".into()], vec!["x".into(), "12345".into()]], &[1]);
        assert_eq!(t, "A            NUM\nlong-name      1\nx          12345");
    }
}
