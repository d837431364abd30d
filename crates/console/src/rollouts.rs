//! The Rollouts pages: `/ui/rollouts` lists every service's rollout (phase,
//! weight, the live comparison of the new and stable versions), and
//! `/ui/rollouts/{service}` shows one: its steps with the current one marked,
//! the live comparison against the thresholds, every decision with its
//! numbers, and promote, pause, resume and abort buttons that call
//! `/v1/rollouts`. Both read the node's watched copy of the rollouts and
//! refresh live when a record changes.

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::response::Response;
use http::HeaderMap;
use meshwork_coord::rollout::{Phase, ROLLOUTS_PREFIX, Rollout, Strategy, Window};

use crate::ConsoleState;
use crate::pages::{Q, enc, esc, fmt_ms, page};

fn live(inner: &str, url: &str) -> String {
    format!(
        "<div data-live=\"{url}\" data-sse=\"/v1/console/kv/watch?prefix={}\" data-every=\"1000\">{inner}</div>",
        enc(ROLLOUTS_PREFIX)
    )
}

/// A version's figures in a cell: failures of requests, error rate, p99.
fn figures(w: &Window) -> String {
    if w.requests == 0 {
        return "<span class=\"muted\">no requests</span>".into();
    }
    format!(
        "{} of {} failed ({:.2}%) · p99 {}",
        w.failures,
        w.requests,
        w.error_rate() * 100.0,
        w.p99_ms
            .map_or_else(|| "-".into(), |p| format!("{p:.1} ms"))
    )
}

fn phase_class(p: Phase) -> &'static str {
    match p {
        Phase::RolledBack => "error",
        Phase::Paused => "warn",
        _ => "",
    }
}

fn strategy(r: &Rollout) -> &'static str {
    match r.spec.strategy {
        Strategy::Canary => "canary",
        Strategy::BlueGreen => "blue-green",
    }
}

/// The buttons a rollout's phase allows.
fn buttons(r: &Rollout) -> String {
    let s = enc(&r.spec.service);
    let api = |cmd: &str, label: &str, class: &str, body: &str, confirm: &str| {
        format!(
            " <button type=\"button\"{class} data-api=\"/v1/rollouts/{s}/{cmd}\" data-then=\"reload\" data-body=\"{body}\"{confirm}>{label}</button>"
        )
    };
    let mut b = String::new();
    match r.status.phase {
        Phase::Promoted | Phase::RolledBack => {
            let _ = write!(
                b,
                "<button type=\"button\" data-api=\"/v1/rollouts/{s}\" data-method=\"DELETE\" data-then=\"reload\" data-confirm=\"Forget the rollout of {}? Traffic goes to every version again.\">Remove</button>",
                esc(&r.spec.service)
            );
        }
        phase => {
            b.push_str(&api("promote", "Promote", "", "{}", ""));
            b.push_str(&api(
                "promote",
                "Promote fully",
                "",
                "{&quot;full&quot;:true}",
                " data-confirm=\"Send every request to the new version now?\"",
            ));
            if phase == Phase::Paused {
                b.push_str(&api("resume", "Resume", "", "{}", ""));
            } else {
                b.push_str(&api("pause", "Pause", "", "{}", ""));
            }
            b.push_str(&api(
                "abort",
                "Abort",
                " class=\"danger\"",
                "{}",
                &format!(
                    " data-confirm=\"Roll back {}? Every request goes to the stable version.\"",
                    esc(&r.spec.service)
                ),
            ));
        }
    }
    b
}

/// `/ui/rollouts`.
pub(crate) async fn list(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let all = s.coord.rollouts.list();
    let mut b = String::new();
    if all.is_empty() {
        b.push_str("<p class=\"muted\">No rollout yet. Register the new version's instances with their <code>version</code>, then <code>meshwork rollout start SERVICE --to-version V</code> (or <code>POST /v1/rollouts</code>).</p>");
    } else {
        let running = all.iter().filter(|r| !r.status.phase.is_terminal()).count();
        let _ = write!(b, "<p>{} rollouts, {running} running.</p>", all.len());
        b.push_str("<table><thead><tr><th scope=\"col\">Service</th><th scope=\"col\">To version</th><th scope=\"col\">Strategy</th><th scope=\"col\">Phase</th><th scope=\"col\">Weight</th><th scope=\"col\">New version</th><th scope=\"col\">Stable</th><th scope=\"col\">Started</th><th scope=\"col\"></th></tr></thead><tbody>");
        for r in &all {
            let _ = write!(
                b,
                "<tr><td><a href=\"/ui/rollouts/{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                enc(&r.spec.service),
                esc(&r.spec.service),
                esc(&r.spec.to_version),
                strategy(r),
                phase_class(r.status.phase),
                r.status.phase.as_str(),
                r.status.weight,
                figures(&r.status.canary),
                figures(&r.status.stable),
                fmt_ms(r.status.started_ms),
                buttons(r),
            );
        }
        b.push_str("</tbody></table>");
    }
    let body = format!("<h1>Rollouts</h1>{}", live(&b, "/ui/rollouts"));
    page(&s, &headers, &q.0, "rollouts", "Rollouts", body)
}

