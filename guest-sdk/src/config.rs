//! The plugin's settings, from the `[config]` table of its manifest.

use std::str::FromStr;

use crate::bindings::weir::plugin::config;
use crate::{Error, reject};

/// The setting `key` as the host gives it (strings as written, numbers and
/// booleans in their TOML spelling, arrays and tables as JSON).
pub fn get(key: &str) -> Option<String> {
    config::get(key)
}

/// Every setting, sorted by key.
pub fn all() -> Vec<(String, String)> {
    config::all()
}

/// The setting `key` parsed as `T`. A value that does not parse is a
/// configuration mistake, reported as a rejection naming the key.
pub fn parse<T: FromStr>(key: &str) -> Result<Option<T>, Error>
where
    T::Err: std::fmt::Display,
{
    match config::get(key) {
        None => Ok(None),
        Some(raw) => raw
            .parse()
            .map(Some)
            .map_err(|e| reject(format!("config key {key:?} = {raw:?} is invalid: {e}"))),
    }
}
