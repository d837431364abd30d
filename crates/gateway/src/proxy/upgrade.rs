//! Protocol upgrades (WebSocket and the like): once the upstream answers
//! 101, both connections are handed over and bytes are copied both ways
//! until either side closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Joins the client's upgraded connection to the upstream's, in the
/// background.
pub(super) fn splice(client: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(error = %e, "upgraded tunnel ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
}