/// `/ui/rollouts/{service}`.
pub(crate) async fn detail(
    State(s): State<ConsoleState>,
    Path(service): Path<String>,
    headers: HeaderMap,
    q: Q,
) -> Response {
    let url = format!("/ui/rollouts/{}", enc(&service));
    let mut b = String::new();
    match s.coord.rollouts.get(&service) {
        Some((r, _)) => {
            let st = &r.status;
            let _ = write!(
                b,
                "<p><b>{}</b> to version <b>{}</b> · <span class=\"{}\">{}</span> at <b>{}%</b> · started {} · window started {}</p>",
                strategy(&r),
                esc(&r.spec.to_version),
                phase_class(st.phase),
                st.phase.as_str(),
                st.weight,
                fmt_ms(st.started_ms),
                fmt_ms(st.window_started_ms),
            );
            b.push_str(&buttons(&r));
            // The steps, the current one marked.
            b.push_str("<section><h2>Steps</h2><ol class=\"steps\">");
            for (i, w) in r.spec.weights().iter().enumerate() {
                let state = match st.phase {
                    Phase::Promoted => "done",
                    Phase::Waiting => "next",
                    _ if (i as u32) < st.step => "done",
                    _ if i as u32 == st.step => "current",
                    _ => "next",
                };
                let _ = write!(b, "<li class=\"{state}\">{w}%</li>");
            }
            let _ = write!(
                b,
                "</ol><p class=\"muted\">Each step is watched for {} s; the first waits for {} healthy instance(s) of the new version (at most {} s).</p></section>",
                r.spec.interval_ms / 1000,
                r.spec.min_healthy,
                r.spec.deadline_ms / 1000
            );
            // The live comparison against the thresholds.
            let a = &r.spec.analysis;
            b.push_str("<section><h2>Live comparison (this window)</h2><table><thead><tr><th scope=\"col\">Version</th><th scope=\"col\">Requests</th><th scope=\"col\">Failed</th><th scope=\"col\">Error rate</th><th scope=\"col\">p99</th></tr></thead><tbody>");
            let row = |name: &str, w: &Window| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}%</td><td>{}</td></tr>",
                    name,
                    w.requests,
                    w.failures,
                    w.error_rate() * 100.0,
                    w.p99_ms
                        .map_or_else(|| "-".into(), |p| format!("{p:.1} ms"))
                )
            };
            b.push_str(&row(
                &format!("new ({})", esc(&r.spec.to_version)),
                &st.canary,
            ));
            b.push_str(&row("stable", &st.stable));
            if let Some(base) = &st.baseline {
                b.push_str(&row("stable (last full window)", base));
            }
            let _ = write!(
                b,
                "</tbody></table><p class=\"muted\">Fails when the new version's error rate is more than {:.2} points above the stable one's, or its p99 more than {:.2}× the stable one's and {:.0} ms above it, with 95 % confidence at a step's end (99.9 % for an earlier error verdict; latency only at the end); judged from {} requests on; then it {}.</p></section>",
                a.max_error_rate_increase * 100.0,
                a.max_p99_ratio,
                a.p99_slack_ms,
                a.min_requests,
                if r.spec.auto_rollback {
                    "rolls back"
                } else {
                    "pauses"
                }
            );
            if let Some(p) = &r.spec.pin {
                let _ = write!(
                    b,
                    "<p>Requests with {} <code>{}={}</code> always reach the new version.</p>",
                    match p.kind {
                        meshwork_coord::rollout::PinKind::Header => "header",
                        meshwork_coord::rollout::PinKind::Cookie => "cookie",
                    },
                    esc(&p.name),
                    esc(&p.value)
                );
            }
            b.push_str("<section><h2>Decisions</h2><table><thead><tr><th scope=\"col\">At</th><th scope=\"col\">Action</th><th scope=\"col\">Weight</th><th scope=\"col\">New version</th><th scope=\"col\">Stable</th><th scope=\"col\">By</th><th scope=\"col\">Why</th></tr></thead><tbody>");
            for d in st.decisions.iter().rev() {
                let bad = matches!(
                    d.action,
                    meshwork_coord::rollout::Action::Rollback
                        | meshwork_coord::rollout::Action::Pause
                );
                let _ = write!(
                    b,
                    "<tr{}><td>{}</td><td>{}</td><td>{}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    if bad { " class=\"warn\"" } else { "" },
                    fmt_ms(d.at_ms),
                    d.action.as_str(),
                    d.weight,
                    figures(&d.canary),
                    figures(&d.stable),
                    esc(d.by.as_deref().unwrap_or("controller")),
                    esc(&d.reason),
                );
            }
            b.push_str("</tbody></table></section>");
        }
        None => {
            let _ = write!(
                b,
                "<p class=\"muted\">{} has no rollout.</p>",
                esc(&service)
            );
        }
    }
    let body = format!(
        "<h1>Rollout of {}</h1><p><a href=\"/ui/rollouts\">All rollouts</a> · <a href=\"/ui/services/{}\">the service</a></p>{}",
        esc(&service),
        enc(&service),
        live(&b, &url)
    );
    page(&s, &headers, &q.0, "rollouts", "Rollout", body)
}
