//! The Cache page (`/ui/cache`) and its JSON (`GET /v1/console/cache`): this
//! node's cache (role `cache`): memory against `maxmemory`, keys per database, the
//! hit ratio, commands per second, clients, expired and evicted keys, the newest
//! slow commands (arguments masked like every value the console shows), and the
//! SDK caches that report into this node (`mw.cache(name)`: each one's L1 and L2
//! hit ratio summed over every process). The page refreshes every two seconds.

use std::fmt::Write as _;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use meshwork_cache::Stats;

use crate::ConsoleState;
use crate::pages::{Q, esc, fmt_ms, page};
use crate::secrets::mask;

/// Slow commands shown.
pub const SLOW_SHOWN: usize = 20;
/// How often the page refreshes, in ms.
const POLL_MS: u32 = 2000;

/// The cache's charts: commands per second, hit ratio and memory, the last hour.
const CHARTS: &str = "<section><h2>Last hour</h2><figure><figcaption>Commands per second</figcaption><canvas data-chart=\"cache-ops\" width=\"900\" height=\"200\" role=\"img\" aria-label=\"Commands per second\"></canvas></figure><figure><figcaption>Hit ratio, % of reads</figcaption><canvas data-chart=\"cache-hits\" width=\"900\" height=\"200\" role=\"img\" aria-label=\"Hit ratio\"></canvas></figure><figure><figcaption>Data held, MiB</figcaption><canvas data-chart=\"cache-memory\" width=\"900\" height=\"200\" role=\"img\" aria-label=\"Data held\"></canvas></figure></section>";

fn no_cache() -> String {
    "<p class=\"muted\">This node does not run the cache (role <code>cache</code>): start it with <code>--roles ...,cache</code>, or open the console of a node that does.</p>".to_owned()
}

fn bytes(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.2} GiB", n as f64 / f64::from(1 << 30))
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// `hits / (hits + misses)` as a percentage, or "-" before any read.
fn ratio(hits: u64, misses: u64) -> String {
    let total = hits + misses;
    if total == 0 {
        "-".to_owned()
    } else {
        format!("{:.1} %", hits as f64 * 100.0 / total as f64)
    }
}

/// `GET /v1/console/cache`: the figures the page shows, as JSON; 404 when this
/// node does not run the cache.
pub(crate) async fn json(State(s): State<ConsoleState>) -> Response {
    match &s.cache {
        Some(c) => Json(c.stats(SLOW_SHOWN)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": "not_found",
                "message": "this node does not run the cache (role cache)"
            })),
        )
            .into_response(),
    }
}

fn body(st: &Stats) -> String {
    let mut b = String::new();
    let keys: usize = st.dbs.iter().map(|d| d.keys).sum();
    let mem = if st.maxmemory > 0 {
        format!(
            "{} of {} ({:.0} %)",
            bytes(st.used_bytes),
            bytes(st.maxmemory),
            st.used_bytes as f64 * 100.0 / st.maxmemory as f64
        )
    } else {
        format!("{} (no maxmemory)", bytes(st.used_bytes))
    };
    let _ = write!(
        b,
        "<section class=\"cards\" aria-label=\"Cache\">
<div class=\"card\"><span class=\"n\" id=\"cache-keys\">{keys}</span><span>keys</span></div>
<div class=\"card\"><span class=\"n\" id=\"cache-hit-ratio\">{}</span><span>hit ratio</span></div>
<div class=\"card\"><span class=\"n\" id=\"cache-ops\">{}</span><span>commands/s</span></div>
<div class=\"card\"><span class=\"n\" id=\"cache-clients\">{}</span><span>clients</span></div>
<div class=\"card\"><span class=\"n\" id=\"cache-evicted\">{}</span><span>evicted</span></div>
</section>",
        ratio(st.hits, st.misses),
        st.ops_per_sec,
        st.clients,
        st.evicted
    );
    let _ = write!(
        b,
        "<p>Port {}, up {} s. Memory {mem}, policy <code>{}</code>. {} hits, {} misses, {} commands, {} connections since start (at most {} at once), {} keys expired, {} evicted.</p>",
        st.port,
        st.uptime_s,
        esc(&st.policy),
        st.hits,
        st.misses,
        st.commands,
        st.connections,
        st.max_clients,
        st.expired,
        st.evicted
    );
    b.push_str("<h2>Databases</h2>");
    if st.dbs.is_empty() {
        b.push_str("<p class=\"muted\">No key yet. Try <code>redis-cli -p ");
        let _ = write!(b, "{} SET greeting hello</code>.</p>", st.port);
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">Database</th><th scope=\"col\">Keys</th><th scope=\"col\">With a TTL</th></tr></thead><tbody>");
        for d in &st.dbs {
            let _ = write!(
                b,
                "<tr><td>db{}</td><td>{}</td><td>{}</td></tr>",
                d.db, d.keys, d.expires
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("<h2>SDK caches</h2>");
    if st.sdk.is_empty() {
        b.push_str("<p class=\"muted\">No SDK cache reports into this node yet (<code>mw.cache(name)</code> adds its counters every 5 s).</p>");
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">Cache</th><th scope=\"col\">Hit ratio</th><th scope=\"col\">L1 hits</th><th scope=\"col\">L2 hits</th><th scope=\"col\">Misses</th><th scope=\"col\">Loads</th><th scope=\"col\">Bloom rejections</th><th scope=\"col\">L2 errors</th><th scope=\"col\">Last report</th></tr></thead><tbody>");
        for c in &st.sdk {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                esc(&c.name),
                ratio(c.l1_hits + c.l2_hits, c.misses),
                c.l1_hits,
                c.l2_hits,
                c.misses,
                c.loads,
                c.rejected,
                if c.l2_errors > 0 { "error" } else { "muted" },
                c.l2_errors,
                fmt_ms(c.reported_ms)
            );
        }
        b.push_str("</tbody></table>");
    }
    let _ = write!(
        b,
        "<h2>Slow commands</h2><p class=\"muted\">{} logged (at least {} µs; <code>CONFIG SET slowlog-log-slower-than</code> changes it, <code>SLOWLOG RESET</code> clears it).</p>",
        st.slowlog_len, st.slowlog_slower_than_us
    );
    if !st.slowlog.is_empty() {
        b.push_str("<table><thead><tr><th scope=\"col\">Id</th><th scope=\"col\">When</th><th scope=\"col\">µs</th><th scope=\"col\">Command</th><th scope=\"col\">Client</th></tr></thead><tbody>");
        for e in &st.slowlog {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}{}</td></tr>",
                e.id,
                fmt_ms(e.at_s * 1000),
                e.micros,
                esc(&mask(&e.args.join(" "))),
                esc(&e.addr),
                if e.name.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", esc(&e.name))
                }
            );
        }
        b.push_str("</tbody></table>");
    }
    b
}

/// `/ui/cache`.
pub(crate) async fn page_handler(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    q: Q,
) -> Response {
    let Some(c) = &s.cache else {
        return page(&s, &headers, &q, "cache", "Cache", no_cache());
    };
    let st = c.stats(SLOW_SHOWN);
    // Outside the live region: the charts keep their canvases.
    let html = format!(
        "<h1>Cache</h1><div data-live=\"/ui/cache\" data-poll=\"{POLL_MS}\">{}</div>{CHARTS}",
        body(&st)
    );
    page(&s, &headers, &q, "cache", "Cache", html)
}
