//! Diagnostics for rules sent as TOML text (over D-Bus): errors name the rule (by
//! number and name), the key and the reason, or the line of a syntax error. Also the
//! hash that identifies an effective policy.
use super::{Action, PolicyError, RuleSource, RuleSpec};
use sha2::{Digest, Sha256};

/// sha256 (hex) over the default action and the effective rules with their sources.
pub fn sha256(default: Action, rules: &[(RuleSource, RuleSpec)]) -> String {
    let mut h = Sha256::new();
    h.update(format!("default = {:?}\n", default.as_str()));
    for (src, rule) in rules {
        h.update(format!("# {}\n{}\n", src.as_str(), toml::to_string(rule).unwrap_or_default()));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The readable part of a TOML error: `key `k`: reason` where the key is known,
/// the line for syntax errors.
fn toml_reason(text: &str, e: &toml::de::Error) -> String {
    if let Err(syntax) = toml::from_str::<toml::Table>(text) {
        let at = syntax.span().map_or(0, |s| s.start.min(text.len()));
        let line_no = text[..at].matches('\n').count() + 1;
        let line = text[text[..at].rfind('\n').map_or(0, |i| i + 1)..].lines().next().unwrap_or("").trim();
        let msg = syntax.message().trim();
        let msg = if msg.is_empty() { String::new() } else { format!(" ({msg})") };
        return format!("invalid TOML at line {line_no}: `{line}`{msg}");
    }
    let msg = e.message().trim();
    let span = e.span();
    let at = span.as_ref().map(|s| s.start.min(text.len())).unwrap_or(0);
    let line_no = text[..at].matches('\n').count() + 1;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    // Value errors point at the value of `key = value`; name the key.
    let key = line
        .split_once('=')
        .filter(|(k, _)| at >= line_start + k.len())
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (msg.is_empty(), key) {
        (true, _) => format!("invalid TOML at line {line_no}: `{}`", line.trim()),
        (false, Some(k)) if !msg.contains(&format!("`{k}`")) => format!("key `{k}`: {msg}"),
        (false, _) => msg.to_string(),
    }
}

/// The `name` of a rule, if the text is TOML at all.
fn rule_name(table: Option<&toml::Table>) -> Option<String> {
    table.and_then(|t| t.get("name")).and_then(|n| n.as_str()).map(String::from)
}

/// Parse one rule (a TOML table body) with the config file's parser.
pub fn parse_rule(text: &str, what: &str) -> Result<RuleSpec, PolicyError> {
    toml::from_str::<RuleSpec>(text).map_err(|e| {
        let name = rule_name(toml::from_str::<toml::Table>(text).ok().as_ref());
        let label = name.map(|n| format!("{what} ({n})")).unwrap_or_else(|| what.to_string());
        PolicyError::Text(format!("{label}: {}", toml_reason(text, &e)))
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesDoc {
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

/// Parse a policy document (`[[rules]]` tables); errors name the rule by number and name.
pub fn parse_rules_doc(text: &str) -> Result<Vec<RuleSpec>, PolicyError> {
    toml::from_str::<RulesDoc>(text).map(|d| d.rules).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start.min(text.len()));
        let line_no = text[..at].matches('\n').count() + 1;
        // Which `[[rules]]` table the error is in.
        let n = text[..at]
            .lines()
            .filter(|l| {
                l.trim().trim_start_matches("[[").trim_end_matches("]]").trim() == "rules" && l.trim().starts_with("[[")
            })
            .count();
        let table = toml::from_str::<toml::Table>(text).ok();
        let name = table
            .as_ref()
            .and_then(|t| t.get("rules"))
            .and_then(|r| r.as_array())
            .and_then(|a| a.get(n.wrapping_sub(1)))
            .and_then(|r| r.as_table())
            .and_then(|r| rule_name(Some(r)));
        let rule = match (n, name) {
            (0, _) => String::new(),
            (n, Some(name)) => format!(", rule {n} ({name})"),
            (n, None) => format!(", rule {n}"),
        };
        let reason = toml_reason(text, &e);
        if reason.starts_with("invalid TOML") {
            return PolicyError::Text(format!("policy: {reason}"));
        }
        PolicyError::Text(format!("policy line {line_no}{rule}: {reason}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_errors_name_the_rule_key_and_reason() {
        let e = parse_rule("name = \"web\"\naction = \"accelerate\"\nremote_cidr = \"10.0.0.1/8\"\n", "new rule 1")
            .unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, PolicyError::Text(_)));
        assert!(m.starts_with("new rule 1 (web): key `remote_cidr`: `10.0.0.1/8` has host bits set"), "{m}");
        let m = parse_rule("action = \"fast\"", "new rule 2").unwrap_err().to_string();
        assert!(m.starts_with("new rule 2: key `action`: unknown variant `fast`"), "{m}");
        let m = parse_rule("action = ", "new rule 1").unwrap_err().to_string();
        assert!(m.starts_with("new rule 1: invalid TOML at line 1: `action =`"), "{m}");
        let m = parse_rule("action", "new rule 1").unwrap_err().to_string();
        assert_eq!(m, "new rule 1: invalid TOML at line 1: `action` (expected `.`, `=`)");
        let m = parse_rule("remote_ports = 8080", "new rule 1").unwrap_err().to_string();
        assert!(m.contains("missing field `action`"), "{m}");
        assert_eq!(
            parse_rule("action = \"kernel\"\nlocal_ports = \"80-90\"", "r").unwrap().summary(),
            "kernel local_ports=80-90"
        );
    }

    #[test]
    fn policy_doc_errors_name_the_rule_by_number_and_name() {
        let doc =
            "[[rules]]\naction = \"kernel\"\n\n[[rules]]\nname = \"web\"\naction = \"accelerate\"\nlocal_ports = 0\n";
        let m = parse_rules_doc(doc).unwrap_err().to_string();
        assert!(m.starts_with("policy line 7, rule 2 (web): key `local_ports`: port 0 is out of range"), "{m}");
        let m = parse_rules_doc("[[rules]\naction = 1").unwrap_err().to_string();
        assert!(m.starts_with("policy: invalid TOML at line 1: `[[rules]`"), "{m}");
        let m = parse_rules_doc("[[policy.rules]]\naction = \"kernel\"\n").unwrap_err().to_string();
        assert!(m.contains("unknown field `policy`"), "{m}");
        assert_eq!(parse_rules_doc("").unwrap(), vec![]);
        assert_eq!(parse_rules_doc("[[rules]]\naction = \"kernel\"\n").unwrap().len(), 1);
    }
}
