//! Crash points for the fault-injection tests (feature `failpoints`; a
//! build without it compiles every point to nothing).
//!
//! `MESHWORK_TXN_FAILPOINT=POINT:N:FILE` parks the task that reaches `POINT`
//! for the `N`th time in this process, after writing `FILE`: the test sees
//! the file and SIGKILLs the node there, so the crash happens exactly at that
//! point. Points: `drive_start` (a driver begins: the record is durable, no
//! call of this driver sent yet), `after_save` (a state change is durable,
//! its calls not sent), `after_call` (a participant answered, the answer not
//! yet recorded).

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

    pub(crate) async fn hit(point: &str) {
        let Some(a) = ARMED.as_ref() else { return };
        if a.point != point || a.hits.fetch_add(1, Ordering::SeqCst) + 1 != a.nth {
            return;
        }
        tracing::error!(
            point,
            nth = a.nth,
            "failpoint reached; parking until killed"
        );
        let _ = std::fs::write(&a.file, format!("{point} #{}", a.nth));
        std::future::pending::<()>().await;
    }
}

#[cfg(feature = "failpoints")]
pub(crate) use on::hit;

/// A crash point (nothing without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn hit(_point: &str) {}
