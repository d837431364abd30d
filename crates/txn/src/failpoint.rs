//! Crash points for the fault-injection tests (feature `failpoints`; a
//! build without it compiles every point to nothing).
//!
//! `MESHWORK_TXN_FAILPOINT=POINT:N:FILE` parks the task that reaches `POINT`
//! for the `N`th time in this process, after writing `FILE`: the test sees
//! the file and SIGKILLs the node there, so the crash happens exactly at that
//! point. Points: `drive_start` (a driver begins: the record is durable, no
//! call of this driver sent yet), `after_save` (a state change is durable,
//! its calls not sent), `after_call` (a participant answered, the answer not
//! yet recorded); and in a participant's transaction barrier (the SDK's
//! `txn::sqlite`), `barrier_before_commit/BRANCH/PHASE` (the work done, not
//! committed) and `barrier_after_commit/BRANCH/PHASE` (committed, not
//! answered). A point fires once: when `FILE` exists it does nothing, so the
//! process restarted after the kill goes on.

#[cfg(feature = "failpoints")]
mod on {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Armed {
        point: String,
        nth: u64,
        file: std::path::PathBuf,
        hits: AtomicU64,
    }

    static ARMED: LazyLock<Option<Armed>> = LazyLock::new(|| {
        let v = std::env::var("MESHWORK_TXN_FAILPOINT").ok()?;
        let mut parts = v.splitn(3, ':');
        let point = parts.next()?.to_owned();
        let nth = parts.next()?.parse().ok()?;
        let file = parts.next()?.into();
        Some(Armed {
            point,
            nth,
            file,
            hits: AtomicU64::new(0),
        })
    });

    /// Whether this hit is the armed one; then writes the file. Once the file
    /// exists nothing fires again, so a restarted process goes on.
    fn fire(is_point: impl FnOnce(&str) -> bool) -> bool {
        let Some(a) = ARMED.as_ref() else {
            return false;
        };
        if !is_point(&a.point)
            || a.file.exists()
            || a.hits.fetch_add(1, Ordering::SeqCst) + 1 != a.nth
        {
            return false;
        }
        tracing::error!(point = %a.point, nth = a.nth, "failpoint reached; parking until killed");
        let _ = std::fs::write(&a.file, format!("{} #{}", a.point, a.nth));
        true
    }

    pub(crate) async fn hit(point: &str) {
        if fire(|p| p == point) {
            std::future::pending::<()>().await;
        }
    }

    /// A participant's crash point, named `POINT/BRANCH/PHASE`; parks the
    /// calling (blocking) thread.
    pub fn hit_branch_blocking(point: &str, branch: &str, phase: &str) {
        if fire(|p| p.split('/').eq([point, branch, phase])) {
            loop {
                std::thread::park();
            }
        }
    }
}

#[cfg(feature = "failpoints")]
pub(crate) use on::hit;
#[cfg(feature = "failpoints")]
pub use on::hit_branch_blocking;

/// A crash point (nothing without the `failpoints` feature).
#[cfg(all(feature = "server", not(feature = "failpoints")))]
#[inline(always)]
pub(crate) async fn hit(_point: &str) {}

/// A participant's crash point, `POINT/BRANCH/PHASE` in the variable
/// (nothing without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit_branch_blocking(_point: &str, _branch: &str, _phase: &str) {}
