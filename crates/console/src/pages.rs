//! Server-rendered pages. Each page is a shell (navigation, login state) around
//! its content; `?fragment=1` answers the content alone, which the console's
//! script fetches again when a server-sent event says something changed.
//! Every value is HTML-escaped; config content and KV values are shown masked
//! (see [`crate::secrets`]).

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use http::HeaderMap;
use meshwork_coord::config::ConfigKey;
use meshwork_coord::registry::Filter;

use crate::ConsoleState;
use crate::secrets::mask;

/// HTML-escapes `s`.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    meshwork_api::percent_encode(s)
}

fn fmt_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const NAV: [(&str, &str, &str); 12] = [
    ("overview", "/", "Overview"),
    ("services", "/ui/services", "Services"),
    ("config", "/ui/config", "Configuration"),
    ("gateway", "/ui/gateway", "Gateway"),
    ("kv", "/ui/kv", "KV"),
    ("locks", "/ui/locks", "Locks"),
    ("transactions", "/ui/transactions", "Transactions"),
    ("rollouts", "/ui/rollouts", "Rollouts"),
    ("queues", "/ui/queues", "Queues"),
    ("cache", "/ui/cache", "Cache"),
    ("traces", "/ui/traces", "Traces"),
    ("access", "/ui/access", "Access"),
];

fn shell(
    s: &ConsoleState,
    headers: &HeaderMap,
    active: &str,
    title: &str,
    body: &str,
) -> Html<String> {
    let mut nav = String::new();
    for (id, href, label) in NAV {
        let current = if id == active {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(nav, "<li><a href=\"{href}\"{current}>{label}</a></li>");
    }
    let login = match &s.auth {
        None => "<span class=\"muted\">writes open (no login configured)</span>".to_string(),
        Some(a) => match a.user_of(headers) {
            Some(u) => format!(
                "<span>signed in as <b>{}</b></span> <button type=\"button\" data-logout>Sign out</button>",
                esc(&u)
            ),
            None => "<a href=\"/ui/login\">Sign in to make changes</a>".to_string(),
        },
    };
    Html(format!(
        "<!doctype html>
<html lang=\"en\">
<head>
<meta charset=\"utf-8\">
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">
<title>{title} · Meshwork</title>
<link rel=\"stylesheet\" href=\"/ui/assets/console.css\">
<script src=\"/ui/assets/console.js\" defer></script>
</head>
<body data-page=\"{active}\">
<a class=\"skip\" href=\"#main\">Skip to content</a>
<header>
<a class=\"brand\" href=\"/\">Meshwork</a>
<nav aria-label=\"Main\"><ul>{nav}</ul></nav>
<div class=\"session\">{login}</div>
</header>
<main id=\"main\">
{body}
</main>
<footer>node <b>{node}</b> · <a href=\"/openapi.json\">API</a> · <a href=\"/metrics\">metrics</a></footer>
</body>
</html>",
        title = esc(title),
        node = esc(&s.coord.options.node_name),
    ))
}

/// A page: the shell around `body`, or `body` alone for `?fragment=1`.
pub(crate) fn page(
    s: &ConsoleState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    active: &str,
    title: &str,
    body: String,
) -> Response {
    if q.get("fragment").is_some_and(|v| v == "1") {
        return Html(body).into_response();
    }
    shell(s, headers, active, title, &body).into_response()
}

/// A page's query parameters.
pub(crate) type Q = Query<HashMap<String, String>>;

/// The page routes.
pub(crate) fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/", get(overview))
        .route("/ui", get(|| async { Redirect::permanent("/") }))
        .route("/ui/services", get(services))
        .route("/ui/services/{name}", get(service))
        .route("/ui/config", get(config_list))
        .route("/ui/config/{ns}/{group}/{id}", get(config_entry))
        .route("/ui/gateway", get(gateway))
        .route("/ui/kv", get(kv))
        .route("/ui/locks", get(locks))
        .route("/ui/transactions", get(crate::transactions::list))
        .route("/ui/transactions/{id}", get(crate::transactions::detail))
        .route("/ui/rollouts", get(crate::rollouts::list))
        .route("/ui/rollouts/{service}", get(crate::rollouts::detail))
        .route("/ui/queues", get(crate::queues::list))
        .route("/ui/queues/{topic}", get(crate::queues::detail))
        .route("/ui/cache", get(crate::cache::page_handler))
        .route("/ui/traces", get(crate::traces::list))
        .route("/ui/traces/{id}", get(crate::traces::detail))
        .route("/ui/login", get(login))
        .route("/ui/access", get(crate::access::page_handler))
}

