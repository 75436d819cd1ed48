//! Helpers for the crate's unit tests.

use std::time::Duration;

/// Yield until `done` holds; panics naming `what` if it has not within
/// 10 s, so a test whose condition never comes fails instead of spinning.
pub(crate) async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never: {what}"));
}
