//! Write [Weir](https://example.invalid/weir) plugins in Rust.
//!
//! A plugin is a type that implements [`Plugin`], exported with
//! [`export_plugin!`], built for `wasm32-wasip2`:
//!
//! ```no_run
//! use weir_guest::{Event, Plugin, Result, emit, state};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: String, amount_cents: u64 }
//!
//! struct BigOrders;
//!
//! impl Plugin for BigOrders {
//!     fn handle(event: Event) -> Result {
//!         // Malformed JSON rejects the event: it goes to the dead-letter stream.
//!         let order: Order = event.json()?;
//!         let threshold: u64 = weir_guest::config::parse("threshold")?.unwrap_or(10_000);
//!         if order.amount_cents > threshold {
//!             // Buffered: published only if this call returns Ok.
//!             emit::json("orders.big", &serde_json::json!({ "order": order.id }))?;
//!         }
//!         // Also buffered, and committed together with the outbox.
//!         let seen = state::get_json::<u64>("seen")?.unwrap_or(0);
//!         state::set_json("seen", &(seen + 1))?;
//!         Ok(())
//!     }
//! }
//!
//! weir_guest::export_plugin!(BigOrders);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`, put the
//! `.wasm` next to a manifest `.toml` of the same name, and test it with
//! `weir test` or the `weir::testing` API, no broker needed.

// The generated bindings refer to this crate by its public name so that the
// `export_plugin!` macro works from plugin crates that do not depend on
// wit-bindgen themselves.
extern crate self as weir_guest;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Raw bindings generated from `wit/plugin.wit`. Prefer the wrappers in this
/// crate; these are here for what they do not cover.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "weir:plugin/plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "weir_guest::bindings",
        runtime_path: "weir_guest::__wit_bindgen::rt",
    });
}

mod event;
mod failure;

pub mod config;
pub mod emit;
pub mod log;
pub mod state;

pub use bindings::weir::plugin::types::{Error, Event, Header, LimitError, RetryAfter};
pub use failure::{describe_limit, reject, retry, retry_after};

/// What [`Plugin::handle`] returns: `Ok(())` when the event is done.
pub type Result<T = (), E = Error> = std::result::Result<T, E>;

/// A Weir plugin: one function called per event.
pub trait Plugin {
    /// Handle one event.
    ///
    /// Return `Ok(())` and the host publishes what you emitted, commits your
    /// state writes and acknowledges the event. Return [`retry`] for a
    /// transient failure (the event is redelivered later, with backoff) or
    /// [`reject`] for an event that can never succeed (it is dead-lettered).
    /// A panic is treated like a retry and is reported with its message.
    fn handle(event: Event) -> Result;
}

/// Export a [`Plugin`] implementation as the component's `handler`.
///
/// Call it once, at the crate root of a `cdylib` crate:
///
/// ```ignore
/// weir_guest::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            struct WeirPluginExport;

            impl $crate::bindings::exports::weir::plugin::handler::Guest for WeirPluginExport {
                fn handle(event: $crate::Event) -> $crate::Result {
                    <$plugin as $crate::Plugin>::handle(event)
                }
            }

            // Only the wasm build exports the component ABI; a native build
            // (plugin crates run their host-side tests natively) cannot link
            // symbol names like `weir:plugin/handler@0.1.0#handle`.
            #[cfg(target_family = "wasm")]
            $crate::bindings::__export_plugin_world!(WeirPluginExport with_types_in $crate::bindings);
        };
    };
}
