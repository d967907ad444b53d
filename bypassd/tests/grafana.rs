//! The packaged Grafana dashboard queries only metrics bypassd serves.
use bypassd::metrics::registry::metric_names;
use serde_json::Value;

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) | ("definition", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Identifiers that name a bypassd metric (`bypassd_...`).
fn metric_refs(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("bypassd_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_served() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/grafana/bypassd.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let panels = dash["panels"].as_array().expect("panels");
    for p in panels {
        let mut e = Vec::new();
        exprs(&p["targets"], &mut e);
        assert!(!e.is_empty(), "panel {} queries nothing", p["title"]);
    }
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    let served = metric_names();
    let mut used = 0;
    for e in &all {
        for m in metric_refs(e) {
            assert!(served.contains(&m), "the dashboard queries {m}, which bypassd does not serve (serves {served:?}); in: {e}");
            used += 1;
        }
    }
    assert!(used >= 10, "only {used} metric references found");
    // The key families are on the dashboard.
    for m in ["bypassd_redirected_bytes_total", "bypassd_passed_messages_total", "bypassd_accelerated_sockets", "bypassd_datapath_state"] {
        assert!(all.iter().any(|e| e.contains(m)), "{m} is not on the dashboard");
    }
}

#[test]
fn metric_refs_finds_names_in_promql() {
    assert_eq!(metric_refs("rate(bypassd_a_total{x=\"y\"}[5m]) / bypassd_b"), ["bypassd_a_total", "bypassd_b"]);
}