async fn overview(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let o = s.overview().await;
    let mut b = String::new();
    b.push_str("<h1>Overview</h1><div data-live=\"/\" data-sse=\"/v1/console/stream\" data-every=\"2000\">");
    let c = &o.counts;
    let _ = write!(
        b,
        "<section class=\"cards\" aria-label=\"Counts\">
<div class=\"card\"><span class=\"n\" id=\"count-services\">{}</span><span>services</span></div>
<div class=\"card\"><span class=\"n\">{}/{}</span><span>healthy instances</span></div>
<div class=\"card\"><span class=\"n\">{}</span><span>config entries</span></div>
<div class=\"card\"><span class=\"n\">{}</span><span>gateway routes</span></div>
<div class=\"card\"><span class=\"n\">{}</span><span>locks held</span></div>
</section>",
        c.services, c.healthy_instances, c.instances, c.configs, c.routes, c.locks
    );
    b.push_str("<section><h2>Nodes</h2><table><thead><tr><th scope=\"col\">Node</th><th scope=\"col\">HTTP</th><th scope=\"col\">Roles</th><th scope=\"col\">Joined</th></tr></thead><tbody>");
    for n in &o.nodes {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&n.name),
            esc(&n.http_addr),
            esc(&n.roles.join(", ")),
            fmt_ms(n.started_at_ms)
        );
    }
    b.push_str("</tbody></table></section>");
    let st = &o.store;
    let _ = write!(
        b,
        "<section><h2>Store</h2><dl class=\"kv\"><dt>Revision</dt><dd>{}</dd><dt>Database</dt><dd>{} ({} in use)</dd><dt>Version</dt><dd>{}</dd><dt>Leader</dt><dd>{}</dd><dt>Members</dt><dd>{}</dd><dt>Alarms</dt><dd>{}</dd></dl></section>",
        st.revision,
        fmt_bytes(st.db_size_bytes),
        fmt_bytes(st.db_size_in_use_bytes),
        esc(&st.version),
        esc(&st.leader),
        esc(&st
            .members
            .iter()
            .map(|(n, urls)| format!("{n} ({})", urls.join(" ")))
            .collect::<Vec<_>>()
            .join(", ")),
        if st.errors.is_empty() {
            "none".to_string()
        } else {
            esc(&st.errors.join(", "))
        }
    );
    b.push_str("<section><h2>Circuit breakers</h2>");
    if o.breakers.is_empty() {
        b.push_str("<p class=\"muted\">No route has a breaker yet (breakers appear once a route forwards).</p>");
    } else {
        b.push_str("<ul class=\"breakers\">");
        for br in &o.breakers {
            let _ = write!(
                b,
                "<li class=\"state-{st}\"><b>{}</b> → {}: <span>{st}</span></li>",
                esc(&br.route),
                esc(&br.target),
                st = br.state
            );
        }
        b.push_str("</ul>");
    }
    b.push_str("</section></div>");
    b.push_str(
        "<section><h2>Gateway traffic</h2>
<p class=\"live\" aria-live=\"polite\"><span id=\"gw-rate\">–</span> req/s · <span id=\"gw-errors\">–</span> 5xx/s</p>
<figure><figcaption>Requests per second by route (last 5 minutes)</figcaption><canvas data-chart=\"route-rate\" width=\"900\" height=\"220\" role=\"img\" aria-label=\"Requests per second by route\"></canvas></figure>
<figure><figcaption>p99 latency by route, ms (last 10 s)</figcaption><canvas data-chart=\"route-p99\" width=\"900\" height=\"220\" role=\"img\" aria-label=\"p99 latency by route\"></canvas></figure>
<figure><figcaption>Upstream latency by service, ms (peak EWMA)</figcaption><canvas data-chart=\"service-latency\" width=\"900\" height=\"220\" role=\"img\" aria-label=\"Latency by service\"></canvas></figure>
</section>",
    );
    page(&s, &headers, &q.0, "overview", "Overview", b)
}

