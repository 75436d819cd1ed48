//! Log lines that land in the host's tracing output, tagged with the plugin,
//! its version and the event id.

pub use crate::bindings::weir::plugin::log::Level;
use crate::bindings::weir::plugin::log::log;

/// Log `message` at `level`.
pub fn write(level: Level, message: &str) {
    log(level, message)
}

/// Log at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// Log at info level.
pub fn info(message: &str) {
    log(Level::Info, message)
}

/// Log at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// Log at error level.
pub fn error(message: &str) {
    log(Level::Error, message)
}
