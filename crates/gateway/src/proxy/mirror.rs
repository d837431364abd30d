//! Request mirroring: a sampled share of a route's requests is also sent,
//! fire and forget, to a shadow cluster (Host `<name>-shadow`), with the
//! body teed as it streams. Bounded by the gateway's mirror slots; the
//! shadow's answer is read and dropped, and never delays the real one.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http::header::{self, HeaderValue};
use http_body_util::BodyExt;
use tokio::sync::OwnedSemaphorePermit;

use super::Exchange;
use super::attempt::call_upstream;
use super::forward::UpstreamHead;
use crate::body::{self, Body};
use crate::gateway::Shared;
use crate::table::ForwardRt;
use crate::upstream::Cluster;

/// A mirror copy this request will send: its cluster and its slot.
pub(super) struct Mirror {
    cluster: Arc<Cluster>,
    slot: OwnedSemaphorePermit,
}

impl Mirror {
    /// Whether this request is mirrored: the route has a mirror, the
    /// request falls in its sampled share, and a mirror slot is free.
    pub(super) fn admit(sh: &Shared, rt: &ForwardRt) -> Option<Self> {
        let (cluster, pct) = rt.mirror.as_ref()?;
        if *pct < 100.0 && rand::random::<f64>() * 100.0 >= *pct {
            return None;
        }
        let slot = sh.mirror_slots.clone().try_acquire_owned().ok()?;
        Some(Mirror {
            cluster: cluster.clone(),
            slot,
        })
    }

    /// Sends the copy in the background (bounded by the default timeout).
    pub(super) fn send(self, cx: &Exchange<'_>, head: &UpstreamHead, body: Option<Body>) {
        let Some(p) = self.cluster.pick(None, &[], &head.headers, false) else {
            return;
        };
        let Ok(uri) = head.uri(&p.authority) else {
            return;
        };
        let mut headers = head.headers.clone();
        if let Some(h) = head.client_host.as_deref() {
            let shadow = format!("{}-shadow", h.split(':').next().unwrap_or(h));
            if let Ok(v) = HeaderValue::from_str(&shadow) {
                headers.insert(header::HOST, v);
            }
        }
        let mut req = Request::new(body.unwrap_or_else(body::empty));
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let clients = cx.conn.clients.clone();
        let limit = Duration::from_millis(cx.sh.cfg.default_timeout_ms);
        let slot = self.slot;
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(limit, async move {
                if let Ok(resp) =
                    call_upstream(&clients, false, None, p.addr, &p.authority, req).await
                {
                    let mut b = resp.into_body();
                    while let Some(Ok(_)) = b.frame().await {}
                }
            })
            .await;
        });
    }
}
