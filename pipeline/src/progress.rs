//! Progress on stderr, with `indicatif`: the training line (epoch, step, loss, images/s, data-wait fraction, ETA)
//! and [`Task`] bars for everything else that takes time (feature extraction, the linear probe, `pack`,
//! `inspect`). On a terminal they redraw in place; otherwise (CI logs, files) each prints a plain line at most
//! every `interval` (and at the end), which logs and scripts can read.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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

fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar on stderr at most 10 times a second.
fn bar(len: u64, template: &str) -> ProgressBar {
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("#>.");
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(10)).with_style(style)
}

/// The training display.
pub struct Progress {
    total_steps: u64,
    /// Steps done before this process started (a resumed run): not counted in the rate or the ETA.
    first_step: u64,
    start: Instant,
    last_print: Option<Instant>,
    interval: Duration,
    quiet: bool,
    /// The terminal's bar; `None` off a terminal or when quiet.
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A display for a run of `total_steps` of which `first_step` were done before this process started.
    pub fn new(total_steps: u64, first_step: u64, quiet: bool) -> Self {
        let tty = stderr_is_terminal();
        let bar = (tty && !quiet).then(|| {
            let b = bar(total_steps, "{prefix} step {pos}/{len} [{bar:24}] {percent:>3}% {msg}");
            b.set_position(first_step);
            b
        });
        let interval = Duration::from_secs(if tty { 0 } else { 15 });
        Progress { total_steps, first_step, start: Instant::now(), last_print: None, interval, quiet, bar }
    }

    /// Off a terminal, print a line at most every `seconds` (default 15; 0 = at every update).
    pub fn every(mut self, seconds: f64) -> Self {
        if self.bar.is_none() {
            self.interval = Duration::from_secs_f64(seconds.max(0.0));
        }
        self
    }

    /// The ETA from this process's own steps only: a resumed run's earlier steps took no time here.
    fn eta(&self, done: u64) -> f64 {
        eta(
            self.start.elapsed().as_secs_f64(),
            done.saturating_sub(self.first_step),
            self.total_steps.saturating_sub(done),
        )
    }

    /// Shows `line` (off a terminal at most every `interval` unless `force`).
    pub fn update(&mut self, line: &Line, force: bool) {
        if self.quiet {
            return;
        }
        let stats = format!(
            "loss {:.4} {:.0} img/s wait {:.1}% eta {}{}{}",
            line.loss,
            line.img_per_s,
            line.wait * 100.0,
            fmt_secs(self.eta(line.done)),
            if line.note.is_empty() { "" } else { " " },
            line.note
        );
        if let Some(b) = &self.bar {
            b.set_prefix(format!("epoch {}/{}", line.epoch + 1, line.epochs));
            b.set_position(line.done);
            b.set_message(stats);
            return;
        }
        if !force && self.last_print.is_some_and(|t| t.elapsed() < self.interval) {
            return;
        }
        self.last_print = Some(Instant::now());
        let frac = line.done as f64 / self.total_steps.max(1) as f64;
        let width = 24;
        let filled = ((frac * width as f64) as usize).min(width);
        let text = format!(
            "epoch {}/{} step {}/{} [{}{}] {:>3.0}% {stats}",
            line.epoch + 1,
            line.epochs,
            line.done,
            self.total_steps,
            "#".repeat(filled),
            ".".repeat(width - filled),
            frac * 100.0,
        );
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{text}");
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// Progress of one piece of work of known size (`pack`, `inspect`, feature extraction, the linear probe).
pub struct Task {
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    last_print: Instant,
    bar: Option<ProgressBar>,
    show: bool,
}

impl Task {
    /// `total` `unit`s of `label`; nothing is shown unless `show`.
    pub fn new(label: &str, unit: &'static str, total: u64, show: bool) -> Task {
        let bar = (show && stderr_is_terminal()).then(|| {
            let b = bar(total, "{prefix} [{bar:24}] {pos}/{len} {msg} {per_sec} eta {eta}");
            b.set_prefix(label.to_string());
            b
        });
        let now = Instant::now();
        Task { label: label.into(), unit, total, done: 0, start: now, last_print: now, bar, show }
    }

    /// `n` more done.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.show && self.last_print.elapsed() >= Duration::from_secs(15) {
            self.last_print = Instant::now();
            self.plain_line();
        }
    }

    /// A note shown beside the count (e.g. "3 skipped").
    pub fn set_message(&self, message: String) {
        if let Some(b) = &self.bar {
            b.set_message(message);
        }
    }

    fn plain_line(&self) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = self.done as f64 / secs;
        let eta = eta(secs, self.done, self.total.saturating_sub(self.done));
        crate::say!(
            "{}: {}/{} {} ({:.0}%), {:.0} {}/s, eta {}",
            self.label,
            self.done,
            self.total,
            self.unit,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            rate,
            self.unit,
            fmt_secs(eta)
        );
    }

    /// Ends the display: the terminal's bar is cleared; off a terminal, work longer than the interval gets its
    /// final line.
    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        } else if self.show && self.start.elapsed() >= Duration::from_secs(15) {
            self.plain_line();
        }
    }
}

/// Seconds left at the rate so far: `done` units took `elapsed` seconds, `left` remain (0 before the first).
fn eta(elapsed: f64, done: u64, left: u64) -> f64 {
    if done > 0 {
        elapsed * left as f64 / done as f64
    } else {
        0.0
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
