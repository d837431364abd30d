//! The web console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver), against a real node started with
//! `--demo`: every page opens; the Queues page follows the broker live; a service
//! registered from the console appears; a
//! config entry is validated, published, diffed and rolled back from the editor;
//! the shop's payments flag is flipped and orders see it; the gateway tester
//! explains a URL; the KV watch shows a change live; and with a password
//! configured, writes need the login and secrets stay masked.
//!
//! Screenshots of every page go to `target/console-screenshots/` (kept by CI as
//! artifacts). Missing Chromium fails under `MESHWORK_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use meshwork_testkit::blocking::until;
use meshwork_testkit::http::blocking as http;
use meshwork_testkit::peer;
use meshwork_tests::free_port;

const WAIT: Duration = Duration::from_secs(30);

/// A chromedriver child; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts chromedriver, or `None` (skip) when Chromium is not installed.
fn driver() -> Option<Driver> {
    let chromedriver = peer::on_path("chromedriver")?;
    peer::on_path("chromium")?;
    let port = free_port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let d = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    // Listening means ready (chromedriver keeps connections open, so no HTTP probe).
    until("chromedriver to start", WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Some(d)
}

async fn browser(d: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&d.url)
        .await
        .expect("a WebDriver session")
}

fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("MESHWORK_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

/// Waits until the text of the first element matching `css` satisfies `f`.
async fn wait_text(c: &Client, css: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(el) = c.find(Locator::Css(css)).await
            && let Ok(t) = el.text().await
            && f(&t)
        {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} in `{css}`"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fill(c: &Client, css: &str, text: &str) {
    let el = c.find(Locator::Css(css)).await.unwrap();
    el.clear().await.unwrap();
    el.send_keys(text).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Clicks the first element matching `css` in a region the page refreshes
/// live: a refresh between finding and clicking replaces the element, so a
/// stale one is looked up again.
async fn click_live(c: &Client, css: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        match c.find(Locator::Css(css)).await {
            Ok(el) => match el.click().await {
                Ok(()) => return,
                Err(e) => assert!(Instant::now() < deadline, "clicking {css}: {e}"),
            },
            Err(e) => assert!(Instant::now() < deadline, "finding {css}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Accepts the confirm() dialog a click opened.
async fn accept(c: &Client) {
    let deadline = Instant::now() + WAIT;
    while c.accept_alert().await.is_err() {
        assert!(Instant::now() < deadline, "no dialog to accept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A PUT with HTTP Basic credentials admin:s3cret-pass: (status, response).
fn basic_put(addr: &str, path: &str, body: &str) -> (u16, String) {
    http::raw(
        addr,
        &format!("PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic YWRtaW46czNjcmV0LXBhc3M=\r\nContent-Type: application/json"),
        body,
    )
    .unwrap()
}

fn start_node(dir: &std::path::Path, envs: &[(&str, &str)]) -> meshwork_tests::Server {
    meshwork_tests::start_demo(dir, envs)
}

fn wait_demo(node: &meshwork_tests::Server) {
    let gw = node.gateway.clone().unwrap();
    until("the demo shop to come up", Duration::from_secs(60), || {
        http::get(&gw, "/api/products").is_ok_and(|(s, _)| s == 200)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_works_in_a_real_browser() {
    let Some(d) = driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    wait_demo(&node);
    let base = format!("http://{}", node.http);
    let c = browser(&d).await;

    // Every page opens with its heading; screenshots for the record.
    for (path, h1, name) in [
        ("/", "Overview", "overview"),
        ("/ui/services", "Services", "services"),
        ("/ui/services/order", "Service order", "service-order"),
        ("/ui/config", "Configuration", "config"),
        ("/ui/gateway", "Gateway", "gateway"),
        ("/ui/kv?prefix=/meshwork/", "KV browser", "kv"),
        ("/ui/locks", "Locks and elections", "locks"),
        ("/ui/transactions", "Transactions", "transactions"),
        ("/ui/rollouts", "Rollouts", "rollouts"),
        ("/ui/queues", "Queues", "queues"),
        ("/ui/access", "Access", "access"),
    ] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        let t = wait_text(&c, "h1", h1, |t| t.contains(h1)).await;
        assert!(t.contains(h1));
        shot(&c, name).await;
    }
    // The Queues page follows the broker by itself: the shop's order events topic
    // appears (its order service makes it at start), then its own page.
    c.goto(&format!("{base}/ui/queues")).await.unwrap();
    wait_text(&c, "main", "the shop's events topic", |t| {
        t.contains("shop.orders") && t.contains("notifications")
    })
    .await;
    c.goto(&format!("{base}/ui/queues/shop.orders"))
        .await
        .unwrap();
    wait_text(&c, "h1", "the topic's heading", |t| {
        t.contains("Topic shop.orders")
    })
    .await;
    wait_text(&c, "main", "its partitions and group", |t| {
        t.contains("Partitions") && t.contains("notifications")
    })
    .await;
    shot(&c, "queue-topic").await;
    // The broker's and the cache's charts: a series per group's backlog and
    // the cache's memory, from the history and then the live ticks.
    c.goto(&format!("{base}/ui/queues")).await.unwrap();
    wait_text(
        &c,
        "canvas[data-chart='group-backlog'] + .legend",
        "the notifications group's backlog series",
        |t| t.contains("shop.orders/notifications"),
    )
    .await;
    shot(&c, "queues-charts").await;
    c.goto(&format!("{base}/ui/cache")).await.unwrap();
    wait_text(&c, "h1", "the cache page", |t| t.contains("Cache")).await;
    wait_text(
        &c,
        "canvas[data-chart='cache-memory'] + .legend",
        "the cache's memory series",
        |t| t.contains("MiB"),
    )
    .await;
    wait_text(
        &c,
        "canvas[data-chart='cache-ops'] + .legend",
        "the cache's command rate series",
        |t| t.contains("commands"),
    )
    .await;
    shot(&c, "cache").await;
    // Tablet width: the same pages, laid out for 800 px.
    c.set_window_size(800, 1000).await.unwrap();
    for (path, name) in [("/", "overview-tablet"), ("/ui/gateway", "gateway-tablet")] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        wait_text(&c, "h1", "the heading", |t| !t.is_empty()).await;
        shot(&c, name).await;
    }
    c.set_window_size(1280, 1000).await.unwrap();
    // The overview's live figures come from the event stream.
    c.goto(&format!("{base}/")).await.unwrap();
    wait_text(&c, "#gw-rate", "a live request rate", |t| t != "–").await;
    let counts = wait_text(&c, ".cards", "the counts", |t| t.contains("services")).await;
    assert!(counts.contains('3'), "three shop services: {counts}");
    // The locks page shows a lock held through the API.
    let (status, held) = http::post(
        &node.http,
        "/v1/locks/console-test-lock",
        r#"{"ttl_seconds": 60}"#,
    )
    .unwrap();
    assert!(matches!(status, 200 | 201), "{status} {held}");
    c.goto(&format!("{base}/ui/locks")).await.unwrap();
    wait_text(&c, "main", "the held lock", |t| {
        t.contains("console-test-lock")
    })
    .await;

    // Register a service from the console and see it appear.
    c.goto(&format!("{base}/ui/services")).await.unwrap();
    click(&c, "details.form summary").await;
    fill(&c, "input[name=service]", "console-web").await;
    fill(&c, "input[name=port]", "9999").await;
    fill(&c, "input[name=version]", "1.2.3").await;
    click(&c, "form[data-api] button").await;
    wait_text(&c, "[data-live]", "the new service", |t| {
        t.contains("console-web")
    })
    .await;
    shot(&c, "services-registered").await;
    c.goto(&format!("{base}/ui/services/console-web"))
        .await
        .unwrap();
    wait_text(&c, "table", "the instance", |t| {
        t.contains("127.0.0.1:9999")
    })
    .await;

    // A config entry: refused while invalid, published, changed, diffed, rolled back.
    c.goto(&format!("{base}/ui/config/public/DEFAULT_GROUP/app.json"))
        .await
        .unwrap();
    c.find(Locator::Css("select[name=format]"))
        .await
        .unwrap()
        .select_by_value("json")
        .await
        .unwrap();
    fill(&c, "textarea[name=content]", "{\"pool\": 8,}").await;
    click(&c, "button[data-validate-only]").await;
    let v = wait_text(&c, ".editor .result", "a validation error", |t| {
        t.starts_with("Invalid")
    })
    .await;
    assert!(v.contains("line 1"), "{v}");
    fill(&c, "textarea[name=content]", "{\"pool\": 8}").await;
    click(&c, ".editor .buttons button:not([data-validate-only])").await;
    wait_text(&c, "main", "version 1 in the history", |t| {
        t.contains("publish")
    })
    .await;
    fill(&c, "textarea[name=content]", "{\"pool\": 16}").await;
    click(&c, ".editor .buttons button:not([data-validate-only])").await;
    wait_text(&c, "table.diff", "the diff of 1 and 2", |t| {
        t.contains("16")
    })
    .await;
    shot(&c, "config-diff").await;
    click(&c, "button[data-api$='/rollback']").await;
    accept(&c).await;
    wait_text(&c, "main", "the rollback in the history", |t| {
        t.contains("rollback")
    })
    .await;
    let (status, body) = http::get(&node.http, "/v1/config/public/DEFAULT_GROUP/app.json").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("\\\"pool\\\": 8") || body.contains("\"pool\": 8"),
        "{body}"
    );
    shot(&c, "config-rolled-back").await;

    // Flip the shop's payments flag from the editor; orders see it.
    c.goto(&format!("{base}/ui/config/shop/features/payments-enabled"))
        .await
        .unwrap();
    fill(&c, "textarea[name=content]", "false").await;
    click(&c, ".editor .buttons button:not([data-validate-only])").await;
    wait_text(&c, "main", "version 2 of the flag", |t| {
        t.contains("publish")
    })
    .await;
    let gw = node.gateway.clone().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, out) = http::raw(
            &gw,
            "POST /api/orders HTTP/1.1\r\nHost: x\r\nx-customer: erin\r\nContent-Type: application/json",
            r#"{"sku":"sku-mouse","qty":1,"account":"acct-5"}"#,
        )
        .unwrap();
        if out.contains("payments_disabled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orders never saw the flag: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The gateway tester explains a URL.
    c.goto(&format!("{base}/ui/gateway")).await.unwrap();
    fill(
        &c,
        "form.explain input[name=url]",
        "http://shop.test/api/products",
    )
    .await;
    click(&c, "form.explain button").await;
    wait_text(&c, "form.explain .result", "the matching route", |t| {
        t.contains("shop-products")
    })
    .await;
    shot(&c, "gateway-explain").await;
    // Live p99 per route: traffic while the page is open shows up in the chart.
    for _ in 0..5 {
        let _ = http::get(&gw, "/api/products");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let legend = c
            .find(Locator::Css("canvas[data-chart='route-p99'] + .legend"))
            .await
            .ok();
        let text = match legend {
            Some(l) => l.text().await.unwrap_or_default(),
            None => String::new(),
        };
        if text.contains("shop-products") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no p99 series for the route: {text:?}"
        );
        let _ = http::get(&gw, "/api/products");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    shot(&c, "gateway-live").await;

    // The KV watch shows a change as it happens.
    c.goto(&format!("{base}/ui/kv?prefix=/meshwork/config/"))
        .await
        .unwrap();
    click(&c, "button[data-watch]").await;
    wait_text(&c, "button[data-watch]", "the watch to start", |t| {
        t.contains("Watching")
    })
    .await;
    let (ok, out, err) = meshwork_tests::meshwork_http(
        &node.http,
        &[
            "config",
            "publish",
            "public/DEFAULT_GROUP/live.txt",
            "--content",
            "hello",
        ],
    );
    assert!(ok, "{out} {err}");
    wait_text(&c, "#watch-log", "the change in the watch", |t| {
        t.contains("live.txt")
    })
    .await;
    shot(&c, "kv-watch").await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_a_login_and_secrets_stay_masked() {
    let Some(d) = driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(
        dir.path(),
        &["--roles", "store,coord"],
        &[("MESHWORK_CONSOLE_PASSWORD", "s3cret-pass")],
    );
    let base = format!("http://{}", node.http);
    // Over HTTP: a write without credentials is refused, with them it passes.
    let secret = r#"{"content":"user = \"app\"\npassword = \"hunter2hunter2\"\n","format":"toml"}"#;
    let (st, body) = http::request(
        &node.http,
        "PUT",
        "/v1/config/public/DEFAULT_GROUP/db.toml",
        secret,
    )
    .unwrap();
    assert_eq!(st, 401, "{body}");
    // The CLI writes with the credentials from its environment.
    let cli = |envs: &[(&str, &str)]| {
        Command::new(meshwork_tests::bin())
            .args([
                "config",
                "--http",
                &node.http,
                "publish",
                "public/DEFAULT_GROUP/cli.txt",
                "--content",
                "x",
            ])
            .env_remove("MESHWORK_CONSOLE_PASSWORD")
            .envs(envs.iter().copied())
            .output()
            .unwrap()
    };
    assert!(!cli(&[]).status.success(), "no credentials, no write");
    let out = cli(&[("MESHWORK_CONSOLE_PASSWORD", "s3cret-pass")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = browser(&d).await;
    // In the browser: the form says to sign in; after signing in it works.
    c.goto(&format!("{base}/ui/services")).await.unwrap();
    click(&c, "details.form summary").await;
    fill(&c, "input[name=service]", "locked-web").await;
    fill(&c, "input[name=port]", "9998").await;
    click(&c, "form[data-api] button").await;
    wait_text(&c, "form[data-api] .result", "the login hint", |t| {
        t.contains("Sign in")
    })
    .await;
    c.goto(&format!("{base}/ui/login")).await.unwrap();
    fill(&c, "input[name=password]", "s3cret-pass").await;
    click(&c, "form.login button").await;
    wait_text(&c, "header .session", "the signed-in user", |t| {
        t.contains("admin")
    })
    .await;
    c.goto(&format!("{base}/ui/services")).await.unwrap();
    click(&c, "details.form summary").await;
    fill(&c, "input[name=service]", "locked-web").await;
    fill(&c, "input[name=port]", "9998").await;
    click(&c, "form[data-api] button").await;
    wait_text(
        &c,
        "[data-live]",
        "the service registered after login",
        |t| t.contains("locked-web"),
    )
    .await;
    shot(&c, "signed-in").await;
    // A secret published (with Basic credentials) is masked in the editor.
    let (st, body) = basic_put(
        &node.http,
        "/v1/config/public/DEFAULT_GROUP/db.toml",
        secret,
    );
    assert!((200..300).contains(&st), "{body}");
    c.goto(&format!("{base}/ui/config/public/DEFAULT_GROUP/db.toml"))
        .await
        .unwrap();
    wait_text(&c, "h1", "the entry", |t| t.contains("db.toml")).await;
    let src = c.source().await.unwrap();
    assert!(
        !src.contains("hunter2hunter2"),
        "the secret is shown in clear"
    );
    assert!(src.contains("••••••"));
    shot(&c, "secret-masked").await;
    // The Access page: a token made in the form is shown once and works for
    // its scope; its use is in the audit log; revoked, it stops working.
    c.goto(&format!("{base}/ui/access")).await.unwrap();
    wait_text(&c, "h1", "the Access page", |t| t.contains("Access")).await;
    const TOKEN_FORM: &str = "form[data-api='/v1/auth/tokens']";
    fill(&c, &format!("{TOKEN_FORM} input[name=scopes]"), "ids:write").await;
    fill(
        &c,
        &format!("{TOKEN_FORM} input[name=description]"),
        "browser",
    )
    .await;
    click(&c, &format!("{TOKEN_FORM} button")).await;
    let token = wait_text(&c, &format!("{TOKEN_FORM} .result"), "the new token", |t| {
        t.starts_with("mwt_")
    })
    .await;
    let (st, body) = http::raw(
        &node.http,
        &format!(
            "POST /v1/ids HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}",
            node.http,
            token.trim()
        ),
        "",
    )
    .unwrap();
    assert_eq!(st, 200, "{body}");
    c.goto(&format!("{base}/ui/access")).await.unwrap();
    wait_text(&c, "main", "the token and its use", |t| {
        t.contains("browser") && t.contains("POST /v1/ids") && t.contains("ids:write")
    })
    .await;
    shot(&c, "access").await;
    click_live(&c, "button[data-method=DELETE]").await;
    accept(&c).await;
    wait_text(&c, "main", "the token gone", |t| t.contains("No token yet")).await;
    let (st, _) = http::raw(
        &node.http,
        &format!(
            "POST /v1/ids HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}",
            node.http,
            token.trim()
        ),
        "",
    )
    .unwrap();
    assert_eq!(st, 401);
    // A user added in the form is listed, and signs in with its own password.
    const USER_FORM: &str = "form[data-api='/v1/auth/users']";
    fill(&c, &format!("{USER_FORM} input[name=name]"), "alice").await;
    fill(
        &c,
        &format!("{USER_FORM} input[name=password]"),
        "alice passphrase",
    )
    .await;
    fill(&c, &format!("{USER_FORM} input[name=scopes]"), "ids:write").await;
    click(&c, &format!("{USER_FORM} button")).await;
    wait_text(&c, "main", "the new user", |t| t.contains("alice")).await;
    shot(&c, "access-users").await;
    let (st, body) = http::raw(
        &node.http,
        &format!(
            "POST /v1/ids HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic YWxpY2U6YWxpY2UgcGFzc3BocmFzZQ==",
            node.http
        ),
        "",
    )
    .unwrap();
    assert_eq!(st, 200, "alice:alice passphrase: {body}");
    c.close().await.unwrap();
}

/// The Traces pages in a real browser: orders through the demo shop are
/// found by a search on the payment service with errors, the trace opens as a
/// waterfall (every span a row, the declined call marked as an error, the
/// critical path marked), a row folds its children, and the dependency graph
/// lists the shop's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traces_pages_search_and_draw_a_waterfall() {
    let Some(d) = driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let node = meshwork_tests::start(
        dir.path(),
        &[
            "--roles",
            "store,coord,gateway,txn,mq,traces",
            "--gateway-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--demo",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    wait_demo(&node);
    let gw = node.gateway.clone().unwrap();
    // The services register one by one: the orders go once all are healthy.
    until("every shop service healthy", WAIT, || {
        ["order", "inventory", "payment"].iter().all(|s| {
            http::get(
                &node.http,
                &format!("/v1/services/{s}/instances?healthy=true"),
            )
            .is_ok_and(|(c, b)| c == 200 && b.contains("\"port\""))
        })
    });
    for (account, want) in [("acct-1", 201), ("acct-poor", 402)] {
        let body = format!(r#"{{"sku":"sku-cable","qty":1,"account":"{account}"}}"#);
        let (status, text) = http::raw(
            &gw,
            "POST /api/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-customer: tracy",
            &body,
        )
        .unwrap();
        assert_eq!(status, want, "{text}");
    }
    // The declined order's refund reaches the store last.
    until("the declined order's trace", WAIT, || {
        http::get(
            &node.http,
            "/v1/traces?service=payment&operation=POST%20/charges/%7Border_id%7D/refund",
        )
        .is_ok_and(|(s, b)| s == 200 && b.contains("trace_id"))
    });
    let base = format!("http://{}", node.http);
    let c = browser(&d).await;
    c.goto(&format!("{base}/ui/traces")).await.unwrap();
    wait_text(&c, "h1", "the heading", |t| t.contains("Traces")).await;
    wait_text(&c, "#trace-graph", "the dependency graph", |t| {
        t.contains("txn-coordinator") && t.contains("payment")
    })
    .await;
    shot(&c, "traces").await;
    fill(&c, "input[name=service]", "payment").await;
    c.find(Locator::Css("select[name=error]"))
        .await
        .unwrap()
        .select_by_value("true")
        .await
        .unwrap();
    click(&c, "form[aria-label='Search traces'] button[type=submit]").await;
    let rows = wait_text(&c, "#trace-results", "one trace with errors", |t| {
        t.contains("gateway: POST shop-orders-create")
    })
    .await;
    assert_eq!(rows.matches("shop-orders-create").count(), 1, "{rows}");
    click(&c, "#trace-results a").await;
    wait_text(&c, "h1", "the trace's heading", |t| t.starts_with("Trace")).await;
    let spans = c.find_all(Locator::Css(".waterfall .span")).await.unwrap();
    assert!(spans.len() >= 12, "{} spans", spans.len());
    let failed = c
        .find(Locator::Css(".waterfall .span.err"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(failed.contains("gateway"), "{failed}");
    let critical = c.find_all(Locator::Css(".waterfall .crit")).await.unwrap();
    assert!(critical.len() >= 3, "{} critical spans", critical.len());
    let charge = c
        .find(Locator::XPath(
            "//*[contains(@class,'span') and contains(@class,'err')][.//summary[contains(.,'action payment')]]",
        ))
        .await
        .unwrap();
    assert!(charge.text().await.unwrap().contains("payment"));
    // The node's own log lines for the trace have their section.
    wait_text(&c, "#trace-logs", "the log lines section", |t| {
        t.contains("Log lines on this node")
    })
    .await;
    shot(&c, "trace").await;
    // A click on the root's row folds everything under it.
    let visible_before = c.find_all(Locator::Css(".waterfall .row")).await.unwrap();
    let mut shown = 0;
    for r in &visible_before {
        if r.is_displayed().await.unwrap() {
            shown += 1;
        }
    }
    click(&c, ".waterfall > details > summary").await;
    let mut after = 0;
    for r in c.find_all(Locator::Css(".waterfall .row")).await.unwrap() {
        if r.is_displayed().await.unwrap() {
            after += 1;
        }
    }
    assert!(
        after == 1 && shown > 1,
        "{shown} rows shown, {after} after folding"
    );
    // A route's counters and a service's page lead to their traces.
    c.goto(&format!("{base}/ui/gateway")).await.unwrap();
    click_live(&c, "a[href*='meshwork.route%3Dshop-orders-create']").await;
    wait_text(&c, "#trace-results", "the route's traces", |t| {
        t.matches("shop-orders-create").count() == 2
    })
    .await;
    c.goto(&format!("{base}/ui/services/payment"))
        .await
        .unwrap();
    click_live(&c, "a[href='/ui/traces?service=payment&error=true']").await;
    wait_text(&c, "#trace-results", "payment's failed trace", |t| {
        t.matches("shop-orders-create").count() == 1
    })
    .await;
    // A service's instances show their own breakers (read from their metrics):
    // the order service has called inventory and payment.
    c.goto(&format!("{base}/ui/services/order")).await.unwrap();
    wait_text(&c, "main table", "the order service's breakers", |t| {
        t.contains("inventory: closed")
    })
    .await;
    c.close().await.unwrap();
}
