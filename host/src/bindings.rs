//! The one place the host's bindings to `wit/plugin.wit` are generated.
//! `wit/plugin.wit` documents them; the generated items carry only part
//! of that text.
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "weir:plugin/plugin",
    // Host imports may await (state reads go to JetStream KV) and may trap
    // (a broken state store fails the event instead of lying to the guest).
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::weir::plugin::types::{Error as GuestError, Header as WitHeader, LimitError};
