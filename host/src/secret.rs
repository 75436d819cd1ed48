//! Shared secrets: the tokens that guard the admin endpoint and control
//! requests, read from the config or a file, and checked without leaking
//! through timing.

use std::path::Path;

/// A token given inline or in a file (trailing whitespace ignored); `key`
/// names the setting in errors (`admin`, `control`).
pub fn read_token(
    inline: Option<&str>,
    file: Option<&Path>,
    key: &str,
) -> anyhow::Result<Option<String>> {
    match (inline, file) {
        (Some(token), _) => Ok(Some(token.to_owned())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("reading `{key}.token-file` {}: {e}", path.display())
            })?;
            let token = text.trim_end().to_owned();
            anyhow::ensure!(
                !token.is_empty(),
                "`{key}.token-file` {} is empty",
                path.display()
            );
            Ok(Some(token))
        }
        (None, None) => Ok(None),
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 9110), and clients differ in how they spell it.
pub fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Whether `given` is `expected`, compared without an early exit, so the
/// time an answer takes does not reveal how much of a guessed token was
/// right.
pub fn matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in ["Bearer t0k", "bearer t0k", "BEARER  t0k"] {
            assert_eq!(super::bearer_credentials(value), Some("t0k"), "{value}");
        }
        assert_eq!(super::bearer_credentials("Basic dTpw"), None);
        assert_eq!(super::bearer_credentials("Bearer"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(super::matches("secret", "secret"));
        assert!(!super::matches("secret", "secreT"));
        assert!(!super::matches("secret", "secret!"));
    }

    #[test]
    fn token_file_must_exist_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let read = |file: &str| super::read_token(None, Some(&dir.path().join(file)), "control");
        let missing = read("missing").unwrap_err().to_string();
        assert!(missing.contains("control.token-file"), "{missing}");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = read("empty").unwrap_err().to_string();
        assert!(empty.contains("is empty"), "{empty}");
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        assert_eq!(read("token").unwrap().as_deref(), Some("s3cret"));
        assert_eq!(
            super::read_token(Some("inline"), None, "x")
                .unwrap()
                .as_deref(),
            Some("inline")
        );
        assert_eq!(super::read_token(None, None, "x").unwrap(), None);
    }
}
