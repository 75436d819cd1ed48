//! Names and subjects as NATS accepts them, checked before anything is
//! sent to NATS, so a bad one fails with the key named instead of a
//! cryptic server error (or, worse, an orphaned consumer) later.

/// Longest plugin name: it becomes part of a durable consumer name, a KV
/// bucket and stream name and a directory on the server.
pub const MAX_PLUGIN_NAME: usize = 64;

/// Checks a subject filter: dot-separated non-empty tokens without
/// whitespace; `*` and a final `>` are wildcards.
pub fn validate_subject_filter(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        return Err("is empty");
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err("has an empty token (two dots, or a dot at an end)");
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("contains whitespace");
        }
        if token.contains('>') && (*token != ">" || i + 1 != tokens.len()) {
            return Err("uses `>` other than as the whole last token");
        }
        if token.contains('*') && *token != "*" {
            return Err("uses `*` inside a token");
        }
    }
    Ok(())
}

/// Checks a subject a plugin publishes to: like a filter, but no wildcards.
pub fn validate_publish_subject(subject: &str) -> Result<(), &'static str> {
    validate_subject_filter(subject)?;
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err("contains a wildcard");
    }
    Ok(())
}

/// Checks a JetStream stream name.
pub fn validate_stream_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 255 {
        return Err("is longer than 255 bytes");
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err("may not contain whitespace, `.`, `*`, `>`, `/` or `\\`");
    }
    Ok(())
}

/// Letters, digits, `-` and `_`: what a KV bucket name (and so a plugin
/// name, which ends up in one) may hold.
fn is_bucket_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Checks a plugin name (the file stem of `NAME.wasm`).
pub fn validate_plugin_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("plugin name is empty".into());
    }
    if name.len() > MAX_PLUGIN_NAME {
        return Err(format!(
            "plugin name {name:?} is longer than {MAX_PLUGIN_NAME} characters"
        ));
    }
    if !name.chars().all(is_bucket_char) {
        return Err(format!(
            "plugin name {name:?} may only hold letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

/// Checks the prefix of the plugins' KV buckets.
pub fn validate_bucket_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("is empty");
    }
    if prefix.len() > 64 {
        return Err("is longer than 64 characters");
    }
    if !prefix.chars().all(is_bucket_char) {
        return Err("may only hold letters, digits, `-` and `_`");
    }
    Ok(())
}

/// Checks a NATS server URL list: comma-separated, each `host:port` or
/// `scheme://host[:port]` with a scheme the client speaks.
pub fn validate_nats_url(urls: &str) -> Result<(), String> {
    if urls.trim().is_empty() {
        return Err("is empty".into());
    }
    for url in urls.split(',').map(str::trim) {
        let rest = match url.split_once("://") {
            Some((scheme, rest)) => {
                if !matches!(scheme, "nats" | "tls" | "ws" | "wss") {
                    return Err(format!(
                        "{url:?} has scheme {scheme:?}; use nats://, tls://, ws:// or wss://"
                    ));
                }
                rest
            }
            None => url,
        };
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let host = host.split('/').next().unwrap_or_default();
        if host.is_empty() || host.starts_with(':') {
            return Err(format!("{url:?} names no host"));
        }
        if let Some((_, port)) = host.rsplit_once(':')
            && !host.ends_with(']')
            && port.parse::<u16>().is_err()
        {
            return Err(format!("{url:?} has an invalid port {port:?}"));
        }
    }
    Ok(())
}

/// Whether some subject matches both filters `a` and `b`.
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) => {
                if x != y && x != "*" && y != "*" {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names() {
        for ok in ["fraud", "run-1", "a_b", &"x".repeat(64)] {
            assert!(validate_plugin_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "x*", "ünï", "a.b", "a>", &"x".repeat(65)] {
            assert!(validate_plugin_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_names_and_prefixes() {
        assert!(validate_stream_name("ORDERS").is_ok());
        for bad in ["", "bad name", "a.b", "a*", "a/b", "a\tb"] {
            assert!(validate_stream_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_bucket_prefix("weir_state").is_ok());
        for bad in ["", "a.b", "a b", "ä"] {
            assert!(validate_bucket_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nats_urls() {
        for ok in [
            "nats://127.0.0.1:4222",
            "127.0.0.1:4222",
            "nats://a:4222, nats://b:4222",
            "tls://user:pw@host",
            "nats://[::1]:4222",
        ] {
            assert!(validate_nats_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            " ",
            "http://x:4222",
            "nats://",
            "nats://:4222",
            "nats://h:port",
        ] {
            assert!(validate_nats_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn overlapping_subjects() {
        for (a, b) in [
            ("orders.>", "orders.placed"),
            ("orders.*", "orders.placed"),
            ("orders.*.x", "orders.a.*"),
            ("a.b", "a.b"),
            (">", "anything.at.all"),
        ] {
            assert!(subjects_overlap(a, b), "{a} {b}");
            assert!(subjects_overlap(b, a), "{b} {a}");
        }
        for (a, b) in [
            ("orders.>", "order.placed"),
            ("orders.*", "orders.placed.x"),
            ("a.b", "a.c"),
            ("a", "a.b"),
            ("a.>", "a"),
        ] {
            assert!(!subjects_overlap(a, b), "{a} {b}");
            assert!(!subjects_overlap(b, a), "{b} {a}");
        }
    }
}
