//! The Traces pages (a node with the `traces` role): `/ui/traces` searches the
//! trace store (service, operation, duration, errors, attributes) and shows
//! the service dependency graph; `/ui/traces/{id}` shows one trace as a
//! waterfall — spans nested under their parents (collapsible), bars on the
//! trace's time axis, the critical path marked, each span's attributes and
//! events a click away. Server-rendered from the store: they work without
//! JavaScript and are what the browser tests read.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use http::HeaderMap;
use meshwork_traces::TraceStore;
use meshwork_traces::api::{parse_query, parse_trace_id, span_json};
use serde_json::Value;

use crate::ConsoleState;
use crate::pages::{esc, page};

fn no_store() -> String {
    "<h1>Traces</h1><p class=\"muted\">This node does not run the trace store (the <code>traces</code> role: \
     <code>--otlp-grpc-addr</code> / <code>--otlp-http-addr</code>; on in <code>meshwork up</code>).</p>"
        .to_string()
}

fn fmt_dur(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.0} µs", ms * 1000.0)
    }
}

fn fmt_start(ms: f64) -> String {
    crate::pages::fmt_ms(ms as u64)
}

/// `/ui/traces`: the search form, the newest matching traces, the graph.
pub(crate) async fn list(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q: HashMap<String, String> = form_pairs(raw.as_deref());
    let Some(store) = s.traces.clone() else {
        return page(&s, &headers, &q, "traces", "Traces", no_store());
    };
    // The form's own parameters only (`fragment` is the page's); `last`
    // (a window in minutes) becomes the search's start time.
    let mut pairs: Vec<(String, String)> = form_list(raw.as_deref())
        .into_iter()
        .filter(|(k, v)| k != "fragment" && k != "last" && !v.is_empty())
        .collect();
    if let Some(minutes) = q.get("last").and_then(|m| m.parse::<u64>().ok()) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        pairs.push((
            "start_ms".into(),
            now.saturating_sub(minutes * 60_000).to_string(),
        ));
    }
    let search_raw: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let mut b = String::from("<h1>Traces</h1>");
    search_form(&mut b, &store, &q);
    match parse_query(Some(search_raw)) {
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"error\" role=\"alert\">{}</p>",
                esc(e.message())
            );
        }
        Ok(query) => {
            let store2 = store.clone();
            let found = tokio::task::spawn_blocking(move || store2.search(&query)).await;
            match found {
                Ok(Ok(traces)) => results(&mut b, &traces),
                Ok(Err(e)) => {
                    let _ = write!(b, "<p class=\"error\">{}</p>", esc(&e.to_string()));
                }
                Err(e) => {
                    let _ = write!(b, "<p class=\"error\">{}</p>", esc(&e.to_string()));
                }
            }
        }
    }
    graph(&mut b, &store);
    page(&s, &headers, &q, "traces", "Traces", b)
}

