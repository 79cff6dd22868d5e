//! SIGINT, SIGTERM and SIGUSR1 as requests the training loop polls between steps (nothing runs inside the
//! handlers but atomic stores):
//! - SIGINT / SIGTERM: finish the current step, write a checkpoint, the event files and the summary, and exit
//!   with 130 / 143 (128 + the signal, as a shell reports it). A second SIGINT or SIGTERM exits at once with that
//!   status (the last checkpoint stays intact: checkpoints are written to temporary folders and renamed).
//! - SIGUSR1: write a checkpoint and go on (what SLURM's `--signal=USR1@<seconds>` sends before preemption).
//!
//! The handlers are installed by [`install`] (the CLI does it); without it, every poll says "nothing requested".

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

struct Flags {
    /// A stop was requested (the second one exits in the handler).
    stop: Arc<AtomicBool>,
    /// Which signal asked to stop.
    which: Arc<AtomicUsize>,
    checkpoint: Arc<AtomicBool>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the handlers (once; later calls do nothing).
pub fn install() -> std::io::Result<()> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let flags = Flags { stop: Arc::default(), which: Arc::new(AtomicUsize::new(0)), checkpoint: Arc::default() };
    for sig in [SIGINT, SIGTERM] {
        // Registration order is the order the actions run in: exit if a stop was already requested, else
        // request one.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, flags.stop.clone())?;
        signal_hook::flag::register_usize(sig, flags.which.clone(), sig as usize)?;
        signal_hook::flag::register(sig, flags.stop.clone())?;
    }
    signal_hook::flag::register(SIGUSR1, flags.checkpoint.clone())?;
    let _ = FLAGS.set(flags);
    Ok(())
}

/// The signal that asked to stop (SIGINT = 2, SIGTERM = 15), if one did.
pub fn stop_requested() -> Option<i32> {
    let f = FLAGS.get()?;
    f.stop.load(Ordering::SeqCst).then(|| f.which.load(Ordering::SeqCst) as i32)
}

/// Whether SIGUSR1 asked for a checkpoint since the last call (the request is consumed).
pub fn take_checkpoint_request() -> bool {
    FLAGS.get().is_some_and(|f| f.checkpoint.swap(false, Ordering::SeqCst))
}

/// A signal's name, for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}
