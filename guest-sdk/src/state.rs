//! Durable key-value state private to this plugin.
//!
//! Reads see this event's earlier writes; writes are committed only if the
//! event succeeds.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bindings::weir::plugin::state;
use crate::{Error, LimitError, reject};

/// The raw value under `key`.
pub fn get(key: &str) -> Option<Vec<u8>> {
    state::get(key)
}

/// Store raw bytes under `key`.
pub fn set(key: &str, value: &[u8]) -> Result<(), LimitError> {
    state::set(key, value)
}

/// Remove `key`.
pub fn delete(key: &str) -> Result<(), LimitError> {
    state::delete(key)
}

/// The value under `key` decoded from JSON. A stored value that does not
/// decode as `T` is reported as a rejection naming the key.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    match state::get(key) {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            reject(format!(
                "state key {key:?} does not hold the expected JSON: {e}"
            ))
        }),
    }
}

/// Store `value` under `key` as JSON.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), Error> {
    let bytes = serde_json::to_vec(value)?;
    Ok(state::set(key, &bytes)?)
}