fn form_list(raw: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn form_pairs(raw: Option<&str>) -> HashMap<String, String> {
    form_list(raw).into_iter().collect()
}

fn search_form(b: &mut String, store: &TraceStore, q: &HashMap<String, String>) {
    let val = |k: &str| esc(q.get(k).map_or("", String::as_str));
    let services = store.services();
    b.push_str("<form method=\"get\" action=\"/ui/traces\" aria-label=\"Search traces\">");
    let _ = write!(
        b,
        "<label>Service<input name=\"service\" list=\"trace-services\" value=\"{}\"></label>",
        val("service")
    );
    b.push_str("<datalist id=\"trace-services\">");
    for (name, _) in &services {
        let _ = write!(b, "<option value=\"{}\">", esc(name));
    }
    b.push_str("</datalist>");
    let _ = write!(
        b,
        "<label>Operation<input name=\"operation\" list=\"trace-ops\" value=\"{}\"></label><datalist id=\"trace-ops\">",
        val("operation")
    );
    let chosen = q.get("service").map(String::as_str).unwrap_or("");
    for (name, ops) in &services {
        if name == chosen {
            for op in ops.iter().take(500) {
                let _ = write!(b, "<option value=\"{}\">", esc(op));
            }
        }
    }
    b.push_str("</datalist>");
    let _ = write!(
        b,
        "<label>Min duration (ms)<input name=\"min_duration_ms\" inputmode=\"decimal\" size=\"8\" value=\"{}\"></label>\
         <label>Max duration (ms)<input name=\"max_duration_ms\" inputmode=\"decimal\" size=\"8\" value=\"{}\"></label>\
         <label>Errors<select name=\"error\">",
        val("min_duration_ms"),
        val("max_duration_ms")
    );
    for (v, label) in [("", "any"), ("true", "with errors"), ("false", "without")] {
        let sel = if q.get("error").map(String::as_str).unwrap_or("") == v {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option value=\"{v}\"{sel}>{label}</option>");
    }
    b.push_str("</select></label><label>Within<select name=\"last\">");
    for (v, label) in [
        ("", "any time"),
        ("1", "last minute"),
        ("15", "last 15 minutes"),
        ("60", "last hour"),
        ("1440", "last day"),
    ] {
        let sel = if q.get("last").map(String::as_str).unwrap_or("") == v {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option value=\"{v}\"{sel}>{label}</option>");
    }
    b.push_str("</select></label><label>Order<select name=\"sort\">");
    for (v, label) in [("", "newest first"), ("duration", "slowest first")] {
        let sel = if q.get("sort").map(String::as_str).unwrap_or("") == v {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option value=\"{v}\"{sel}>{label}</option>");
    }
    let _ = write!(
        b,
        "</select></label>\
         <label>Attribute<input name=\"attr\" placeholder=\"http.response.status_code=503\" value=\"{}\"></label>\
         <label>Limit<input name=\"limit\" inputmode=\"numeric\" size=\"4\" value=\"{}\"></label>\
         <div class=\"buttons\"><button type=\"submit\">Search</button></div></form>",
        val("attr"),
        q.get("limit").map_or_else(|| "20".to_string(), |l| esc(l))
    );
}

fn results(b: &mut String, traces: &[meshwork_traces::TraceSummary]) {
    if traces.is_empty() {
        b.push_str("<p class=\"muted\" id=\"trace-results\">No trace matches.</p>");
        return;
    }
    let longest = traces
        .iter()
        .map(|t| t.duration_ms)
        .fold(0.0_f64, f64::max)
        .max(1e-6);
    b.push_str("<table id=\"trace-results\"><thead><tr><th scope=\"col\">Started</th><th scope=\"col\">Root</th><th scope=\"col\">Duration</th><th scope=\"col\">Spans</th><th scope=\"col\">Errors</th><th scope=\"col\">Services</th><th scope=\"col\">Trace</th></tr></thead><tbody>");
    for t in traces {
        let services: Vec<String> = t
            .services
            .iter()
            .map(|(s, n)| format!("{} ({n})", esc(s)))
            .collect();
        let _ = write!(
            b,
            "<tr{}><td>{}</td><td>{}: {}</td><td><span class=\"dur\" style=\"--w:{:.1}%\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/ui/traces/{}\"><code>{}</code></a></td></tr>",
            if t.errors > 0 { " class=\"warn\"" } else { "" },
            esc(&fmt_start(t.start_ms)),
            esc(&t.root_service),
            esc(&t.root_operation),
            t.duration_ms / longest * 100.0,
            fmt_dur(t.duration_ms),
            t.spans,
            t.errors,
            services.join(", "),
            esc(&t.trace_id),
            esc(&t.trace_id[..16.min(t.trace_id.len())]),
        );
    }
    b.push_str("</tbody></table>");
}

/// The dependency graph: a table of edges, and the services laid out in
/// columns by their depth from the callers that nobody calls.
fn graph(b: &mut String, store: &TraceStore) {
    let (edges, seen) = store.dependencies(0, u64::MAX, meshwork_traces::api::MAX_GRAPH_TRACES);
    b.push_str("<section id=\"trace-graph\"><h2>Service dependencies</h2>");
    if edges.is_empty() {
        b.push_str("<p class=\"muted\">No calls between services seen yet.</p></section>");
        return;
    }
    // Depth of each service: longest chain of callers above it (cycles cut).
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for e in &edges {
        depth.entry(e.parent.as_str()).or_insert(0);
        depth.entry(e.child.as_str()).or_insert(0);
    }
    for _ in 0..depth.len() {
        let mut changed = false;
        for e in &edges {
            let d = depth[e.parent.as_str()] + 1;
            if d > depth[e.child.as_str()] && d < depth.len() {
                depth.insert(e.child.as_str(), d);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut columns: Vec<Vec<&str>> = Vec::new();
    let mut names: Vec<&str> = depth.keys().copied().collect();
    names.sort_unstable();
    for n in names {
        let d = depth[n];
        if columns.len() <= d {
            columns.resize(d + 1, Vec::new());
        }
        columns[d].push(n);
    }
    let (cw, rh) = (190.0, 56.0);
    let rows = columns.iter().map(Vec::len).max().unwrap_or(1);
    let (w, h) = (columns.len() as f64 * cw + 20.0, rows as f64 * rh + 20.0);
    let mut pos: HashMap<&str, (f64, f64)> = HashMap::new();
    for (c, col) in columns.iter().enumerate() {
        for (r, n) in col.iter().enumerate() {
            pos.insert(n, (10.0 + c as f64 * cw, 10.0 + r as f64 * rh));
        }
    }
    let _ = write!(
        b,
        "<svg class=\"graph\" role=\"img\" aria-label=\"Service dependency graph\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker></defs>"
    );
    for e in &edges {
        let (Some(&(x1, y1)), Some(&(x2, y2))) =
            (pos.get(e.parent.as_str()), pos.get(e.child.as_str()))
        else {
            continue;
        };
        let class = if e.errors > 0 { "edge bad" } else { "edge" };
        let _ = write!(
            b,
            "<line class=\"{class}\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" marker-end=\"url(#arrow)\"><title>{} → {}: {} calls, {} errors</title></line>",
            x1 + 140.0,
            y1 + 16.0,
            x2,
            y2 + 16.0,
            esc(&e.parent),
            esc(&e.child),
            e.calls,
            e.errors
        );
    }
    for (n, (x, y)) in &pos {
        let _ = write!(
            b,
            "<a href=\"/ui/traces?service={}\"><rect class=\"node\" x=\"{x}\" y=\"{y}\" width=\"140\" height=\"32\" rx=\"5\"/><text x=\"{}\" y=\"{}\">{}</text></a>",
            crate::pages::enc(n),
            x + 8.0,
            y + 21.0,
            esc(n)
        );
    }
    b.push_str("</svg>");
    let _ = write!(
        b,
        "<table><thead><tr><th scope=\"col\">Caller</th><th scope=\"col\">Callee</th><th scope=\"col\">Calls</th><th scope=\"col\">Errors</th><th scope=\"col\">Error rate</th></tr></thead><tbody>"
    );
    for e in &edges {
        let rate = e.errors as f64 / e.calls.max(1) as f64 * 100.0;
        let _ = write!(
            b,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/ui/traces?service={}&amp;error=true\">{}</a></td><td>{rate:.1} %</td></tr>",
            if e.errors > 0 { " class=\"warn\"" } else { "" },
            esc(&e.parent),
            esc(&e.child),
            e.calls,
            crate::pages::enc(&e.child),
            e.errors,
        );
    }
    let _ = write!(
        b,
        "</tbody></table><p class=\"muted\">From the newest {seen} traces.</p></section>"
    );
}

/// One span of the waterfall, with its children.
struct Node {
    span: Value,
    start: f64,
    end: f64,
    children: Vec<usize>,
    critical: bool,
}

/// `/ui/traces/{id}`: the waterfall.
pub(crate) async fn detail(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = form_pairs(raw.as_deref());
    let Some(store) = s.traces.clone() else {
        return page(&s, &headers, &q, "traces", "Traces", no_store());
    };
    let title = format!("Trace {id}");
    let Some(tid) = parse_trace_id(&id) else {
        let b = format!(
            "<h1>{}</h1><p class=\"error\" role=\"alert\">A trace id is 32 hex digits.</p>",
            esc(&title)
        );
        return page(&s, &headers, &q, "traces", &title, b);
    };
    let spans = match tokio::task::spawn_blocking(move || store.trace(&tid)).await {
        Ok(Ok(Some(spans))) => spans,
        Ok(Ok(None)) => {
            let b = format!(
                "<h1>{}</h1><p class=\"muted\">No such trace in the store (never received, or removed by retention).</p><p><a href=\"/ui/traces\">Search traces</a></p>",
                esc(&title)
            );
            return page(&s, &headers, &q, "traces", &title, b);
        }
        Ok(Err(e)) => {
            let b = format!(
                "<h1>{}</h1><p class=\"error\">{}</p>",
                esc(&title),
                esc(&e.to_string())
            );
            return page(&s, &headers, &q, "traces", &title, b);
        }
        Err(e) => {
            let b = format!(
                "<h1>{}</h1><p class=\"error\">{}</p>",
                esc(&title),
                esc(&e.to_string())
            );
            return page(&s, &headers, &q, "traces", &title, b);
        }
    };
    let mut b = waterfall(&id, spans.iter().map(span_json).collect());
    log_lines(&mut b, &id.to_ascii_lowercase());
    page(&s, &headers, &q, "traces", &title, b)
}

/// This node's own log lines written inside the trace's spans.
fn log_lines(b: &mut String, id: &str) {
    let lines = meshwork_telemetry::logs::global()
        .map(|l| l.for_trace(id))
        .unwrap_or_default();
    b.push_str("<section id=\"trace-logs\"><h2>Log lines on this node</h2>");
    if lines.is_empty() {
        b.push_str("<p class=\"muted\">None: this node wrote no log line inside the trace's spans (or they left its ring of the newest 10,000).</p></section>");
        return;
    }
    b.push_str("<table><thead><tr><th scope=\"col\">Time</th><th scope=\"col\">Level</th><th scope=\"col\">Span</th><th scope=\"col\">Target</th><th scope=\"col\">Message</th></tr></thead><tbody>");
    for l in lines {
        let _ = write!(
            b,
            "<tr{}><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td></tr>",
            if l.level == "ERROR" || l.level == "WARN" {
                " class=\"warn\""
            } else {
                ""
            },
            esc(&crate::pages::fmt_ms(l.time_ms)),
            esc(&l.level),
            esc(&l.span_id),
            esc(&l.target),
            esc(&l.message),
        );
    }
    b.push_str("</tbody></table></section>");
}

fn waterfall(id: &str, spans: Vec<Value>) -> String {
    let mut nodes: Vec<Node> = spans
        .into_iter()
        .map(|s| {
            let start = s["start_ms"].as_f64().unwrap_or(0.0);
            let end = start + s["duration_ms"].as_f64().unwrap_or(0.0);
            Node {
                span: s,
                start,
                end,
                children: Vec::new(),
                critical: false,
            }
        })
        .collect();
    let by_id: HashMap<String, usize> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.span["span_id"].as_str().map(|s| (s.to_string(), i)))
        .collect();
    let mut roots = Vec::new();
    for i in 0..nodes.len() {
        let parent = nodes[i].span["parent_span_id"]
            .as_str()
            .and_then(|p| by_id.get(p).copied())
            .filter(|&p| p != i);
        match parent {
            Some(p) => nodes[p].children.push(i),
            None => roots.push(i),
        }
    }
    for n in 0..nodes.len() {
        let mut c = std::mem::take(&mut nodes[n].children);
        c.sort_by(|a, b| nodes[*a].start.total_cmp(&nodes[*b].start));
        nodes[n].children = c;
    }
    let t0 = nodes.iter().map(|n| n.start).fold(f64::INFINITY, f64::min);
    let t1 = nodes
        .iter()
        .map(|n| n.end)
        .fold(f64::NEG_INFINITY, f64::max);
    let total = (t1 - t0).max(1e-6);
    // The critical path: from the root that ends last, down through the child
    // that ends last before its parent's end (what the parent waited for).
    if let Some(&root) = roots
        .iter()
        .max_by(|a, b| nodes[**a].end.total_cmp(&nodes[**b].end))
    {
        let mut at = Some(root);
        while let Some(i) = at {
            nodes[i].critical = true;
            let end = nodes[i].end;
            at = nodes[i]
                .children
                .iter()
                .copied()
                .filter(|&c| nodes[c].start <= end)
                .max_by(|a, b| nodes[*a].end.min(end).total_cmp(&nodes[*b].end.min(end)));
        }
    }
    let errors = nodes
        .iter()
        .filter(|n| n.span["status"]["code"] == "error")
        .count();
    let mut services: Vec<&str> = nodes
        .iter()
        .filter_map(|n| n.span["service"].as_str())
        .collect();
    services.sort_unstable();
    services.dedup();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Trace <code>{}</code></h1><dl class=\"kv\"><dt>Started</dt><dd>{}</dd><dt>Duration</dt><dd>{}</dd><dt>Spans</dt><dd>{}</dd><dt>Errors</dt><dd>{}</dd><dt>Services</dt><dd>{}</dd></dl>\
         <p class=\"muted\">Spans nest under their parents (click a row to fold it, its <em>details</em> for attributes and events); \
         <span class=\"crit-key\">marked</span> spans are the critical path. <a href=\"/v1/traces/{}\">JSON</a></p>\
         <div class=\"waterfall\" role=\"tree\" aria-label=\"Spans\">",
        esc(id),
        esc(&fmt_start(t0)),
        fmt_dur(total),
        nodes.len(),
        errors,
        esc(&services.join(", ")),
        esc(id),
    );
    fn row(b: &mut String, nodes: &[Node], i: usize, t0: f64, total: f64, depth: usize) {
        let n = &nodes[i];
        let s = &n.span;
        let left = (n.start - t0) / total * 100.0;
        let width = ((n.end - n.start) / total * 100.0).max(0.3);
        let err = s["status"]["code"] == "error";
        let mut class = String::from("span");
        if err {
            class.push_str(" err");
        }
        if n.critical {
            class.push_str(" crit");
        }
        let head = format!(
            "<span class=\"sname\" style=\"padding-left:{}em\"><b>{}</b> {} <small class=\"muted\">{}</small></span>\
             <span class=\"track\"><span class=\"bar\" style=\"left:{left:.3}%;width:{width:.3}%\"></span></span>\
             <span class=\"sdur\">{}</span>",
            depth,
            esc(s["service"].as_str().unwrap_or("")),
            esc(s["name"].as_str().unwrap_or("")),
            esc(s["kind"].as_str().unwrap_or("")),
            fmt_dur(n.end - n.start),
        );
        let mut attrs =
            String::from("<details class=\"attrs\"><summary>details</summary><dl class=\"kv\">");
        let _ = write!(
            attrs,
            "<dt>span</dt><dd><code>{}</code></dd><dt>status</dt><dd>{} {}</dd>",
            esc(s["span_id"].as_str().unwrap_or("")),
            esc(s["status"]["code"].as_str().unwrap_or("")),
            esc(s["status"]["message"].as_str().unwrap_or("")),
        );
        if let Some(m) = s["attributes"].as_object() {
            for (k, v) in m {
                let text = match v {
                    Value::String(t) => t.clone(),
                    other => other.to_string(),
                };
                let _ = write!(attrs, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&text));
            }
        }
        if let Some(evs) = s["events"].as_array() {
            for e in evs {
                let _ = write!(
                    attrs,
                    "<dt>event</dt><dd>{} {}</dd>",
                    esc(e["name"].as_str().unwrap_or("")),
                    esc(&e["attributes"].to_string())
                );
            }
        }
        attrs.push_str("</dl></details>");
        if n.children.is_empty() {
            let _ = write!(
                b,
                "<div class=\"{class} leaf\" role=\"treeitem\"><div class=\"row\">{head}</div>{attrs}</div>"
            );
        } else {
            let _ = write!(
                b,
                "<details open class=\"{class}\" role=\"treeitem\"><summary class=\"row\">{head}</summary>{attrs}<div role=\"group\">"
            );
            for &c in &n.children {
                row(b, nodes, c, t0, total, depth + 1);
            }
            b.push_str("</div></details>");
        }
    }
    roots.sort_by(|a, b| nodes[*a].start.total_cmp(&nodes[*b].start));
    for r in roots {
        row(&mut b, &nodes, r, t0, total, 0);
    }
    b.push_str("</div>");
    b
}
