//! A progress line on stderr (`label done/total  rate/s`), rewritten once a
//! second, only when stderr is a terminal: logs and pipes get none of it.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Whether progress is shown (stderr is a terminal).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::io::stderr().is_terminal())
}

/// Prints progress until dropped; dropping ends the line.
#[derive(Debug)]
pub struct Progress(Option<tokio::task::JoinHandle<()>>);

impl Progress {
    /// Starts showing `done` against `total` (nothing when not on a terminal).
    pub fn start(label: &'static str, done: Arc<AtomicU64>, total: u64) -> Progress {
        if !enabled() {
            return Progress(None);
        }
        let started = Instant::now();
        Progress(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                eprint!(
                    "\r{label} {d}/{total}  {:.0}/s   ",
                    d as f64 / started.elapsed().as_secs_f64().max(1e-9)
                );
            }
        })))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
            eprintln!();
        }
    }
}
