//! A one-line progress display on stderr: epoch, loss, images/s, data-wait fraction and ETA. On a terminal it
//! redraws in place; otherwise (CI logs, files) it prints a line at most every `interval`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// What the progress line shows.
#[derive(Clone, Debug, Default)]
pub struct Line<'a> {
    /// The current epoch (0-based) of `epochs`.
    pub epoch: usize,
    pub epochs: usize,
    /// Steps finished so far (of the whole run, resumed ones excluded from the rate).
    pub done: u64,
    pub loss: f64,
    pub img_per_s: f64,
    pub wait: f64,
    /// Appended as is (e.g. a collapse warning); empty for none.
    pub note: &'a str,
}

pub struct Progress {
    total_steps: u64,
    /// Steps done before this process started (a resumed run): not counted in the rate or the ETA.
    first_step: u64,
    start: Instant,
    last_print: Option<Instant>,
    tty: bool,
    interval: Duration,
    quiet: bool,
}

impl Progress {
    /// A display for a run of `total_steps` of which `first_step` were done before this process started.
    pub fn new(total_steps: u64, first_step: u64, quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let interval = Duration::from_secs(if tty { 0 } else { 15 });
        Progress { total_steps, first_step, start: Instant::now(), last_print: None, tty, interval, quiet }
    }

    /// Off a terminal, print a line at most every `seconds` (default 15; 0 = at every update).
    pub fn every(mut self, seconds: f64) -> Self {
        if !self.tty {
            self.interval = Duration::from_secs_f64(seconds.max(0.0));
        }
        self
    }

    /// Shows `line` (at most every `interval` unless `force`).
    pub fn update(&mut self, line: &Line, force: bool) {
        if self.quiet || (!force && self.last_print.is_some_and(|t| t.elapsed() < self.interval)) {
            return;
        }
        self.last_print = Some(Instant::now());
        let frac = line.done as f64 / self.total_steps.max(1) as f64;
        let width = 24;
        let filled = ((frac * width as f64) as usize).min(width);
        let elapsed = self.start.elapsed().as_secs_f64();
        // From this process's own steps only: a resumed run's earlier steps took no time here.
        let mine = line.done.saturating_sub(self.first_step);
        let left = self.total_steps.saturating_sub(line.done);
        let eta = if mine > 0 { elapsed * left as f64 / mine as f64 } else { 0.0 };
        let mut text = format!(
            "epoch {}/{} step {}/{} [{}{}] {:>3.0}% loss {:.4} {:.0} img/s wait {:.1}% eta {}",
            line.epoch + 1,
            line.epochs,
            line.done,
            self.total_steps,
            "#".repeat(filled),
            ".".repeat(width - filled),
            frac * 100.0,
            line.loss,
            line.img_per_s,
            line.wait * 100.0,
            fmt_secs(eta)
        );
        if !line.note.is_empty() {
            text = format!("{text} {}", line.note);
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if self.tty && !self.quiet {
            eprintln!();
        }
    }
}

pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
