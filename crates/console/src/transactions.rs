//! The Transactions pages: `/ui/transactions` lists the most recent
//! transactions (unfinished first, stuck ones highlighted, with retry and
//! abort buttons that call the `txn` role's API), `/ui/transactions/{id}` shows
//! one: its branches, its timeline of calls, attempts and errors, and its
//! definition. Both read the transaction log straight from the store, so
//! they work on any node, and refresh live when a record changes.

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::response::Response;
use http::HeaderMap;
use meshwork_txn::log::{PREFIX, TxnLog};
use meshwork_txn::machine::{Branch, CallState};
use meshwork_txn::runner::now_ms;
use meshwork_txn::{Status, Txn};

use crate::ConsoleState;
use crate::pages::{Q, enc, esc, fmt_ms, page};

/// Most finished transactions the list page reads (and every unfinished one).
pub const LIST_LIMIT: i64 = 200;
/// Most transactions the list page shows.
pub const SHOWN: usize = 500;

/// Why an unfinished transaction needs an operator, if it does.
fn stuck(t: &Txn, now: u64) -> Option<String> {
    if t.status.is_final() {
        return None;
    }
    if let Some(b) = t.branches.iter().position(|b| b.stuck) {
        let name = t.spec.branches.get(b).map_or("?", |s| s.name.as_str());
        return Some(format!("branch {name} keeps failing"));
    }
    (t.status == Status::Running && now > t.deadline.saturating_add(10_000))
        .then(|| "past its deadline".to_owned())
}

fn call_text(b: &Branch) -> String {
    let phase = b.phase.as_str();
    match &b.call {
        CallState::Idle => format!("{phase}: not sent"),
        CallState::Calling { attempt } => format!("{phase}: calling (attempt {attempt})"),
        CallState::Backoff { attempt, at } => {
            format!("{phase}: attempt {attempt} failed, next at {}", fmt_ms(*at))
        }
        CallState::Done => format!("{phase}: done"),
        CallState::Rejected => format!("{phase}: rejected"),
        CallState::Exhausted => format!("{phase}: gave up"),
        CallState::Skipped => format!("{phase}: nothing to call"),
    }
}

fn duration(t: &Txn, now: u64) -> String {
    let end = if t.status.is_final() {
        t.history.last().map_or(now, |h| h.at)
    } else {
        now
    };
    let ms = end.saturating_sub(t.created);
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// The retry and abort buttons of an unfinished transaction.
fn buttons(t: &Txn) -> String {
    if t.status.is_final() {
        return String::new();
    }
    let id = enc(&t.id);
    let mut b = format!(
        "<button type=\"button\" data-api=\"/v1/txn/{id}/retry\" data-then=\"reload\" data-body=\"{{}}\">Retry now</button>"
    );
    if t.status == Status::Running || t.status == Status::Aborting {
        let _ = write!(
            b,
            " <button type=\"button\" class=\"danger\" data-api=\"/v1/txn/{id}/abort\" data-then=\"reload\" data-body=\"{{}}\" data-confirm=\"Abort transaction {}? Everything it did is undone.\">Abort</button>",
            esc(&t.id)
        );
    }
    b
}

fn live(inner: &str, url: &str) -> String {
    format!(
        "<div data-live=\"{url}\" data-sse=\"/v1/console/kv/watch?prefix={}\" data-every=\"500\">{inner}</div>",
        enc(PREFIX)
    )
}

/// `/ui/transactions`.
pub(crate) async fn list(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let log = TxnLog::new(s.coord.backend.clone());
    let mut b = String::new();
    match log.recent(LIST_LIMIT).await {
        Ok(records) => {
            let now = now_ms();
            let mut txns: Vec<Txn> = records.into_iter().map(|r| r.txn).collect();
            // Unfinished first, then newest first.
            txns.sort_by_key(|t| (t.status.is_final(), std::cmp::Reverse(t.created)));
            let open = txns.iter().filter(|t| !t.status.is_final()).count();
            let stuck_n = txns.iter().filter(|t| stuck(t, now).is_some()).count();
            let _ = write!(
                b,
                "<p>{} transactions, {open} unfinished, <span class=\"{}\">{stuck_n} stuck</span>{}.</p>",
                txns.len(),
                if stuck_n > 0 { "error" } else { "muted" },
                if txns.len() - open >= LIST_LIMIT as usize {
                    format!(" (the {LIST_LIMIT} most recently finished shown)")
                } else {
                    String::new()
                }
            );
            if txns.is_empty() {
                b.push_str("<p class=\"muted\">No transaction yet. Start one with <code>meshwork txn start -f FILE</code> or <code>POST /v1/txn</code>.</p>");
            } else {
                b.push_str("<table><thead><tr><th scope=\"col\">Transaction</th><th scope=\"col\">Mode</th><th scope=\"col\">Status</th><th scope=\"col\">Started</th><th scope=\"col\">Took</th><th scope=\"col\">Branches</th><th scope=\"col\">Coordinator</th><th scope=\"col\"></th></tr></thead><tbody>");
                for t in txns.iter().take(SHOWN) {
                    let why = stuck(t, now);
                    let branches: Vec<String> = t
                        .spec
                        .branches
                        .iter()
                        .zip(&t.branches)
                        .map(|(spec, b)| format!("{}: {}", esc(&spec.name), esc(&call_text(b))))
                        .collect();
                    let status = match (&why, &t.reason) {
                        (Some(w), _) => format!(
                            "{} <strong class=\"error\">stuck: {}</strong>",
                            t.status.as_str(),
                            esc(w)
                        ),
                        (None, Some(r)) => format!("{}: {}", t.status.as_str(), esc(r)),
                        (None, None) => t.status.as_str().to_owned(),
                    };
                    let _ = write!(
                        b,
                        "<tr{}><td><a href=\"/ui/transactions/{}\">{}</a></td><td>{}</td><td>{status}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        if why.is_some() { " class=\"warn\"" } else { "" },
                        enc(&t.id),
                        esc(&t.id),
                        t.spec.mode.as_str(),
                        fmt_ms(t.created),
                        duration(t, now),
                        branches.join("<br>"),
                        esc(&t.coordinator),
                        buttons(t),
                    );
                }
                b.push_str("</tbody></table>");
            }
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(&e.to_string()));
        }
    }
    let body = format!("<h1>Transactions</h1>{}", live(&b, "/ui/transactions"));
    page(&s, &headers, &q.0, "transactions", "Transactions", body)
}

