//! The Access page (`/ui/access`): the console's users (add with a password
//! and scopes, remove), the HTTP API's tokens (create with scopes and a
//! lifetime, shown once; revoke) and the audit log. Shown only to a
//! signed-in administrator (scope `admin`) when a login is configured.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::Response;
use http::HeaderMap;

use crate::ConsoleState;
use crate::pages::{Q, esc, fmt_ms, page};

/// Audit entries the page shows.
const AUDIT_ROWS: usize = 50;

/// `GET /ui/access`.
pub(crate) async fn page_handler(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    q: Q,
) -> Response {
    let mut b = String::from("<h1>Access</h1>");
    let allowed = s
        .auth
        .as_ref()
        .is_none_or(|a| a.principal_of(&headers).is_some_and(|p| p.is_admin()));
    if !allowed {
        b.push_str(
            "<p><a href=\"/ui/login\">Sign in</a> as an administrator to see the users, the API tokens and the audit log.</p>",
        );
        return page(&s, &headers, &q.0, "access", "Access", b);
    }
    if s.auth.is_none() {
        b.push_str("<p class=\"muted\">No login is configured: the HTTP API is open and tokens are not checked. Set <code>MESHWORK_CONSOLE_PASSWORD</code> to require them.</p>");
    }
    b.push_str("<div data-live=\"/ui/access\" data-poll=\"5000\"><section><h2>Users</h2>");
    let users = s.coord.users.list();
    if users.is_empty() {
        b.push_str("<p class=\"muted\">No user besides the administrator yet.</p>");
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Scopes</th><th scope=\"col\">Added</th><th scope=\"col\">Changed</th><th scope=\"col\"></th></tr></thead><tbody>");
        for u in &users {
            let _ = write!(
                b,
                "<tr><td>{name}</td><td>{scopes}</td><td>{created}</td><td>{updated}</td><td><button type=\"button\" data-api=\"/v1/auth/users/{name}\" data-method=\"DELETE\" data-confirm=\"Remove user {name}? Its sessions end at once.\" data-then=\"reload\">Remove</button></td></tr>",
                name = esc(&u.name),
                scopes = esc(&u.scopes.join(" ")),
                created = fmt_ms(u.created_ms),
                updated = fmt_ms(u.updated_ms),
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section><section><h2>API tokens</h2>");
    let tokens = s.coord.tokens.list();
    if tokens.is_empty() {
        b.push_str("<p class=\"muted\">No token yet.</p>");
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">Id</th><th scope=\"col\">Scopes</th><th scope=\"col\">Description</th><th scope=\"col\">Created</th><th scope=\"col\">Expires</th><th scope=\"col\"></th></tr></thead><tbody>");
        for t in &tokens {
            let _ = write!(
                b,
                "<tr><td><code>{id}</code></td><td>{scopes}</td><td>{desc}</td><td>{created}</td><td>{expires}</td><td><button type=\"button\" data-api=\"/v1/auth/tokens/{id}\" data-method=\"DELETE\" data-confirm=\"Revoke token {id}? It stops working at once.\" data-then=\"reload\">Revoke</button></td></tr>",
                id = esc(&t.id),
                scopes = esc(&t.scopes.join(" ")),
                desc = esc(&t.description),
                created = fmt_ms(t.created_ms),
                expires = t.expires_ms.map_or_else(|| "never".to_string(), fmt_ms),
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section><section><h2>Audit log</h2>");
    match s.coord.audit.list(AUDIT_ROWS, 0).await {
        Ok(entries) if entries.is_empty() => {
            b.push_str("<p class=\"muted\">No change recorded yet.</p>");
        }
        Ok(entries) => {
            b.push_str("<table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">Who</th><th scope=\"col\">From</th><th scope=\"col\">Call</th><th scope=\"col\">Scope</th><th scope=\"col\">Status</th></tr></thead><tbody>");
            for e in &entries {
                let class = if e.status >= 400 {
                    " class=\"bad\""
                } else {
                    ""
                };
                let _ = write!(
                    b,
                    "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td><code>{} {}</code></td><td>{}</td><td>{}</td></tr>",
                    fmt_ms(e.at_ms),
                    esc(&e.who),
                    esc(&e.from),
                    esc(&e.method),
                    esc(&e.path),
                    esc(&e.scope),
                    e.status
                );
            }
            b.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(&e.to_string()));
        }
    }
    b.push_str("</section></div>");
    b.push_str(
        "<section><h2>New user</h2>
<form data-api=\"/v1/auth/users\" data-method=\"POST\" data-then=\"reload\">
<label>Name <input name=\"name\" required maxlength=\"64\" pattern=\"[A-Za-z0-9._@-]+\"></label>
<label>Password <input name=\"password\" type=\"password\" required minlength=\"8\" autocomplete=\"new-password\"></label>
<label>Scopes (space-separated) <input name=\"scopes\" data-list required placeholder=\"config:write:public services:read\"></label>
<button type=\"submit\">Add</button>
<output class=\"result\"></output>
</form>
<p class=\"muted\">The password is kept only as an Argon2id hash. Changing or removing a user ends its sessions.</p></section>",
    );
    b.push_str(
        "<section><h2>New token</h2>
<form data-api=\"/v1/auth/tokens\" data-method=\"POST\" data-show=\"token\">
<label>Scopes (space-separated: <code>admin</code>, or <code>AREA:read|write[:RESOURCE]</code>) <input name=\"scopes\" data-list required placeholder=\"services:write:orders config:read:public\"></label>
<label>Lifetime <input name=\"ttl\" placeholder=\"30d (empty: until revoked)\"></label>
<label>Description <input name=\"description\" maxlength=\"256\"></label>
<button type=\"submit\">Create</button>
<output class=\"result\"></output>
</form>
<p class=\"muted\">The token is shown once, here; only its hash is kept.</p></section>",
    );
    page(&s, &headers, &q.0, "access", "Access", b)
}
