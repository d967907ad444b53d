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

/// A TOML deserialisation error with the key path it happened at, as operators
/// write it (`datapath.capacity`, `rules[1].local_ports`; "." for the document).
pub struct KeyedError {
    pub key: String,
    pub error: toml::de::Error,
}

impl KeyedError {
    /// `key `k`: reason`, leaving the key out where the reason already names it.
    pub fn reason(&self) -> String {
        let msg = self.error.message().trim();
        if self.key == "." || self.key.is_empty() || msg.contains(&format!("`{}`", self.key)) {
            msg.to_string()
        } else {
            format!("key `{}`: {msg}", self.key)
        }
    }
}

/// Deserialise TOML text, tracking the key path for errors.
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, KeyedError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|e| KeyedError { key: operator_key(&e.path().to_string()), error: e.into_inner() })
}

/// The key as the operator wrote it: `toml::Spanned` deserialises through a private
/// struct whose field names would otherwise show up in the path.
fn operator_key(path: &str) -> String {
    let kept: Vec<&str> = path.split('.').filter(|seg| !seg.starts_with("$__serde_spanned_private")).collect();
    if kept.is_empty() { ".".to_string() } else { kept.join(".") }
}

/// A syntax error (the text is not TOML at all), with the offending line.
fn syntax_error(text: &str) -> Option<String> {
    let syntax = toml::from_str::<toml::Table>(text).err()?;
    let at = syntax.span().map_or(0, |s| s.start.min(text.len()));
    let line_no = text[..at].matches('\n').count() + 1;
    let line = text[text[..at].rfind('\n').map_or(0, |i| i + 1)..].lines().next().unwrap_or("").trim();
    let msg = syntax.message().trim();
    let msg = if msg.is_empty() { String::new() } else { format!(" ({msg})") };
    Some(format!("invalid TOML at line {line_no}: `{line}`{msg}"))
}

fn name_of(t: Option<&toml::Value>) -> Option<&str> {
    t.and_then(|t| t.get("name")).and_then(|n| n.as_str())
}

/// Parse one rule (a TOML table body) with the config file's parser.
pub fn parse_rule(text: &str, what: &str) -> Result<RuleSpec, PolicyError> {
    from_toml::<RuleSpec>(text).map_err(|e| {
        let table = toml::from_str::<toml::Value>(text).ok();
        let label = name_of(table.as_ref()).map_or_else(|| what.to_string(), |n| format!("{what} ({n})"));
        PolicyError::Text(format!("{label}: {}", syntax_error(text).unwrap_or_else(|| e.reason())))
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
    from_toml::<RulesDoc>(text).map(|d| d.rules).map_err(|mut e| {
        if let Some(syntax) = syntax_error(text) {
            return PolicyError::Text(format!("policy: {syntax}"));
        }
        let at = e.error.span().map_or(0, |s| s.start.min(text.len()));
        let line_no = text[..at].matches('\n').count() + 1;
        // `rules[1].local_ports`: rule 2, key `local_ports`.
        let mut rule = String::new();
        if let Some((i, rest)) = e.key.strip_prefix("rules[").and_then(|r| r.split_once(']'))
            && let Ok(i) = i.parse::<usize>()
        {
            let doc = toml::from_str::<toml::Value>(text).ok();
            let table = doc.as_ref().and_then(|d| d.get("rules")).and_then(|r| r.get(i));
            rule = match name_of(table) {
                Some(n) => format!(", rule {} ({n})", i + 1),
                None => format!(", rule {}", i + 1),
            };
            e.key = rest.trim_start_matches('.').to_string();
        }
        PolicyError::Text(format!("policy line {line_no}{rule}: {}", e.reason()))
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
