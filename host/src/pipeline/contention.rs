//! Unordered runs that keep colliding on the same state keys take turns.
//!
//! Runs of a plugin without an ordering key execute in parallel and commit
//! optimistically. A run reads the writes other runs have *submitted*, so
//! runs that execute one after another chain on each other's state; runs
//! that execute at the same moment and touch the same key cannot, and one
//! of them must run again. When that happens to many commits, this gate
//! makes runs execute one at a time, each submitting before the next
//! starts. Execution takes microseconds and commits milliseconds, so the
//! commits still overlap; parallel execution is tried again after a while.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Commits judged together.
const WINDOW: u32 = 32;
/// Share of conflicting commits (1 in this many) that makes runs take turns.
const CONFLICT_SHARE: u32 = 8;
/// How long runs take turns before parallel execution is tried again.
const TAKE_TURNS_FOR: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Window {
    commits: u32,
    conflicts: u32,
    taking_turns_until: Option<Instant>,
}

/// One per plugin pipeline.
#[derive(Default)]
pub(crate) struct Contention {
    turns: tokio::sync::Mutex<()>,
    window: Mutex<Window>,
}

impl Contention {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        // Counter updates cannot leave the window half-changed.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for this run's turn when runs are taking turns; hold the guard
    /// until the run has submitted its commit.
    pub(super) async fn enter(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let taking_turns = self
            .window()
            .taking_turns_until
            .is_some_and(|until| Instant::now() < until);
        if taking_turns {
            Some(self.turns.lock().await)
        } else {
            None
        }
    }

    /// Record a commit's outcome.
    pub(super) fn record(&self, conflict: bool) {
        let mut window = self.window();
        window.commits += 1;
        window.conflicts += u32::from(conflict);
        if window.commits >= WINDOW {
            if window.conflicts * CONFLICT_SHARE >= window.commits {
                let now = Instant::now();
                if window.taking_turns_until.is_none_or(|until| until < now) {
                    tracing::debug!(
                        conflicts = window.conflicts,
                        commits = window.commits,
                        "unordered runs keep colliding on state keys; taking turns"
                    );
                }
                window.taking_turns_until = Some(now + TAKE_TURNS_FOR);
            }
            window.commits = 0;
            window.conflicts = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frequent_conflicts_make_runs_take_turns() {
        let gate = Contention::default();
        assert!(gate.enter().await.is_none());
        for i in 0..WINDOW {
            gate.record(i % 2 == 0);
        }
        let turn = gate.enter().await;
        assert!(turn.is_some());
        drop(turn);
        // Rare conflicts do not.
        let calm = Contention::default();
        for i in 0..WINDOW {
            calm.record(i == 0);
        }
        assert!(calm.enter().await.is_none());
    }
}
