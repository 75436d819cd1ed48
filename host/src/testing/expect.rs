//! Expectations for `weir test --expect`: each line is matched as a subset
//! of the corresponding result line.
//!
//! Objects match when every expected key is present and matches (extra keys
//! in the result are ignored); arrays must have the same length and match
//! element by element; other values must be equal. So
//! `{"outcome": "ok", "emitted": [{"subject": "orders.flagged"}]}` checks the
//! outcome and that exactly one event was emitted, on that subject.

use serde_json::Value;

/// Where `actual` differs from `expected`, as `path: expected X, got Y`.
pub fn mismatches(expected: &Value, actual: &Value) -> Vec<String> {
    let mut out = Vec::new();
    compare(expected, actual, String::new(), &mut out);
    out
}

fn compare(expected: &Value, actual: &Value, path: String, out: &mut Vec<String>) {
    let at = |p: &str| {
        if p.is_empty() {
            "(root)".to_owned()
        } else {
            p.to_owned()
        }
    };
    match (expected, actual) {
        (Value::Object(want), Value::Object(got)) => {
            for (key, want_value) in want {
                let child = format!("{path}.{key}");
                match got.get(key) {
                    Some(got_value) => compare(want_value, got_value, child, out),
                    None => out.push(format!("{child}: expected {want_value}, but it is missing")),
                }
            }
        }
        (Value::Array(want), Value::Array(got)) => {
            if want.len() != got.len() {
                out.push(format!(
                    "{}: expected {} items, got {}: {actual}",
                    at(&path),
                    want.len(),
                    got.len()
                ));
                return;
            }
            for (i, (w, g)) in want.iter().zip(got).enumerate() {
                compare(w, g, format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(w), Value::Number(g)) if w.as_f64() == g.as_f64() => {}
        (w, g) if w == g => {}
        (w, g) => out.push(format!("{}: expected {w}, got {g}", at(&path))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn subset_of_objects_matches() {
        let actual = json!({"outcome": "ok", "emitted": [{"subject": "a", "payload": {"x": 1, "y": 2}}], "logs": []});
        assert!(mismatches(&json!({"outcome": "ok"}), &actual).is_empty());
        assert!(mismatches(&json!({"emitted": [{"payload": {"x": 1.0}}]}), &actual).is_empty());
    }

    #[test]
    fn differences_are_located() {
        let actual = json!({"outcome": "reject", "emitted": []});
        let m = mismatches(
            &json!({"outcome": "ok", "emitted": [{"subject": "a"}], "state": {}}),
            &actual,
        );
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(
            m.iter()
                .any(|s| s == ".outcome: expected \"ok\", got \"reject\""),
            "{m:?}"
        );
        assert!(
            m.iter()
                .any(|s| s.starts_with(".emitted: expected 1 items, got 0")),
            "{m:?}"
        );
        assert!(
            m.iter()
                .any(|s| s.contains(".state") && s.contains("missing")),
            "{m:?}"
        );
    }
}
