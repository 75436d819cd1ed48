//! CPU time from /proc, for benchmarks that report what an event costs in
//! CPU beside what it costs in wall time: on a shared 2-core machine a
//! consumer's rate moves by a third from one run to the next, while the
//! CPU it spends per event moves far less, and says where the time went.
//!
//! Linux only; times come in clock ticks, which are 10 ms (`USER_HZ` is
//! 100 on every Linux this runs on), so a figure needs a run of a second
//! or more to mean much.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::time::Duration;

const TICK: Duration = Duration::from_millis(10);

/// Fields of `/proc/<pid>/stat` after the command name, which may itself
/// contain spaces and parentheses.
fn stat_fields(pid: &str) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    // The state letter (field 3) is the only field that is not a number.
    after
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// User plus system CPU time of process `pid` so far.
pub fn process(pid: u32) -> Duration {
    let f = stat_fields(&pid.to_string());
    // utime and stime are fields 14 and 15 of the line, 11 and 12 here.
    TICK * (f[10] + f[11]) as u32
}

/// User plus system CPU time of this process so far, all threads.
pub fn this_process() -> Duration {
    process(std::process::id())
}

/// CPU time of this process's children that have ended and been waited
/// for (a consumer run with `Command::output`, say).
pub fn waited_children() -> Duration {
    let f = stat_fields("self");
    // cutime and cstime are fields 16 and 17 of the line.
    TICK * (f[12] + f[13]) as u32
}

/// The whole machine's idle and total time so far, in ticks, summed over
/// its cores (the `cpu` line of /proc/stat).
fn machine() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap();
    let t: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is
    // already inside user.
    let total = t.iter().take(8).sum();
    (t[3] + t[4], total)
}

/// CPU time spent over a stretch of a benchmark: by this process, by the
/// children it waited for, and by one server process, plus how much of
/// the machine sat idle.
pub struct Meter {
    server: u32,
    this: Duration,
    children: Duration,
    server_start: Duration,
    machine: (u64, u64),
}

/// What a [`Meter`] saw, per event.
#[derive(Debug, Clone, Copy)]
pub struct PerEvent {
    /// This process (a host it runs in-process), µs per event.
    pub this_us: f64,
    /// Children that ended in the stretch (a consumer it ran), µs per event.
    pub children_us: f64,
    /// The server, µs per event.
    pub server_us: f64,
    /// Share of the machine's cores that sat idle, 0 to 1.
    pub idle: f64,
}

impl PerEvent {
    /// Everything measured, µs per event.
    pub fn total_us(&self) -> f64 {
        self.this_us + self.children_us + self.server_us
    }
}

impl Meter {
    /// Start measuring, with `server` the pid of the server to charge.
    pub fn start(server: u32) -> Self {
        Meter {
            server,
            this: this_process(),
            children: waited_children(),
            server_start: process(server),
            machine: machine(),
        }
    }

    /// What was spent since [`Meter::start`], over `events` events.
    pub fn per_event(&self, events: usize) -> PerEvent {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / events as f64;
        let (idle, total) = machine();
        let (idle0, total0) = self.machine;
        PerEvent {
            this_us: per(this_process() - self.this),
            children_us: per(waited_children() - self.children),
            server_us: per(process(self.server) - self.server_start),
            idle: (idle - idle0) as f64 / (total - total0).max(1) as f64,
        }
    }
}