/// `/ui/transactions/{id}`.
pub(crate) async fn detail(
    State(s): State<ConsoleState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Q,
) -> Response {
    let log = TxnLog::new(s.coord.backend.clone());
    let url = format!("/ui/transactions/{}", enc(&id));
    let mut b = String::new();
    match log.load(&id).await {
        Ok(Some(stored)) => {
            let t = stored.txn;
            let now = now_ms();
            let _ = write!(
                b,
                "<p><b>{}</b> {} · started {} · took {} · coordinator <b>{}</b></p>",
                t.spec.mode.as_str(),
                t.status.as_str(),
                fmt_ms(t.created),
                duration(&t, now),
                esc(&t.coordinator)
            );
            if let Some(r) = &t.reason {
                let _ = write!(b, "<p>Reason: {}</p>", esc(r));
            }
            if let Some(w) = stuck(&t, now) {
                let _ = write!(
                    b,
                    "<p class=\"error\"><strong>Stuck: {}.</strong> Fix the participant, then retry now (or abort, before it commits).</p>",
                    esc(&w)
                );
            }
            b.push_str(&buttons(&t));
            b.push_str("<section><h2>Branches</h2><table><thead><tr><th scope=\"col\">Branch</th><th scope=\"col\">Service</th><th scope=\"col\">Stage</th><th scope=\"col\">Call</th><th scope=\"col\">Sent</th><th scope=\"col\">Last error</th></tr></thead><tbody>");
            for (spec, br) in t.spec.branches.iter().zip(&t.branches) {
                let _ = write!(
                    b,
                    "<tr{}><td>{}</td><td><a href=\"/ui/services/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    if br.stuck { " class=\"warn\"" } else { "" },
                    esc(&spec.name),
                    enc(&spec.service),
                    esc(&spec.service),
                    spec.stage,
                    esc(&call_text(br)),
                    if br.sent { "yes" } else { "no" },
                    esc(br.last_error.as_deref().unwrap_or("")),
                );
            }
            b.push_str("</tbody></table></section><section><h2>Timeline</h2>");
            if t.history_dropped > 0 {
                let _ = write!(
                    b,
                    "<p class=\"muted\">{} earlier entries dropped (the record keeps the most recent).</p>",
                    t.history_dropped
                );
            }
            b.push_str("<table><thead><tr><th scope=\"col\">At</th><th scope=\"col\">+ms</th><th scope=\"col\">Branch</th><th scope=\"col\">Call</th><th scope=\"col\">What</th></tr></thead><tbody>");
            for h in &t.history {
                let branch = h
                    .branch
                    .and_then(|i| t.spec.branches.get(i))
                    .map_or("", |s| s.name.as_str());
                let call = match (h.phase, h.attempt) {
                    (Some(p), Some(a)) => format!("{} #{a}", p.as_str()),
                    (Some(p), None) => p.as_str().to_owned(),
                    _ => String::new(),
                };
                let bad = h.what.starts_with("rejected") || h.what.starts_with("unknown");
                let _ = write!(
                    b,
                    "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    if bad { " class=\"warn\"" } else { "" },
                    fmt_ms(h.at),
                    h.at.saturating_sub(t.created),
                    esc(branch),
                    esc(&call),
                    esc(&h.what),
                );
            }
            b.push_str("</tbody></table></section>");
            let spec = serde_json::to_string_pretty(&t.spec).unwrap_or_default();
            let _ = write!(
                b,
                "<section><h2>Definition</h2><pre>{}</pre></section>",
                esc(&spec)
            );
        }
        Ok(None) => {
            let _ = write!(
                b,
                "<p class=\"error\">No transaction {} (an unknown id; a 2PC participant in doubt about it should roll back: presumed abort).</p>",
                esc(&id)
            );
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(&e.to_string()));
        }
    }
    let body = format!(
        "<h1>Transaction {}</h1><p><a href=\"/ui/transactions\">All transactions</a></p>{}",
        esc(&id),
        live(&b, &url)
    );
    page(&s, &headers, &q.0, "transactions", "Transaction", body)
}
