//! How far a long command is (`vmm compare`, `vmm bench dedup`): one line on
//! standard error, redrawn in place with the time left, only when standard
//! error is a terminal; notes (a policy skipped, a run that failed) as
//! lines of their own unless the command is quiet.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Where a long command says how far it is.
pub trait Progress {
    /// A line people should read (a policy skipped, a run that failed).
    fn note(&mut self, line: &str);
    /// `done` of `total` steps are over and `next` starts.
    fn step(&mut self, done: u32, total: u32, next: &str);
}

/// Any `FnMut(&str)` takes both notes and steps as lines (tests, callers
/// that log).
impl<F: FnMut(&str)> Progress for F {
    fn note(&mut self, line: &str) {
        self(line);
    }

    fn step(&mut self, done: u32, total: u32, next: &str) {
        self(&format!("{done}/{total} done; {next}"));
    }
}

/// Progress on standard error for people.
#[derive(Debug)]
pub struct Terminal {
    prefix: &'static str,
    started: Instant,
    /// Draw the progress line (standard error is a terminal, not quiet).
    draw: bool,
    quiet: bool,
    /// A progress line is on the screen.
    drawn: bool,
}

impl Terminal {
    /// Progress of `prefix` (`vmm compare`): the line is drawn only on a
    /// terminal; nothing at all but errors when `quiet`.
    pub fn new(prefix: &'static str, quiet: bool) -> Self {
        let draw = !quiet && std::io::stderr().is_terminal();
        Self { prefix, started: Instant::now(), draw, quiet, drawn: false }
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            self.drawn = false;
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Progress for Terminal {
    fn note(&mut self, line: &str) {
        if !self.quiet {
            self.clear();
            eprintln!("{}: {line}", self.prefix);
        }
    }

    fn step(&mut self, done: u32, total: u32, next: &str) {
        if !self.draw {
            return;
        }
        let elapsed = self.started.elapsed();
        let left = eta(elapsed, done, total).map_or_else(|| "?".to_string(), fmt_duration);
        eprint!(
            "\r\x1b[K{}: {done}/{total} done, {next}; {} so far, about {left} left",
            self.prefix,
            fmt_duration(elapsed)
        );
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }
}

/// The time left when `done` of `total` steps took `elapsed`, at the same
/// pace; None before the first step is over.
pub fn eta(elapsed: Duration, done: u32, total: u32) -> Option<Duration> {
    (done > 0).then(|| elapsed.mul_f64(f64::from(total.saturating_sub(done)) / f64::from(done)))
}

/// `42 s`, `3 min 05 s`, `1 h 02 min`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_goes_at_the_pace_so_far() {
        assert_eq!(eta(Duration::from_secs(30), 0, 10), None);
        assert_eq!(eta(Duration::from_secs(30), 3, 10), Some(Duration::from_secs(70)));
        assert_eq!(eta(Duration::from_secs(30), 10, 10), Some(Duration::ZERO));
        assert_eq!(fmt_duration(Duration::from_secs(42)), "42 s");
        assert_eq!(fmt_duration(Duration::from_secs(185)), "3 min 05 s");
        assert_eq!(fmt_duration(Duration::from_secs(3720)), "1 h 02 min");
    }

    #[test]
    fn closures_log_notes_and_steps() {
        let mut lines = Vec::new();
        {
            let mut log = |l: &str| lines.push(l.to_string());
            let p: &mut dyn Progress = &mut log;
            p.note("kernel skipped");
            p.step(2, 5, "off repeat 2/3");
        }
        assert_eq!(lines, ["kernel skipped", "2/5 done; off repeat 2/3"]);
    }
}