async fn services(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let mut b = String::from(
        "<h1>Services</h1>
<details class=\"form\"><summary>Register an instance</summary>
<form data-api=\"/v1/services/{service}/instances\" data-method=\"POST\" data-then=\"reload\">
<label>Service <input name=\"service\" required pattern=\"[A-Za-z0-9._-]+\" data-path></label>
<label>Address <input name=\"address\" required value=\"127.0.0.1\"></label>
<label>Port <input name=\"port\" type=\"number\" min=\"1\" max=\"65535\" required></label>
<label>Version <input name=\"version\"></label>
<label>Zone <input name=\"zone\"></label>
<label><input name=\"ephemeral\" type=\"checkbox\" data-bool> ephemeral (needs heartbeats)</label>
<button>Register</button><output class=\"result\" role=\"status\"></output>
</form></details>
<div data-live=\"/ui/services\" data-sse=\"/v1/console/kv/watch?prefix=/meshwork/registry/\" data-every=\"500\">",
    );
    let list = s.coord.registry.services();
    if list.is_empty() {
        b.push_str("<p class=\"muted\">No service is registered.</p>");
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">Service</th><th scope=\"col\">Healthy / total</th><th scope=\"col\">Index</th></tr></thead><tbody>");
        for svc in &list {
            let cls = if svc.healthy < svc.instances {
                " class=\"warn\""
            } else {
                ""
            };
            let _ = write!(
                b,
                "<tr{cls}><td><a href=\"/ui/services/{}\">{}</a></td><td>{}/{}</td><td>{}</td></tr>",
                enc(&svc.name),
                esc(&svc.name),
                svc.healthy,
                svc.instances,
                svc.index
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</div>");
    page(&s, &headers, &q.0, "services", "Services", b)
}

async fn service(
    State(s): State<ConsoleState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    q: Q,
) -> Response {
    let d = s.coord.registry.discover(&name, &Filter::default());
    let mut b = format!(
        "<h1>Service <code>{n}</code></h1><p><a href=\"/ui/services\">← all services</a>{tr}</p>
<div data-live=\"/ui/services/{e}\" data-sse=\"/v1/services/{e}/watch\">
<p>{h} of {t} instances healthy · index {i}{p}</p>",
        n = esc(&name),
        e = enc(&name),
        tr = if s.traces.is_some() {
            format!(
                " · <a href=\"/ui/traces?service={}\">its traces</a> · <a href=\"/ui/traces?service={}&amp;error=true\">with errors</a>",
                enc(&name),
                enc(&name)
            )
        } else {
            String::new()
        },
        h = d.healthy_count,
        t = d.total_count,
        i = d.index,
        p = if d.protection_triggered {
            " · <b>protection threshold triggered</b>"
        } else {
            ""
        }
    );
    // Each SDK instance's own breakers and ejections, read from its metrics
    // (in parallel, 500 ms each at most).
    let reads = d
        .instances
        .iter()
        .take(crate::instances::MAX_INSTANCES)
        .map(|v| {
            let sp = &v.instance.spec;
            let addr = format!("{}:{}", sp.address, sp.port);
            let path = sp.metadata.get("metrics_path").cloned();
            async move {
                match path {
                    Some(p) if p.starts_with('/') => crate::instances::fetch(&addr, &p)
                        .await
                        .map(|t| crate::instances::parse(&t)),
                    _ => None,
                }
            }
        });
    let own: Vec<Option<crate::instances::Resilience>> =
        futures_util::future::join_all(reads).await;
    if d.instances.is_empty() {
        b.push_str("<p class=\"muted\">No instance.</p>");
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">Instance</th><th scope=\"col\">Address</th><th scope=\"col\">Zone</th><th scope=\"col\">Version</th><th scope=\"col\">Tags</th><th scope=\"col\">Health</th><th scope=\"col\">Last check</th><th scope=\"col\">Its breakers</th><th scope=\"col\">Actions</th></tr></thead><tbody>");
        for (n, v) in d.instances.iter().enumerate() {
            let breakers = match own.get(n).cloned().flatten() {
                None => "<span class=\"muted\">–</span>".to_string(),
                Some(r) => {
                    let mut t: Vec<String> = r
                        .breakers
                        .iter()
                        .map(|(name, st)| {
                            format!("<span class=\"state-{st}\">{}: {st}</span>", esc(name))
                        })
                        .collect();
                    if r.ejections > 0 {
                        t.push(format!("{} ejections", r.ejections));
                    }
                    if t.is_empty() {
                        "<span class=\"muted\">none yet</span>".to_string()
                    } else {
                        t.join(" ")
                    }
                }
            };
            let sp = &v.instance.spec;
            let detail = v
                .health_detail
                .as_ref()
                .map(|h| format!("{} (by {})", h.detail, h.checker))
                .unwrap_or_default();
            let toggle = if sp.enabled {
                ("false", "Take out of rotation")
            } else {
                ("true", "Put back in rotation")
            };
            let _ = write!(
                b,
                "<tr class=\"health-{health}\"><td><code>{id}</code>{disabled}</td><td>{addr}:{port}</td><td>{zone}</td><td>{ver}</td><td>{tags}</td><td>{health}</td><td>{detail}</td><td>{breakers}</td>
<td class=\"actions\"><button type=\"button\" data-api=\"/v1/services/{es}/instances/{eid}/enabled\" data-method=\"PUT\" data-body='{{\"enabled\":{tv}}}' data-then=\"reload\">{tl}</button>
<button type=\"button\" class=\"danger\" data-api=\"/v1/services/{es}/instances/{eid}\" data-method=\"DELETE\" data-confirm=\"Deregister {id}?\" data-then=\"reload\">Deregister</button></td></tr>",
                health = v.health,
                id = esc(&sp.id),
                disabled = if sp.enabled { "" } else { " <small>(out of rotation)</small>" },
                addr = esc(&sp.address),
                port = sp.port,
                zone = esc(&sp.zone),
                ver = esc(&sp.version),
                tags = esc(&sp.tags.join(", ")),
                detail = esc(&detail),
                es = enc(&name),
                eid = enc(&sp.id),
                tv = toggle.0,
                tl = toggle.1,
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("<h2>Recent events</h2><ul class=\"events\">");
    for e in s.coord.registry.events(Some(&name), 20).iter().rev() {
        let _ = write!(
            b,
            "<li>{}</li>",
            esc(&serde_json::to_string(e).unwrap_or_default())
        );
    }
    b.push_str("</ul></div>");
    page(&s, &headers, &q.0, "services", &name, b)
}

async fn config_list(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let ns = q.0.get("namespace").cloned();
    let mut b = String::from("<h1>Configuration</h1>");
    b.push_str("<nav aria-label=\"Namespaces\" class=\"tabs\"><a href=\"/ui/config\">all</a>");
    for (n, count) in s.coord.config.namespaces() {
        let _ = write!(
            b,
            " <a href=\"/ui/config?namespace={}\"{}>{} ({count})</a>",
            enc(&n),
            if ns.as_deref() == Some(n.as_str()) {
                " aria-current=\"page\""
            } else {
                ""
            },
            esc(&n)
        );
    }
    b.push_str("</nav>");
    b.push_str(
        "<details class=\"form\"><summary>New entry</summary>
<form data-goto=\"/ui/config/{namespace}/{group}/{data_id}\">
<label>Namespace <input name=\"namespace\" required value=\"public\"></label>
<label>Group <input name=\"group\" required value=\"DEFAULT_GROUP\"></label>
<label>Data id <input name=\"data_id\" required></label>
<button>Open the editor</button></form></details>",
    );
    let entries = s.coord.config.list(ns.as_deref(), None);
    if entries.is_empty() {
        b.push_str("<p class=\"muted\">No entry.</p>");
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">Namespace</th><th scope=\"col\">Group</th><th scope=\"col\">Data id</th><th scope=\"col\">Format</th><th scope=\"col\">Version</th><th scope=\"col\">Author</th><th scope=\"col\">Gray release</th></tr></thead><tbody>");
        for e in &entries {
            let k = &e.key;
            let beta = if s.coord.config.beta(k).is_some() {
                "<b>active</b>"
            } else {
                ""
            };
            let secret = if e.secret {
                " <span class=\"badge\">secret</span>"
            } else {
                ""
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td><a href=\"/ui/config/{}/{}/{}\">{}</a>{secret}</td><td>{}</td><td>{}</td><td>{}</td><td>{beta}</td></tr>",
                esc(&k.namespace),
                esc(&k.group),
                enc(&k.namespace),
                enc(&k.group),
                enc(&k.data_id),
                esc(&k.data_id),
                e.format,
                e.version,
                esc(&e.author)
            );
        }
        b.push_str("</tbody></table>");
    }
    page(&s, &headers, &q.0, "config", "Configuration", b)
}

async fn config_entry(
    State(s): State<ConsoleState>,
    Path((ns, group, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    q: Q,
) -> Response {
    let key = match ConfigKey::new(&ns, &group, &id) {
        Ok(k) => k,
        Err(e) => {
            return page(
                &s,
                &headers,
                &q.0,
                "config",
                "Configuration",
                format!(
                    "<h1>Configuration</h1><p class=\"error\">{}</p>",
                    esc(&e.to_string())
                ),
            );
        }
    };
    let path = format!("{}/{}/{}", enc(&ns), enc(&group), enc(&id));
    let entry = s.coord.config.get(&key);
    let history = s.coord.config.history(&key, 50).await.unwrap_or_default();
    let mut b = format!(
        "<h1>Config <code>{}</code></h1><p><a href=\"/ui/config\">← all entries</a></p>",
        esc(&key.to_string())
    );
    // A secret entry's content never reaches the page: `get` gives it without.
    let secret = entry.as_ref().is_some_and(|e| e.secret);
    let (content, format, version) = entry
        .as_ref()
        .map(|e| (mask(&e.content), e.format.as_str(), e.version))
        .unwrap_or_default();
    let (content_label, secret_box) = if secret {
        (
            "Content: a secret, encrypted at rest and never shown here; type the whole new content to replace it",
            "",
        )
    } else {
        (
            "Content (secret values are masked; type them again to change them)",
            "<label><input type=\"checkbox\" name=\"secret\"> Secret (encrypted at rest, hidden here, readable only with the secrets:read scope)</label>",
        )
    };
    let format = if format.is_empty() { "text" } else { format };
    let mut options = String::new();
    for f in ["text", "json", "toml", "yaml", "properties"] {
        let _ = write!(
            options,
            "<option value=\"{f}\"{}>{f}</option>",
            if f == format { " selected" } else { "" }
        );
    }
    let _ = write!(
        b,
        "<section><h2>Editor</h2>
<form class=\"editor\" data-api=\"/v1/config/{path}\" data-method=\"PUT\" data-validate=\"/v1/console/validate\" data-then=\"reload\">
<label>Format <select name=\"format\">{options}</select></label>
<label class=\"wide\">{content_label}
<textarea name=\"content\" rows=\"14\" spellcheck=\"false\">{content}</textarea></label>
{secret_box}
<label>Description <input name=\"description\"></label>
<input type=\"hidden\" name=\"author\" value=\"{author}\">
<input type=\"hidden\" name=\"if_version\" value=\"{version}\" data-number>
<div class=\"buttons\"><button type=\"button\" data-validate-only>Validate</button> <button>Publish</button></div>
<output class=\"result\" role=\"status\"></output>
</form></section>",
        content = esc(&content),
        author = esc(&format!(
            "console{}",
            s.auth
                .as_ref()
                .and_then(|a| a.user_of(&headers))
                .map(|u| format!(" ({u})"))
                .unwrap_or_default()
        )),
    );
    if let Some(beta) = s.coord.config.beta(&key).filter(|_| !secret) {
        let _ = write!(
            b,
            "<section><h2>Gray release</h2><p>Serving a beta to addresses <code>{}</code> and labels <code>{}</code> since {}.</p>
<button type=\"button\" data-api=\"/v1/config/{path}/beta/promote\" data-method=\"POST\" data-body='{{}}' data-then=\"reload\">Promote to everyone</button>
<button type=\"button\" class=\"danger\" data-api=\"/v1/config/{path}/beta\" data-method=\"DELETE\" data-then=\"reload\">Withdraw</button>
<pre>{}</pre></section>",
            esc(&beta.addresses.join(", ")),
            esc(&serde_json::to_string(&beta.labels).unwrap_or_default()),
            fmt_ms(beta.created_at_ms),
            esc(&mask(&beta.content))
        );
    }
    b.push_str("<section><h2>History</h2>");
    if history.is_empty() {
        b.push_str("<p class=\"muted\">No version yet.</p>");
    } else {
        b.push_str("<form method=\"get\" class=\"diffpick\"><table><thead><tr><th scope=\"col\">From</th><th scope=\"col\">To</th><th scope=\"col\">Version</th><th scope=\"col\">Op</th><th scope=\"col\">Author</th><th scope=\"col\">Description</th><th scope=\"col\"></th></tr></thead><tbody>");
        let to_default = history.first().map_or(0, |h| h.entry.version);
        let from_default = history.get(1).map_or(to_default, |h| h.entry.version);
        for (i, h) in history.iter().enumerate() {
            let v = h.entry.version;
            let _ = write!(
                b,
                "<tr><td><input type=\"radio\" name=\"from\" value=\"{v}\" aria-label=\"diff from {v}\"{}></td><td><input type=\"radio\" name=\"to\" value=\"{v}\" aria-label=\"diff to {v}\"{}></td><td>{v}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if v == from_default { " checked" } else { "" },
                if v == to_default { " checked" } else { "" },
                esc(&h.op),
                esc(&h.entry.author),
                esc(&h.entry.description),
                if i == 0 {
                    String::new()
                } else {
                    format!(
                        "<button type=\"button\" data-api=\"/v1/config/{path}/rollback\" data-method=\"POST\" data-body='{{\"version\":{v}}}' data-confirm=\"Roll back to version {v}?\" data-then=\"reload\">Roll back to {v}</button>"
                    )
                }
            );
        }
        b.push_str("</tbody></table><button>Compare</button></form>");
        let from =
            q.0.get("from")
                .and_then(|v| v.parse().ok())
                .unwrap_or(from_default);
        let to =
            q.0.get("to")
                .and_then(|v| v.parse().ok())
                .unwrap_or(to_default);
        if from != to && secret {
            // Older versions may predate the secret mark: none is shown.
            b.push_str("<p class=\"muted\">Versions of a secret entry are not compared here (the API's diff needs the secrets:read scope).</p>");
        } else if from != to {
            match s.coord.config.diff(&key, from, to).await {
                Ok(d) if d.secret => {
                    b.push_str("<p class=\"muted\">Secret versions are not compared here (the API's diff needs the secrets:read scope).</p>");
                }
                Ok(d) => {
                    let _ = write!(
                        b,
                        "<h3>Version {from} → {to}</h3><table class=\"diff\" aria-label=\"Side-by-side diff\"><thead><tr><th scope=\"col\">#</th><th scope=\"col\">Version {from}</th><th scope=\"col\">#</th><th scope=\"col\">Version {to}</th></tr></thead><tbody>"
                    );
                    for r in &d.rows {
                        let kind = serde_json::to_value(r.kind)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default();
                        let _ = write!(
                            b,
                            "<tr class=\"d-{kind}\"><td>{}</td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td></tr>",
                            r.old_line.map(|n| n.to_string()).unwrap_or_default(),
                            esc(&mask(r.old.as_deref().unwrap_or(""))),
                            r.new_line.map(|n| n.to_string()).unwrap_or_default(),
                            esc(&mask(r.new.as_deref().unwrap_or("")))
                        );
                    }
                    b.push_str("</tbody></table>");
                }
                Err(e) => {
                    let _ = write!(b, "<p class=\"error\">{}</p>", esc(&e.to_string()));
                }
            }
        }
    }
    b.push_str("</section>");
    page(&s, &headers, &q.0, "config", &key.to_string(), b)
}

async fn gateway(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let mut b = String::from("<h1>Gateway</h1>");
    let Some(g) = &s.gateway else {
        b.push_str("<p class=\"muted\">This node does not run the gateway role (start it with <code>--gateway-addr</code>).</p>");
        return page(&s, &headers, &q.0, "gateway", "Gateway", b);
    };
    b.push_str(
        "<section><h2>Which route matches?</h2>
<form class=\"explain\" data-explain=\"/gateway/explain\">
<label>Method <select name=\"method\"><option>GET</option><option>POST</option><option>PUT</option><option>DELETE</option><option>PATCH</option></select></label>
<label class=\"wide\">URL <input name=\"url\" type=\"url\" required placeholder=\"http://localhost:8080/api/orders\"></label>
<button>Explain</button><pre class=\"result\" role=\"status\"></pre></form></section>
<div data-live=\"/ui/gateway\" data-sse=\"/v1/console/stream\" data-every=\"2000\">",
    );
    let c = g.counters();
    let _ = write!(
        b,
        "<p>{} requests · {} connections open · {} with no route · table version {}</p>",
        c.requests_total, c.active_connections, c.no_route_total, c.routes_version
    );
    b.push_str("<section><h2>Routes, in matching order</h2><table><thead><tr><th scope=\"col\">#</th><th scope=\"col\">Route</th><th scope=\"col\">Priority</th><th scope=\"col\">Action</th><th scope=\"col\">Requests</th><th scope=\"col\">p99 ms</th><th scope=\"col\">1xx–5xx</th><th scope=\"col\">Rate limited</th><th scope=\"col\">In flight</th><th scope=\"col\">Breakers</th></tr></thead><tbody>");
    for (i, r) in g.route_info().iter().enumerate() {
        let br = r
            .breakers
            .iter()
            .map(|(t, st)| format!("<span class=\"state-{st}\">{}: {st}</span>", esc(t)))
            .collect::<Vec<_>>()
            .join(" ");
        let sc = r.counters.status_classes;
        // With a trace store on this node, the counters lead to their traces.
        let traces = |extra: &str, text: String| match &s.traces {
            Some(_) => format!(
                "<a href=\"/ui/traces?service=gateway&amp;attr={}{extra}\">{text}</a>",
                enc(&format!("meshwork.route={}", r.name))
            ),
            None => text,
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td><b>{}</b></td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{} / {} / {} / {} / {}</td><td>{}</td><td>{}</td><td>{br}</td></tr>",
            i + 1,
            esc(&r.name),
            r.priority,
            esc(&r.action),
            traces("", r.counters.requests.to_string()),
            r.counters
                .p99_ms
                .map_or_else(|| "–".to_string(), |v| format!("≤ {v}")),
            sc[0],
            sc[1],
            sc[2],
            sc[3],
            traces("&amp;error=true", sc[4].to_string()),
            r.counters.rate_limited,
            r.counters.active
        );
    }
    b.push_str("</tbody></table></section><section><h2>Upstreams</h2>");
    for cl in g.upstreams() {
        let _ = write!(
            b,
            "<h3>{}</h3><p>{} ejections so far · {} excluded (unhealthy or filtered){}</p><table><thead><tr><th scope=\"col\">Endpoint</th><th scope=\"col\">Healthy</th><th scope=\"col\">Outlier state</th><th scope=\"col\">In flight</th><th scope=\"col\">Latency ms</th><th scope=\"col\">Tries</th><th scope=\"col\">Failures</th></tr></thead><tbody>",
            esc(&cl.name),
            cl.ejections_total,
            cl.excluded,
            if cl.endpoints.iter().any(|e| e.outlier.panic) {
                " · <b>panic</b>: too few endpoints admitted, ejections ignored"
            } else {
                ""
            }
        );
        for e in &cl.endpoints {
            let _ = write!(
                b,
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
                if e.outlier.state == "active" {
                    ""
                } else {
                    "warn"
                },
                e.addr,
                e.healthy,
                outlier_state(&e.outlier),
                e.in_flight,
                e.latency_ewma_ms,
                e.requests,
                e.failures
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section></div>");
    b.push_str("<section><h2>Live</h2><figure><figcaption>Requests per second by route</figcaption><canvas data-chart=\"route-rate\" width=\"900\" height=\"220\" role=\"img\" aria-label=\"Requests per second by route\"></canvas></figure>
<figure><figcaption>p99 latency by route, ms (last 10 s, bucket bounds)</figcaption><canvas data-chart=\"route-p99\" width=\"900\" height=\"220\" role=\"img\" aria-label=\"p99 latency by route\"></canvas></figure>
<figure><figcaption>5xx per second by route</figcaption><canvas data-chart=\"route-errors\" width=\"900\" height=\"220\" role=\"img\" aria-label=\"Errors per second by route\"></canvas></figure></section>");
    page(&s, &headers, &q.0, "gateway", "Gateway", b)
}

/// "Why is it out": the outlier state of an endpoint in words.
fn outlier_state(o: &meshwork_gateway::OutlierSnapshot) -> String {
    let why = o.reason.unwrap_or("").replace('_', " ");
    match o.state {
        "ejected" => format!(
            "ejected ({why}; {} times in a row), trial in {:.1} s",
            o.times_ejected,
            o.remaining_ms.unwrap_or(0) as f64 / 1000.0
        ),
        "trial" => format!("on trial after {why}: one request at a time"),
        _ => "active".into(),
    }
}

async fn kv(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let prefix = q.0.get("prefix").cloned().unwrap_or_default();
    let mut b = String::from("<h1>KV browser</h1>");
    // The raw keyspace is for administrators (scope `admin`) once a login is
    // configured, as its API is.
    if s.auth
        .as_ref()
        .is_some_and(|a| !a.principal_of(&headers).is_some_and(|p| p.is_admin()))
    {
        b.push_str(
            "<p><a href=\"/ui/login\">Sign in</a> as an administrator to browse the keyspace.</p>",
        );
        return page(&s, &headers, &q.0, "kv", "KV browser", b);
    }
    // Breadcrumbs.
    b.push_str("<nav aria-label=\"Prefix\" class=\"crumbs\"><a href=\"/ui/kv\">(root)</a>");
    let mut acc = String::new();
    for part in prefix.split_inclusive('/') {
        acc.push_str(part);
        let _ = write!(
            b,
            " <a href=\"/ui/kv?prefix={}\">{}</a>",
            enc(&acc),
            esc(part)
        );
    }
    b.push_str("</nav>");
    match s.kv_list(&prefix).await {
        Ok(l) => {
            let _ = write!(
                b,
                "<p>revision {}{}</p>",
                l.revision,
                if l.truncated {
                    " · <b>listing truncated</b>"
                } else {
                    ""
                }
            );
            b.push_str("<ul class=\"dirs\">");
            for (d, n) in &l.dirs {
                let _ = write!(
                    b,
                    "<li><a href=\"/ui/kv?prefix={}\">{}</a> <small>({n} keys)</small></li>",
                    enc(d),
                    esc(&d[prefix.len().min(d.len())..])
                );
            }
            b.push_str("</ul>");
            if !l.keys.is_empty() {
                b.push_str("<table><thead><tr><th scope=\"col\">Key</th><th scope=\"col\">Modified at</th><th scope=\"col\">Version</th><th scope=\"col\">Lease</th></tr></thead><tbody>");
                for k in &l.keys {
                    let _ = write!(
                        b,
                        "<tr><td><a href=\"/ui/kv?prefix={}&key={}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        enc(&prefix),
                        enc(&k.key),
                        esc(&k.key),
                        k.mod_revision,
                        k.version,
                        if k.lease == 0 {
                            "-".to_string()
                        } else {
                            format!("{:x}", k.lease)
                        }
                    );
                }
                b.push_str("</tbody></table>");
            }
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(e.message()));
        }
    }
    if let Some(key) = q.0.get("key") {
        match s.kv_history(key).await {
            Ok(h) => {
                let _ = write!(b, "<section><h2>Key <code>{}</code></h2>", esc(&h.key));
                for (i, r) in h.revisions.iter().enumerate() {
                    let _ = write!(
                        b,
                        "<h3>{} revision {} · version {} · {} bytes</h3><pre>{}</pre>",
                        if i == 0 { "Current," } else { "Earlier," },
                        r.mod_revision,
                        r.version,
                        r.size,
                        esc(&r.value)
                    );
                }
                if h.compacted {
                    b.push_str("<p class=\"muted\">Older revisions were compacted away.</p>");
                }
                b.push_str("</section>");
            }
            Err(e) => {
                let _ = write!(b, "<p class=\"error\">{}</p>", esc(e.message()));
            }
        }
    }
    let _ = write!(
        b,
        "<section><h2>Watch <code>{p}</code></h2><p><button type=\"button\" data-watch=\"/v1/console/kv/watch?prefix={e}\" aria-controls=\"watch-log\">Start watching</button></p>
<table><thead><tr><th scope=\"col\">Revision</th><th scope=\"col\">Event</th><th scope=\"col\">Key</th><th scope=\"col\">Value</th></tr></thead><tbody id=\"watch-log\" aria-live=\"polite\"></tbody></table></section>",
        p = esc(if prefix.is_empty() { "(everything)" } else { &prefix }),
        e = enc(&prefix)
    );
    page(&s, &headers, &q.0, "kv", "KV", b)
}

async fn locks(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let mut b = String::from(
        "<h1>Locks and elections</h1><div data-live=\"/ui/locks\" data-sse=\"/v1/console/kv/watch?prefix=/meshwork/\" data-every=\"500\">",
    );
    match s.locks().await {
        Ok(v) => {
            b.push_str("<section><h2>Locks</h2>");
            if v.locks.is_empty() {
                b.push_str("<p class=\"muted\">No lock is held.</p>");
            } else {
                b.push_str("<table><thead><tr><th scope=\"col\">Lock</th><th scope=\"col\">Holder</th><th scope=\"col\">Since</th><th scope=\"col\">Fencing token</th><th scope=\"col\">Lease</th><th scope=\"col\">Waiting</th></tr></thead><tbody>");
                for l in &v.locks {
                    let _ = write!(
                        b,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:x}</td><td>{}</td></tr>",
                        esc(&l.name),
                        esc(&l.holder),
                        fmt_ms(l.requested_at_ms),
                        l.held.fencing_token,
                        l.held.lease,
                        l.waiters
                    );
                }
                b.push_str("</tbody></table>");
            }
            b.push_str("</section><section><h2>Elections</h2>");
            if v.elections.is_empty() {
                b.push_str("<p class=\"muted\">No election has a leader.</p>");
            } else {
                b.push_str("<table><thead><tr><th scope=\"col\">Election</th><th scope=\"col\">Leader value</th><th scope=\"col\">Fencing token</th><th scope=\"col\">Lease</th><th scope=\"col\">Candidates waiting</th></tr></thead><tbody>");
                for e in &v.elections {
                    let _ = write!(
                        b,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:x}</td><td>{}</td></tr>",
                        esc(&e.name),
                        esc(&e.value),
                        e.fencing_token,
                        e.lease,
                        e.candidates
                    );
                }
                b.push_str("</tbody></table>");
            }
            b.push_str("</section>");
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(e.message()));
        }
    }
    b.push_str("</div>");
    page(&s, &headers, &q.0, "locks", "Locks", b)
}

async fn login(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let b = if s.auth.is_none() {
        "<h1>Sign in</h1><p>No login is configured: writes are open. Set <code>[console] password</code> (or <code>MESHWORK_CONSOLE_PASSWORD</code>) to require one.</p>".to_string()
    } else {
        "<h1>Sign in</h1>
<form class=\"login\" data-api=\"/v1/console/login\" data-method=\"POST\" data-then=\"home\">
<label>User <input name=\"user\" autocomplete=\"username\" required value=\"admin\"></label>
<label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>
<button>Sign in</button><output class=\"result\" role=\"status\"></output></form>"
            .to_string()
    };
    page(&s, &headers, &q.0, "", "Sign in", b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_dates() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
        assert_eq!(fmt_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_ms(1_795_445_396_703), "2026-11-23 14:49:56 UTC");
        assert_eq!(fmt_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
