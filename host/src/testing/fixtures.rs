//! The JSON Lines formats of `weir test`: events in, results out.
//!
//! An input line:
//!
//! ```json
//! {"subject": "orders.placed", "headers": {"Customer-Id": "c-1"}, "payload": {"order_id": "o-1"}}
//! ```
//!
//! `payload` is any JSON value, sent as its compact JSON text; use
//! `payload_text` for a raw string (malformed JSON, say) or `payload_hex`
//! for bytes. `id`, `sequence` and `attempt` are optional.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::event::{Emitted, Event, Header};
use crate::sandbox::Invocation;
use crate::state::StateChange;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    subject: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    sequence: Option<u64>,
    #[serde(default)]
    attempt: Option<u32>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    payload_text: Option<String>,
    #[serde(default)]
    payload_hex: Option<String>,
}

/// Parse one line of an events file.
pub fn parse_event(line: &str) -> Result<Event, String> {
    let spec: EventLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let payload = match (spec.payload, spec.payload_text, spec.payload_hex) {
        (Some(v), None, None) => serde_json::to_vec(&v).map_err(|e| e.to_string())?,
        (None, Some(t), None) => t.into_bytes(),
        (None, None, Some(h)) => hex::decode(h.trim()).map_err(|e| format!("payload_hex: {e}"))?,
        (None, None, None) => Vec::new(),
        _ => return Err("give at most one of payload, payload_text, payload_hex".into()),
    };
    Ok(Event {
        id: spec.id.unwrap_or_default(),
        subject: spec.subject,
        headers: spec
            .headers
            .into_iter()
            .map(|(k, v)| Header::new(k, v))
            .collect(),
        payload,
        sequence: spec.sequence.unwrap_or(0),
        attempt: spec.attempt.unwrap_or(1),
        timestamp_ms: 0,
    })
}

/// A payload as JSON: the decoded value when it is JSON, else its text,
/// else its bytes in hex; the key says which.
fn payload_fields(payload: &[u8], out: &mut serde_json::Map<String, Value>) {
    if let Ok(value) = serde_json::from_slice::<Value>(payload) {
        out.insert("payload".into(), value);
    } else if let Ok(text) = std::str::from_utf8(payload) {
        out.insert("payload_text".into(), Value::String(text.into()));
    } else {
        out.insert("payload_hex".into(), Value::String(hex::encode(payload)));
    }
}

fn headers_json(headers: &[Header]) -> Value {
    let mut map = serde_json::Map::new();
    for h in headers {
        map.insert(h.key.clone(), Value::String(h.value.clone()));
    }
    Value::Object(map)
}

/// Emitted events as JSON: subject, headers, payload (see `payload_fields`).
pub fn emitted_json(emitted: &[Emitted]) -> Value {
    emitted
        .iter()
        .map(|e| {
            let mut m = serde_json::Map::new();
            m.insert("subject".into(), Value::String(e.subject.clone()));
            if !e.headers.is_empty() {
                m.insert("headers".into(), headers_json(&e.headers));
            }
            payload_fields(&e.payload, &mut m);
            Value::Object(m)
        })
        .collect()
}

/// One result line of `weir test`.
pub fn result_json(event: &Event, invocation: &Invocation) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("id".into(), Value::String(event.id.clone()));
    if let Value::Object(outcome) = serde_json::to_value(&invocation.outcome).unwrap_or(Value::Null)
    {
        out.extend(outcome);
    }
    out.insert("emitted".into(), emitted_json(&invocation.emitted));
    let mut state = serde_json::Map::new();
    for change in &invocation.state_changes {
        let value = match change {
            StateChange::Set { value, .. } => serde_json::from_slice(value)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(value).into_owned())),
            StateChange::Delete { .. } => Value::Null,
        };
        state.insert(change.key().to_owned(), value);
    }
    out.insert("state".into(), Value::Object(state));
    out.insert(
        "logs".into(),
        serde_json::to_value(&invocation.logs).unwrap_or(json!([])),
    );
    out.insert(
        "duration_us".into(),
        json!(invocation.duration.as_micros() as u64),
    );
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_payload_kinds() {
        let e = parse_event(r#"{"subject":"a","payload":{"x":1}}"#).unwrap();
        assert_eq!(e.payload, br#"{"x":1}"#);
        let e = parse_event(r#"{"subject":"a","payload_text":"not json"}"#).unwrap();
        assert_eq!(e.payload, b"not json");
        let e =
            parse_event(r#"{"subject":"a","payload_hex":"00ff","headers":{"K":"v"},"attempt":3}"#)
                .unwrap();
        assert_eq!(e.payload, [0, 255]);
        assert_eq!(e.header("k"), Some("v"));
        assert_eq!(e.attempt, 3);
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(
            parse_event(r#"{"payload":1}"#)
                .unwrap_err()
                .contains("subject")
        );
        assert!(
            parse_event(r#"{"subject":"a","paylod":1}"#)
                .unwrap_err()
                .contains("paylod")
        );
        assert!(parse_event(r#"{"subject":"a","payload":1,"payload_text":"x"}"#).is_err());
        assert!(parse_event("not json").is_err());
    }
}
