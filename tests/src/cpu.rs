//! CPU time from /proc, for benchmarks that report what an event costs in
//! CPU beside what it costs in wall time: a rate on a shared 2-core
//! machine says how fast a consumer went, the CPU per event of it and of
//! the server, and the idle share of the machine, say where the time went.
//!
//! Linux only; times come in clock ticks, which are 10 ms (`USER_HZ` is
//! 100 on every Linux this runs on), so a figure needs a run of a second
//! or more to mean much.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::time::Duration;

const TICK: Duration = Duration::from_millis(10);

/// Fields of `/proc/<pid>/stat` after the command name and state.
fn stat_fields(pid: &str) -> Vec<u64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// The numbers of a `stat` line from field 4 on. The command name (field
/// 2) may itself contain spaces and parentheses, so it ends at the last
/// `)`.
fn parse_stat(stat: &str) -> Vec<u64> {
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

/// `total µs = consumer + server (idle%)`, the consumer being this process
/// and the children it waited for.
impl std::fmt::Display for PerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>5.0} µs = {:>5.0} + {:>4.0} ({:.0}% idle)",
            self.total_us(),
            self.this_us + self.children_us,
            self.server_us,
            self.idle * 100.0
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        // pid, comm, state, then fields 4 to 17: utime is 14 (1401 ticks),
        // stime 15, cutime 16, cstime 17; field 19 (nice) is negative.
        let line = "4242 (tokio (rt) worker) S 1 2 3 4 5 6 7 8 9 10 1401 1501 1601 1701 20 -5 3";
        let f = parse_stat(line);
        assert_eq!((f[10], f[11], f[12], f[13]), (1401, 1501, 1601, 1701));
        assert_eq!(f[15], 0, "a negative field reads as 0, not as a panic");
    }

    #[test]
    fn a_meter_charges_the_cpu_this_process_spends() {
        let meter = Meter::start(std::process::id());
        let before = this_process();
        let started = std::time::Instant::now();
        // Spin until the kernel has counted 50 ms of it (five ticks).
        let mut x = 0u64;
        while this_process() < before + Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no CPU counted"
            );
        }
        let spent = meter.per_event(1);
        assert!(spent.this_us >= 50_000.0, "{spent:?}");
        // The server here is this process too, so it is charged the same.
        assert!(spent.server_us >= 50_000.0, "{spent:?}");
        assert_eq!(spent.children_us, 0.0);
        assert!((0.0..=1.0).contains(&spent.idle), "{spent:?}");
    }
}
