//! The Queues pages: `/ui/queues` lists the broker's topics (partitions,
//! messages, size) with each consumer group's backlog, unacked messages and
//! dead letters; `/ui/queues/{topic}` shows one topic: its partitions, its
//! groups (mode, backlog, oldest unfinished message, consumers), each group's
//! dead letters (the first ones, bodies masked like every value the console
//! shows) with a redrive button that calls the broker's API. They read this
//! node's broker (role `mq`) and refresh every two seconds.

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::response::Response;
use http::HeaderMap;
use meshwork_mq::{Broker, GroupInfo, TopicInfo};

use crate::ConsoleState;
use crate::pages::{Q, enc, esc, fmt_ms, page};
use crate::secrets::mask;

/// Dead letters shown per group on a topic's page.
pub const DEAD_SHOWN: usize = 20;
/// Longest body preview, in characters.
const PREVIEW_CHARS: usize = 120;
/// How often the pages refresh, in ms.
const POLL_MS: u32 = 2000;

/// The topics' charts: publish rate and each group's backlog, the last hour.
const CHARTS: &str = "<section><h2>Last hour</h2><figure><figcaption>Messages published per second by topic</figcaption><canvas data-chart=\"topic-rate\" width=\"900\" height=\"200\" role=\"img\" aria-label=\"Messages published per second by topic\"></canvas></figure><figure><figcaption>Backlog by topic/group (messages not yet finished)</figcaption><canvas data-chart=\"group-backlog\" width=\"900\" height=\"200\" role=\"img\" aria-label=\"Backlog by group\"></canvas></figure></section>";

fn live(inner: &str, url: &str) -> String {
    format!("<div data-live=\"{url}\" data-poll=\"{POLL_MS}\">{inner}</div>")
}

fn no_broker() -> String {
    "<p class=\"muted\">This node does not run the message broker (role <code>mq</code>): start it with <code>--roles ...,mq</code>, or open the console of a node that does.</p>".to_owned()
}

fn messages(t: &TopicInfo) -> u64 {
    t.partitions.iter().map(|p| p.end - p.start).sum()
}

fn bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn age(since_ms: Option<u64>, now: u64) -> String {
    match since_ms {
        None => "-".to_owned(),
        Some(ms) => {
            let s = now.saturating_sub(ms) / 1000;
            if s < 120 {
                format!("{s} s")
            } else if s < 7200 {
                format!("{} min", s / 60)
            } else {
                format!("{} h", s / 3600)
            }
        }
    }
}

fn groups_of(b: &Broker, t: &TopicInfo) -> Vec<GroupInfo> {
    t.groups
        .iter()
        .filter_map(|g| b.group_info(&t.name, g).ok())
        .collect()
}

/// `/ui/queues`.
pub(crate) async fn list(State(s): State<ConsoleState>, headers: HeaderMap, q: Q) -> Response {
    let Some(b) = &s.mq else {
        return page(&s, &headers, &q, "queues", "Queues", no_broker());
    };
    let mut topics: Vec<TopicInfo> = b.topics().into_iter().filter(|t| !t.internal).collect();
    topics.sort_by(|a, b| a.name.cmp(&b.name));
    let mut body = String::new();
    if topics.is_empty() {
        body.push_str("<p class=\"muted\">No topic yet. Create one with <code>meshwork mq topic create NAME</code> or <code>PUT /v1/mq/topics/{topic}</code>.</p>");
    } else {
        let dead_total: u64 = topics
            .iter()
            .flat_map(|t| groups_of(b, t))
            .map(|g| g.dead_letters)
            .sum();
        let _ = write!(
            body,
            "<p>{} topics, <span class=\"{}\">{dead_total} dead letters</span>.</p>",
            topics.len(),
            if dead_total > 0 { "error" } else { "muted" }
        );
        body.push_str("<table><thead><tr><th scope=\"col\">Topic</th><th scope=\"col\">Partitions</th><th scope=\"col\">Messages</th><th scope=\"col\">Size</th><th scope=\"col\">Groups: backlog / unacked / dead letters</th></tr></thead><tbody>");
        for t in &topics {
            let groups: Vec<String> = groups_of(b, t)
                .iter()
                .map(|g| {
                    format!(
                        "{}: {} / {} / <span class=\"{}\">{}</span>",
                        esc(&g.group),
                        g.backlog,
                        g.unacked,
                        if g.dead_letters > 0 { "error" } else { "muted" },
                        g.dead_letters
                    )
                })
                .collect();
            let _ = write!(
                body,
                "<tr><td><a href=\"/ui/queues/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                enc(&t.name),
                esc(&t.name),
                t.partitions.len(),
                messages(t),
                bytes(t.partitions.iter().map(|p| p.bytes).sum()),
                if groups.is_empty() {
                    "<span class=\"muted\">none</span>".to_owned()
                } else {
                    groups.join("<br>")
                }
            );
        }
        body.push_str("</tbody></table>");
    }
    // Outside the live region: the charts keep their canvases (the last hour
    // from /v1/console/history, then the live stream).
    let html = format!("<h1>Queues</h1>{}{CHARTS}", live(&body, "/ui/queues"));
    page(&s, &headers, &q, "queues", "Queues", html)
}

/// `/ui/queues/{topic}`.
pub(crate) async fn detail(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    q: Q,
    Path(topic): Path<String>,
) -> Response {
    let title = format!("Topic {topic}");
    let Some(b) = &s.mq else {
        return page(&s, &headers, &q, "queues", &title, no_broker());
    };
    let t = match b.topic_info(&topic) {
        Ok(t) => t,
        Err(e) => {
            let body = format!(
                "<h1>Topic {}</h1><p class=\"error\">{}</p><p><a href=\"/ui/queues\">All topics</a></p>",
                esc(&topic),
                esc(&e.to_string())
            );
            return page(&s, &headers, &q, "queues", &title, body);
        }
    };
    let now = b.config().clock.now_ms();
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>{} messages in {} partitions, {}; kept {} h{}.</p>",
        messages(&t),
        t.partitions.len(),
        bytes(t.partitions.iter().map(|p| p.bytes).sum()),
        t.config.retention_ms / 3_600_000,
        if t.config.retention_bytes > 0 {
            format!(
                " or up to {} per partition",
                bytes(t.config.retention_bytes)
            )
        } else {
            String::new()
        }
    );
    body.push_str("<h2>Partitions</h2><table><thead><tr><th scope=\"col\">Partition</th><th scope=\"col\">First offset</th><th scope=\"col\">Next offset</th><th scope=\"col\">Size</th></tr></thead><tbody>");
    for (i, p) in t.partitions.iter().enumerate() {
        let _ = write!(
            body,
            "<tr><td>{i}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            p.start,
            p.end,
            bytes(p.bytes)
        );
    }
    body.push_str("</tbody></table><h2>Consumer groups</h2>");
    let groups = groups_of(b, &t);
    if groups.is_empty() {
        body.push_str("<p class=\"muted\">No group yet: <code>meshwork mq sub TOPIC --group G</code> makes one.</p>");
    }
    for g in &groups {
        let mode = serde_json::to_value(g.config.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = write!(
            body,
            "<h3>{}</h3><p>{mode}; backlog <b>{}</b>, unacked {}, oldest unfinished {}, ack wait {} ms, max deliveries {}{}; consumers: {}.</p>",
            esc(&g.group),
            g.backlog,
            g.unacked,
            age(g.oldest_unfinished_ms, now),
            g.config.ack_wait_ms,
            g.config.max_deliveries,
            if g.config.tags.is_empty() {
                String::new()
            } else {
                format!(", tags {}", esc(&g.config.tags.join(", ")))
            },
            if g.consumers.is_empty() {
                "any".to_owned()
            } else {
                esc(&g.consumers.join(", "))
            }
        );
        if g.dead_letters == 0 {
            body.push_str("<p class=\"muted\">No dead letters.</p>");
            continue;
        }
        let _ = write!(
            body,
            "<p><span class=\"error\">{} dead letters</span> <button type=\"button\" data-api=\"/v1/mq/topics/{}/groups/{}/dlq/redrive\" data-then=\"reload\" data-body=\"{{}}\" data-confirm=\"Redrive the dead letters of {}? They are delivered to the group again.\">Redrive</button></p>",
            g.dead_letters,
            enc(&t.name),
            enc(&g.group),
            esc(&g.group)
        );
        match b.dead_letters(&t.name, &g.group, DEAD_SHOWN) {
            Ok(dead) => {
                body.push_str("<table><thead><tr><th scope=\"col\">Partition/offset</th><th scope=\"col\">Id</th><th scope=\"col\">Key</th><th scope=\"col\">Tag</th><th scope=\"col\">Published</th><th scope=\"col\">Body</th></tr></thead><tbody>");
                for d in &dead {
                    let m = &d.message;
                    let text = String::from_utf8_lossy(&m.body);
                    let preview: String = text.chars().take(PREVIEW_CHARS).collect();
                    let _ = write!(
                        body,
                        "<tr><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                        d.partition,
                        d.offset,
                        m.id,
                        esc(&String::from_utf8_lossy(&m.key)),
                        esc(&m.tag),
                        fmt_ms(m.publish_ms),
                        esc(&mask(&preview))
                    );
                }
                body.push_str("</tbody></table>");
            }
            Err(e) => {
                let _ = write!(body, "<p class=\"error\">{}</p>", esc(&e.to_string()));
            }
        }
    }
    let url = format!("/ui/queues/{}", enc(&t.name));
    let html = format!(
        "<p><a href=\"/ui/queues\">All topics</a></p><h1>Topic {}</h1>{}",
        esc(&t.name),
        live(&body, &url)
    );
    page(&s, &headers, &q, "queues", &title, html)
}
