//! Contract test of the HTTP API against its OpenAPI document (`openapi.json`):
//! the document is OpenAPI 3.1, describes exactly the routes of `api::ROUTES`,
//! every `$ref` resolves, and a real server over a real socket (embedded store
//! behind the etcd gRPC server, coordination on top) answers every documented
//! operation with a documented status and a body that validates against the
//! documented schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderMap};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshwork_coord::{Coord, CoordOptions, api};
use meshwork_testkit::schema::Spec;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn document() -> Value {
    api::document().expect("openapi.json does not merge with the base document")
}

/// Every (method, path) the document describes for coordination (path items
/// marked with another `x-meshwork-role` are served, and tested, by the binary).
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    all_operations(doc)
        .into_iter()
        .filter(|(_, path)| doc["paths"][path].get("x-meshwork-role").is_none())
        .collect()
}

/// Every (method, path) the document describes.
fn all_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("`paths` is an object");
    paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item is an object")
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect()
}

#[test]
fn document_is_openapi_3_1() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(
        version.starts_with("3.1"),
        "openapi is {version:?}, not 3.1.x"
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    for (method, path) in all_operations(&doc) {
        let op = &doc["paths"][&path][&method];
        for field in ["summary", "description", "operationId"] {
            assert!(
                op[field].as_str().is_some_and(|s| !s.is_empty()),
                "{method} {path} has no {field}"
            );
        }
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no response"
        );
    }
}

#[test]
fn paths_match_the_routes() {
    let doc = document();
    let documented = documented_operations(&doc);
    let mut routed: BTreeSet<(String, String)> = api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routed.insert(("get".into(), "/openapi.json".into()));
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "openapi.json and api::ROUTES differ.\n  routed but not documented: {undocumented:?}\n  \
         documented but not routed: {unrouted:?}"
    );
}

fn collect_refs<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push((at.clone(), x.as_str().unwrap_or("<not a string>")));
                } else {
                    collect_refs(x, format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                collect_refs(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_ref_resolves_and_every_component_is_used() {
    let doc = document();
    let mut refs = Vec::new();
    collect_refs(&doc, String::new(), &mut refs);
    assert!(!refs.is_empty());
    let broken: Vec<String> = refs
        .iter()
        .filter(|(_, r)| {
            !r.starts_with("#/components/") || doc.pointer(&r[1..]).is_none_or(Value::is_null)
        })
        .map(|(at, r)| format!("{at}: {r}"))
        .collect();
    assert!(
        broken.is_empty(),
        "unresolved $refs:\n{}",
        broken.join("\n")
    );
    let used: HashSet<&str> = refs.iter().map(|(_, r)| *r).collect();
    let mut unused = Vec::new();
    for (kind, items) in doc["components"].as_object().unwrap() {
        for name in items.as_object().unwrap().keys() {
            let r = format!("#/components/{kind}/{name}");
            if !used.contains(r.as_str()) {
                unused.push(r);
            }
        }
    }
    assert!(unused.is_empty(), "components never referenced: {unused:?}");
}

#[test]
fn the_checker_catches_what_it_should() {
    let spec = Spec { doc: document() };
    let mut errs = Vec::new();
    let ok = json!({"error": {"code": "not_found", "message": "x"}});
    spec.check(&spec.schema("Error"), &ok, "$", &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    for bad in [
        json!({"error": {"code": "nope", "message": "x"}}),
        json!({"error": {"code": "not_found"}}),
        json!({"error": {"code": "not_found", "message": 1}}),
        json!({"error": {"code": "not_found", "message": "x", "extra": 1}}),
        json!({"error": {"code": "invalid_format", "message": "x", "detail": {"line": "1"}}}),
    ] {
        let mut errs = Vec::new();
        spec.check(&spec.schema("Error"), &bad, "$", &mut errs);
        assert!(!errs.is_empty(), "{bad} passed");
    }
    // allOf + strictness: an InstanceView needs the Instance fields and its own.
    let mut errs = Vec::new();
    spec.check(
        &spec.schema("InstanceView"),
        &json!({"healthy": true, "health": "none", "bogus": 1}),
        "$",
        &mut errs,
    );
    assert!(
        errs.iter().any(|e| e.contains("\"service\" is missing")),
        "{errs:?}"
    );
    assert!(errs.iter().any(|e| e.contains("$.bogus")), "{errs:?}");
    // Nullable via type arrays, and anyOf with null.
    let row = json!({"kind": "insert", "old_line": null, "new_line": 1, "old": null, "new": "a"});
    let mut errs = Vec::new();
    spec.check(&spec.schema("DiffRow"), &row, "$", &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
}

// ---------------------------------------------------------------------------
// A real server
// ---------------------------------------------------------------------------

struct Harness {
    api: Api,
    port: u16,
    _store: meshwork_testkit::store::Embedded,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

async fn start() -> Harness {
    let store = meshwork_testkit::store::embedded().await;
    let etcd_addr = store.endpoint.clone();
    let coord = Coord::start(
        &[etcd_addr],
        CoordOptions {
            run_checks: true,
            ..Default::default()
        },
    )
    .await
    .expect("coordination starts on the embedded store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_http, rx) = tokio::sync::oneshot::channel::<()>();
    let router = api::router(coord);
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Harness {
        api: Api {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
            spec: Spec { doc: document() },
            covered: parking_lot::Mutex::new(BTreeSet::new()),
        },
        port: addr.port(),
        _store: store,
        _stops: vec![stop_http],
    }
}

/// Bound of any one call (long enough for a cold debug build on a busy machine).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    json: Option<Value>,
}

impl Resp {
    fn json(&self) -> &Value {
        self.json.as_ref().expect("a JSON body")
    }

    fn error_code(&self) -> &str {
        self.json()["error"]["code"]
            .as_str()
            .expect("an error code")
    }
}

struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    spec: Spec,
    covered: parking_lot::Mutex<BTreeSet<(String, String)>>,
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

impl Api {
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> hyper::Response<hyper::body::Incoming> {
        let mut req = Request::builder()
            .method(Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap())
            .uri(format!("{}{path}", self.base));
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap();
        timeout(CALL_TIMEOUT, self.client.request(req))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer within {CALL_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Any request, unchecked.
    async fn fetch(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let resp = self.send(method, path, body).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = timeout(CALL_TIMEOUT, resp.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: body not complete in time"))
            .unwrap()
            .to_bytes();
        let json = (media_type(&headers) == "application/json")
            .then(|| serde_json::from_slice(&body))
            .transpose()
            .unwrap_or_else(|e| panic!("{method} {path}: answered invalid JSON: {e}"));
        Resp {
            status,
            headers,
            body,
            json,
        }
    }

    /// The documented response of `template` for `status`, or a panic naming the
    /// documented statuses.
    fn documented(&self, method: &str, template: &str, status: u16, what: &str) -> &Value {
        let op = &self.spec.doc["paths"][template][method];
        assert!(op.is_object(), "{method} {template} is not documented");
        let responses = op["responses"].as_object().unwrap();
        match responses.get(&status.to_string()) {
            Some(r) => self.spec.resolve(r),
            None => panic!(
                "{method} {template} ({what}) answered {status}, which is not documented; \
                 documented: {:?}",
                responses.keys().collect::<Vec<_>>()
            ),
        }
    }

    /// `method path` (an instance of `template`), with the answer checked against
    /// the document: a documented status, a documented media type, a body that
    /// validates against the documented schema, and the required headers.
    async fn call(&self, method: &str, template: &str, path: &str, body: Option<Value>) -> Resp {
        let raw = body.map(|b| b.to_string());
        self.call_raw(method, template, path, raw.as_deref()).await
    }

    async fn call_raw(&self, method: &str, template: &str, path: &str, body: Option<&str>) -> Resp {
        let r = self.fetch(method, path, body).await;
        let what = format!("{method} {path}");
        let doc = self.documented(method, template, r.status, &what);
        let body_text = String::from_utf8_lossy(&r.body);
        match doc.get("content").and_then(Value::as_object) {
            Some(content) => {
                let mt = media_type(&r.headers);
                let entry = content
                    .iter()
                    .find(|(k, _)| k.split(';').next().unwrap_or("").trim() == mt)
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| {
                        panic!(
                            "{what} answered {} with content-type {mt:?}; documented: {:?}",
                            r.status,
                            content.keys().collect::<Vec<_>>()
                        )
                    });
                if mt == "application/json" {
                    let mut errs = Vec::new();
                    self.spec.check(&entry["schema"], r.json(), "$", &mut errs);
                    assert!(
                        errs.is_empty(),
                        "{what} answered {} with a body that does not match the document:\n  {}\n\
                         body: {body_text}",
                        r.status,
                        errs.join("\n  ")
                    );
                }
            }
            None => assert!(
                r.body.is_empty(),
                "{what} answered {} with a body, documented without one: {body_text}",
                r.status
            ),
        }
        for (name, h) in doc
            .get("headers")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let h = self.spec.resolve(h);
            if h["required"] == Value::Bool(true) {
                assert!(
                    r.headers.contains_key(name.as_str()),
                    "{what} answered without the documented header {name}"
                );
            }
        }
        self.covered
            .lock()
            .insert((method.to_string(), template.to_string()));
        r
    }

    /// `call`, expecting `status`.
    async fn expect(
        &self,
        status: u16,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
    ) -> Resp {
        let r = self.call(method, template, path, body).await;
        assert_eq!(
            r.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r
    }

    /// Opens an SSE stream, checks it against the document and returns its first
    /// event (name, data), validated against the schema the document gives for it.
    async fn first_event(&self, template: &str, path: &str) -> (String, Value) {
        let resp = self.send("get", path, None).await;
        let status = resp.status().as_u16();
        let doc = self.documented("get", template, status, path);
        assert_eq!(status, 200, "GET {path}");
        let mt = media_type(resp.headers());
        assert_eq!(mt, "text/event-stream", "GET {path}");
        let events = &doc["content"]["text/event-stream"]["x-sse-events"];
        assert!(events.is_object(), "{template}: no x-sse-events documented");
        let mut body = resp.into_body();
        let mut buf = String::new();
        let deadline = Instant::now() + CALL_TIMEOUT;
        let (name, data) = loop {
            // One event = lines up to a blank line; comments (keep-alives) start with ':'.
            if let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                break (name, data.join("\n"));
            }
            let frame = tokio::time::timeout_at(deadline, body.frame())
                .await
                .unwrap_or_else(|_| panic!("GET {path}: no event within {CALL_TIMEOUT:?}"))
                .unwrap_or_else(|| panic!("GET {path}: stream ended before an event"))
                .unwrap();
            if let Ok(d) = frame.into_data() {
                buf.push_str(&String::from_utf8_lossy(&d).replace("\r\n", "\n"));
            }
        };
        let data: Value = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("GET {path}: event {name} data is not JSON: {e}: {data}"));
        let schema = events
            .get(&name)
            .unwrap_or_else(|| panic!("GET {path}: event {name:?} is not documented"));
        let mut errs = Vec::new();
        self.spec.check(schema, &data, "$", &mut errs);
        assert!(
            errs.is_empty(),
            "GET {path}: event {name} data does not match the document:\n  {}\ndata: {data}",
            errs.join("\n  ")
        );
        self.covered
            .lock()
            .insert(("get".into(), template.to_string()));
        (name, data)
    }

    /// Waits (blocking queries, bounded) until `instance` of `service` reports
    /// `health`; returns the instance's view.
    async fn wait_health(&self, service: &str, instance: &str, health: &str) -> Value {
        let tmpl = "/v1/services/{service}/instances";
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut index = 0;
        loop {
            let path = format!("/v1/services/{service}/instances?index={index}&wait=2s");
            let r = self.expect(200, "get", tmpl, &path, None).await;
            let d = r.json();
            if let Some(v) = d["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["id"] == instance && v["health"] == health)
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{service}/{instance} never became {health}: {d}"
            );
            index = d["index"].as_i64().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented() {
    let h = start().await;
    let api = &h.api;

    // The document serves itself.
    let r = api
        .expect(200, "get", "/openapi.json", "/openapi.json", None)
        .await;
    assert_eq!(r.json(), &document());

    // ----------------------------------------------------------------- registry
    let r = api.expect(200, "get", "/v1/nodes", "/v1/nodes", None).await;
    let me = r.json()["self"].as_str().unwrap().to_string();
    assert!(
        r.json()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == me),
        "{}",
        r.json()
    );

    let svc = "shop-orders";
    let s = format!("/v1/services/{svc}");
    let r = api
        .expect(
            200,
            "put",
            "/v1/services/{service}",
            &s,
            Some(json!({"protect_threshold": 0.25, "description": "orders"})),
        )
        .await;
    assert_eq!(r.json()["metadata"], json!({}));

    let port = h.port;
    let eph = format!("127.0.0.1:{port}");
    let tmpl = "/v1/services/{service}/instances";
    let r = api
        .expect(
            201,
            "post",
            tmpl,
            &format!("{s}/instances"),
            Some(json!({
                "address": "127.0.0.1", "port": port, "zone": "z1", "version": "1.0",
                "tags": ["a", "b"], "metadata": {"k": "v"}, "ttl_seconds": 30,
                "check": {"type": "tcp", "interval_ms": 200, "timeout_ms": 100}
            })),
        )
        .await;
    assert_eq!(r.json()["instance"]["id"], eph.as_str());
    assert!(r.json()["lease"].as_i64().unwrap() > 0);
    api.expect(
        201,
        "post",
        tmpl,
        &format!("{s}/instances"),
        Some(json!({
            "id": "p1", "address": "localhost", "port": port, "ephemeral": false,
            "protocol": "http", "weight": 5,
            "check": {"type": "http", "path": "/openapi.json", "expected_status": 200,
                      "interval_ms": 200, "timeout_ms": 100}
        })),
    )
    .await;
    let v = api.wait_health(svc, &eph, "passing").await;
    assert_eq!(v["health_detail"]["healthy"], true, "{v}");
    api.wait_health(svc, "p1", "passing").await;

    let r = api
        .expect(200, "get", "/v1/services", "/v1/services", None)
        .await;
    assert!(
        r.json()["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == svc && x["instances"] == 2),
        "{}",
        r.json()
    );
    let r = api
        .expect(200, "get", "/v1/services/{service}", &s, None)
        .await;
    assert_eq!(r.json()["settings"]["protect_threshold"], 0.25);
    let r = api
        .expect(
            200,
            "get",
            tmpl,
            &format!("{s}/instances?healthy=true&tags=a&zone=z1&version=1.0"),
            None,
        )
        .await;
    assert_eq!(r.json()["total_count"], 1, "{}", r.json());
    let index = r.json()["index"].as_i64().unwrap();
    assert_eq!(
        r.headers.get("x-meshwork-index").unwrap().to_str().unwrap(),
        index.to_string()
    );
    // A blocking query whose index is current waits out its (short) wait.
    let r = api
        .expect(
            200,
            "get",
            tmpl,
            &format!("{s}/instances?index={index}&wait=50ms"),
            None,
        )
        .await;
    assert_eq!(r.json()["total_count"], 2);

    let one = "/v1/services/{service}/instances/{id}";
    let r = api
        .expect(200, "get", one, &format!("{s}/instances/{eph}"), None)
        .await;
    assert_eq!(r.json()["health"], "passing");
    let r = api
        .expect(
            200,
            "put",
            "/v1/services/{service}/instances/{id}/heartbeat",
            &format!("{s}/instances/{eph}/heartbeat"),
            None,
        )
        .await;
    assert!(r.json()["ttl_seconds"].as_i64().unwrap() > 0);
    let r = api
        .expect(
            200,
            "put",
            "/v1/services/{service}/instances/{id}/enabled",
            &format!("{s}/instances/p1/enabled"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(r.json()["enabled"], false);
    let r = api
        .expect(200, "get", one, &format!("{s}/instances/p1"), None)
        .await;
    assert_eq!(r.json()["healthy"], false);

    let (name, d) = api
        .first_event(
            "/v1/services/{service}/watch",
            &format!("{s}/watch?healthy=false&tags="),
        )
        .await;
    assert_eq!(name, "instances");
    assert_eq!(d["total_count"], 2);

    let r = api
        .expect(
            200,
            "get",
            "/v1/registry/events",
            &format!("/v1/registry/events?service={svc}&limit=50"),
            None,
        )
        .await;
    let kinds: HashSet<&str> = r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    for k in ["settings", "registered", "healthy", "updated"] {
        assert!(kinds.contains(k), "no {k} event in {}", r.json());
    }
    api.expect(204, "delete", one, &format!("{s}/instances/p1"), None)
        .await;

    // ------------------------------------------------------------------- config
    let item = "/v1/config/{namespace}/{group}/{data_id}";
    let k = "/v1/config/prod/shop/orders.toml";
    let r = api
        .expect(
            201,
            "put",
            item,
            k,
            Some(
                json!({"content": "pool = 1\n", "format": "toml", "author": "alice",
                        "description": "first"}),
            ),
        )
        .await;
    assert_eq!(r.json()["entry"]["version"], 1);
    let r = api
        .expect(
            200,
            "put",
            item,
            k,
            Some(
                json!({"content": "pool = 2\nname = \"x\"\n", "format": "toml",
                        "if_version": 1}),
            ),
        )
        .await;
    assert_eq!(r.json()["changed"], true);
    assert_eq!(r.json()["entry"]["version"], 2);
    let r = api.expect(200, "get", item, k, None).await;
    let sum = r.json()["checksum"].as_str().unwrap().to_string();
    assert_eq!(r.json()["beta"], false);
    assert_eq!(
        r.headers.get("etag").unwrap().to_str().unwrap(),
        format!("\"{sum}\"")
    );
    let r = api
        .expect(200, "get", item, &format!("{k}?raw=true"), None)
        .await;
    assert_eq!(media_type(&r.headers), "application/toml");
    assert_eq!(&r.body[..], b"pool = 2\nname = \"x\"\n");

    let r = api
        .expect(
            200,
            "get",
            "/v1/config",
            "/v1/config?namespace=prod&group=shop",
            None,
        )
        .await;
    assert_eq!(r.json()["entries"].as_array().unwrap().len(), 1);
    assert_eq!(r.json()["entries"][0]["content"], "");
    let r = api
        .expect(
            200,
            "get",
            "/v1/config/namespaces",
            "/v1/config/namespaces",
            None,
        )
        .await;
    assert_eq!(r.json()["namespaces"]["prod"], 1);
    // This node has no secrets master key: it says so, and cannot rotate.
    let r = api
        .expect(200, "get", "/v1/config/secrets", "/v1/config/secrets", None)
        .await;
    assert_eq!(r.json()["enabled"], false);
    let r = api
        .expect(
            503,
            "post",
            "/v1/config/secrets/rotate",
            "/v1/config/secrets/rotate",
            None,
        )
        .await;
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no secrets master key")
    );

    let r = api
        .expect(
            200,
            "get",
            &format!("{item}/history"),
            &format!("{k}/history?limit=10"),
            None,
        )
        .await;
    assert_eq!(r.json()["versions"].as_array().unwrap().len(), 2);
    let r = api
        .expect(
            200,
            "get",
            &format!("{item}/history/{{version}}"),
            &format!("{k}/history/1"),
            None,
        )
        .await;
    assert_eq!(r.json()["content"], "pool = 1\n");
    assert_eq!(r.json()["op"], "publish");
    let r = api
        .expect(
            200,
            "get",
            &format!("{item}/diff"),
            &format!("{k}/diff?from=1&to=2"),
            None,
        )
        .await;
    assert!(r.json()["unified"].as_str().unwrap().contains("+pool = 2"));
    let r = api
        .expect(
            200,
            "post",
            &format!("{item}/rollback"),
            &format!("{k}/rollback"),
            Some(json!({"version": 1, "author": "bob"})),
        )
        .await;
    assert_eq!(r.json()["entry"]["version"], 3);
    assert_eq!(r.json()["entry"]["content"], "pool = 1\n");

    let beta = format!("{item}/beta");
    let r = api
        .expect(
            200,
            "put",
            &beta,
            &format!("{k}/beta"),
            Some(
                json!({"content": "pool = 9\n", "format": "toml", "addresses": ["10.9.9.9"],
                        "labels": {"canary": "yes"}, "author": "carol"}),
            ),
        )
        .await;
    assert_eq!(r.json()["addresses"], json!(["10.9.9.9"]));
    api.expect(200, "get", &beta, &format!("{k}/beta"), None)
        .await;
    let r = api
        .expect(200, "get", item, &format!("{k}?client_ip=10.9.9.9"), None)
        .await;
    assert_eq!(r.json()["beta"], true);
    assert_eq!(r.json()["content"], "pool = 9\n");
    let r = api
        .expect(
            200,
            "get",
            item,
            &format!("{k}?labels=canary=yes,x=y"),
            None,
        )
        .await;
    assert_eq!(r.json()["beta"], true);

    let r = api
        .expect(
            200,
            "post",
            "/v1/config/listener",
            "/v1/config/listener",
            Some(json!({
                "items": [{"namespace": "prod", "group": "shop", "data_id": "orders.toml",
                           "checksum": sum}],
                "timeout_ms": 10000,
                "client": {"address": "10.9.9.9"}
            })),
        )
        .await;
    assert_eq!(
        r.json()["changed"],
        json!([{"namespace": "prod", "group": "shop", "data_id": "orders.toml"}])
    );
    let (name, d) = api
        .first_event(
            &format!("{item}/watch"),
            &format!("{k}/watch?client_ip=10.9.9.9&labels="),
        )
        .await;
    assert_eq!((name.as_str(), &d["beta"]), ("config", &json!(true)));

    let r = api
        .expect(
            200,
            "post",
            &format!("{beta}/promote"),
            &format!("{k}/beta/promote"),
            None,
        )
        .await;
    assert_eq!(r.json()["entry"]["content"], "pool = 9\n");
    assert_eq!(r.json()["entry"]["version"], 4);
    api.expect(
        200,
        "put",
        &beta,
        &format!("{k}/beta"),
        Some(json!({"content": "pool = 10\n", "format": "toml", "addresses": ["10.9.9.9"]})),
    )
    .await;
    api.expect(204, "delete", &beta, &format!("{k}/beta?author=dave"), None)
        .await;
    let r = api
        .expect(
            200,
            "delete",
            item,
            &format!("{k}?if_version=4&author=erin"),
            None,
        )
        .await;
    assert_eq!(r.json()["version"], 5);
    let (name, _) = api
        .first_event(&format!("{item}/watch"), &format!("{k}/watch"))
        .await;
    assert_eq!(name, "deleted");

    // ------------------------------------------------------------- coordination
    let r = api
        .expect(
            201,
            "post",
            "/v1/leases",
            "/v1/leases",
            Some(json!({"ttl_seconds": 30})),
        )
        .await;
    let lease = r.json()["id"].as_i64().unwrap();
    assert_eq!(r.json()["ttl_seconds"], 30);
    let r = api
        .expect(
            200,
            "post",
            "/v1/leases/{id}/keepalive",
            &format!("/v1/leases/0x{lease:x}/keepalive"),
            None,
        )
        .await;
    assert_eq!(r.json()["id"], lease);

    let lock = "/v1/locks/{name}";
    let r = api
        .expect(
            200,
            "post",
            lock,
            "/v1/locks/orders-lock",
            Some(json!({"lease": lease, "holder": "worker-1", "timeout_ms": 10000})),
        )
        .await;
    let held = r.json().clone();
    assert_eq!(held["lease"], lease);
    let r = api.expect(200, "get", "/v1/locks", "/v1/locks", None).await;
    let state = r.json()["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "orders-lock")
        .cloned()
        .unwrap_or_else(|| panic!("orders-lock not listed: {}", r.json()));
    assert_eq!(state["holder"], "worker-1");
    assert_eq!(state["held"], held);
    api.expect(204, "delete", lock, "/v1/locks/orders-lock", Some(held))
        .await;

    let r = api
        .expect(
            200,
            "post",
            "/v1/elections/{name}/campaign",
            "/v1/elections/orders-leader/campaign",
            Some(json!({"lease": lease, "value": "node-a", "timeout_ms": 10000})),
        )
        .await;
    let held = r.json().clone();
    let r = api
        .expect(
            200,
            "get",
            "/v1/elections/{name}",
            "/v1/elections/orders-leader",
            None,
        )
        .await;
    assert_eq!(r.json()["value"], "node-a");
    assert_eq!(r.json()["held"], held);
    api.expect(
        204,
        "post",
        "/v1/elections/{name}/proclaim",
        "/v1/elections/orders-leader/proclaim",
        Some(json!({"held": held, "value": "node-b"})),
    )
    .await;
    let (name, d) = api
        .first_event(
            "/v1/elections/{name}/observe",
            "/v1/elections/orders-leader/observe",
        )
        .await;
    assert_eq!((name.as_str(), &d["value"]), ("leader", &json!("node-b")));
    api.expect(
        204,
        "post",
        "/v1/elections/{name}/resign",
        "/v1/elections/orders-leader/resign",
        Some(held),
    )
    .await;
    let (name, _) = api
        .first_event(
            "/v1/elections/{name}/observe",
            "/v1/elections/orders-leader/observe",
        )
        .await;
    assert_eq!(name, "none");
    api.expect(
        204,
        "delete",
        "/v1/leases/{id}",
        &format!("/v1/leases/0x{lease:x}"),
        None,
    )
    .await;

    let r = api
        .expect(200, "post", "/v1/ids", "/v1/ids?count=3", None)
        .await;
    let ids: Vec<i64> = r.json()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        ids.len() == 3 && ids.windows(2).all(|w| w[0] < w[1]),
        "{ids:?}"
    );
    let r = api
        .expect(
            200,
            "get",
            "/v1/ids/{id}",
            &format!("/v1/ids/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(r.json()["id"], ids[0].to_string());
    assert_eq!(
        r.json()["worker"],
        json!(r.json()["worker"].as_u64().unwrap())
    );

    // ------------------------------------------------------------------- tokens
    let r = api
        .expect(
            201,
            "post",
            "/v1/auth/tokens",
            "/v1/auth/tokens",
            Some(json!({"scopes": ["services:write:orders", "config:read"], "ttl": "30d", "description": "ci"})),
        )
        .await;
    let token = r.json()["token"].as_str().unwrap().to_string();
    let token_id = r.json()["info"]["id"].as_str().unwrap().to_string();
    assert!(token.starts_with(&format!("mwt_{token_id}_")), "{token}");
    api.expect(
        400,
        "post",
        "/v1/auth/tokens",
        "/v1/auth/tokens",
        Some(json!({"scopes": ["kv:read"]})),
    )
    .await;
    let r = api
        .expect(200, "get", "/v1/auth/tokens", "/v1/auth/tokens", None)
        .await;
    assert_eq!(r.json()["tokens"][0]["id"], token_id.as_str());
    assert!(
        !r.json().to_string().contains(&token),
        "the list shows no secret"
    );
    api.expect(
        204,
        "delete",
        "/v1/auth/tokens/{id}",
        &format!("/v1/auth/tokens/{token_id}"),
        None,
    )
    .await;
    api.expect(
        404,
        "delete",
        "/v1/auth/tokens/{id}",
        &format!("/v1/auth/tokens/{token_id}"),
        None,
    )
    .await;

    // -------------------------------------------------------------------- users
    let user =
        json!({"name": "alice", "password": "alice passphrase", "scopes": ["config:write:public"]});
    let r = api
        .expect(
            201,
            "post",
            "/v1/auth/users",
            "/v1/auth/users",
            Some(user.clone()),
        )
        .await;
    assert_eq!(r.json()["name"], "alice");
    api.expect(409, "post", "/v1/auth/users", "/v1/auth/users", Some(user))
        .await;
    api.expect(
        400,
        "post",
        "/v1/auth/users",
        "/v1/auth/users",
        Some(json!({"name": "bob", "password": "short", "scopes": ["admin"]})),
    )
    .await;
    let r = api
        .expect(200, "get", "/v1/auth/users", "/v1/auth/users", None)
        .await;
    assert_eq!(r.json()["users"][0]["name"], "alice");
    assert!(!r.json().to_string().contains("argon2"), "no hash shown");
    api.expect(
        200,
        "put",
        "/v1/auth/users/{name}",
        "/v1/auth/users/alice",
        Some(json!({"scopes": ["admin"]})),
    )
    .await;
    api.expect(
        404,
        "put",
        "/v1/auth/users/{name}",
        "/v1/auth/users/nobody",
        Some(json!({"password": "a long passphrase"})),
    )
    .await;
    api.expect(
        204,
        "delete",
        "/v1/auth/users/{name}",
        "/v1/auth/users/alice",
        None,
    )
    .await;
    api.expect(
        404,
        "delete",
        "/v1/auth/users/{name}",
        "/v1/auth/users/alice",
        None,
    )
    .await;

    // ----------------------------------------------------------------- rollouts
    let start = json!({"service": "shop", "to_version": "2", "steps": [10, 100],
        "interval_ms": 60000, "pin": {"kind": "header", "name": "x-canary", "value": "1"}});
    let r = api
        .expect(
            201,
            "post",
            "/v1/rollouts",
            "/v1/rollouts",
            Some(start.clone()),
        )
        .await;
    assert_eq!(r.json()["status"]["phase"], "waiting", "{}", r.json());
    api.expect(409, "post", "/v1/rollouts", "/v1/rollouts", Some(start))
        .await;
    let r = api
        .expect(
            400,
            "post",
            "/v1/rollouts",
            "/v1/rollouts",
            Some(json!({"service": "web", "to_version": "2", "steps": [50, 10]})),
        )
        .await;
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("steps"),
        "{}",
        r.json()
    );
    let ro = "/v1/rollouts/{service}";
    api.expect(200, "get", ro, "/v1/rollouts/shop", None).await;
    api.expect(404, "get", ro, "/v1/rollouts/nothing", None)
        .await;
    let r = api
        .expect(
            200,
            "post",
            "/v1/rollouts/{service}/promote",
            "/v1/rollouts/shop/promote",
            None,
        )
        .await;
    assert_eq!(r.json()["status"]["weight"], 10, "{}", r.json());
    assert_eq!(r.json()["status"]["decisions"][0]["by"], "anonymous");
    api.expect(
        200,
        "post",
        "/v1/rollouts/{service}/pause",
        "/v1/rollouts/shop/pause",
        None,
    )
    .await;
    api.expect(
        409,
        "post",
        "/v1/rollouts/{service}/pause",
        "/v1/rollouts/shop/pause",
        None,
    )
    .await;
    api.expect(
        200,
        "post",
        "/v1/rollouts/{service}/resume",
        "/v1/rollouts/shop/resume",
        None,
    )
    .await;
    api.expect(409, "delete", ro, "/v1/rollouts/shop", None)
        .await;
    let r = api
        .expect(
            200,
            "post",
            "/v1/rollouts/{service}/abort",
            "/v1/rollouts/shop/abort",
            None,
        )
        .await;
    assert_eq!(r.json()["status"]["phase"], "rolled_back", "{}", r.json());
    api.expect(
        409,
        "post",
        "/v1/rollouts/{service}/promote",
        "/v1/rollouts/shop/promote",
        Some(json!({"full": true})),
    )
    .await;
    api.expect(
        404,
        "post",
        "/v1/rollouts/{service}/abort",
        "/v1/rollouts/none/abort",
        None,
    )
    .await;
    let r = api
        .expect(200, "get", "/v1/rollouts", "/v1/rollouts", None)
        .await;
    assert_eq!(r.json()["rollouts"][0]["spec"]["service"], "shop");
    api.expect(200, "delete", ro, "/v1/rollouts/shop", None)
        .await;
    api.expect(404, "delete", ro, "/v1/rollouts/shop?force=true", None)
        .await;

    // -------------------------------------------------------------------- audit
    let r = api
        .expect(200, "get", "/v1/audit", "/v1/audit?limit=5", None)
        .await;
    assert!(r.json()["entries"].is_array(), "{}", r.json());
    api.expect(400, "get", "/v1/audit", "/v1/audit?limit=0", None)
        .await;

    // Registry clean-up, last: the deregistration is a documented operation too.
    api.expect(204, "delete", one, &format!("{s}/instances/{eph}"), None)
        .await;

    let covered = api.covered.lock().clone();
    let missing: Vec<_> = documented_operations(&api.spec.doc)
        .difference(&covered)
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "operations never exercised: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_use_the_documented_error_schema() {
    let h = start().await;
    let api = &h.api;

    // A body that is not JSON.
    let r = api
        .call_raw(
            "post",
            "/v1/services/{service}/instances",
            "/v1/services/shop/instances",
            Some("{\"address\": "),
        )
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_body"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1"),
        "{}",
        r.json()
    );
    // JSON of the wrong shape (unknown field) is invalid_body too.
    let r = api
        .call(
            "post",
            "/v1/leases",
            "/v1/leases",
            Some(json!({"ttl_seconds": 5, "ttl": 5})),
        )
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_body"));
    // A missing body.
    let r = api.call("post", "/v1/leases", "/v1/leases", None).await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_body"));

    // No such route: checked against the shared Error schema.
    for path in ["/v1/nope", "/v2/services", "/"] {
        let r = api.fetch("get", path, None).await;
        assert_eq!(r.status, 404, "GET {path}");
        let mut errs = Vec::new();
        api.spec
            .check(&api.spec.schema("Error"), r.json(), "$", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(r.error_code(), "no_such_route");
    }

    // Missing things.
    let r = api
        .call(
            "get",
            "/v1/services/{service}",
            "/v1/services/no-such-svc",
            None,
        )
        .await;
    assert_eq!((r.status, r.error_code()), (404, "not_found"));
    let r = api
        .call(
            "get",
            "/v1/services/{service}/instances/{id}",
            "/v1/services/no-such-svc/instances/i1",
            None,
        )
        .await;
    assert_eq!((r.status, r.error_code()), (404, "not_found"));
    let r = api
        .call(
            "get",
            "/v1/config/{namespace}/{group}/{data_id}",
            "/v1/config/prod/shop/absent",
            None,
        )
        .await;
    assert_eq!((r.status, r.error_code()), (404, "not_found"));
    let r = api
        .call("get", "/v1/elections/{name}", "/v1/elections/nobody", None)
        .await;
    assert_eq!((r.status, r.error_code()), (404, "not_found"));

    // Bad names and parameters.
    let r = api
        .call("get", "/v1/services/{service}", "/v1/services/-bad", None)
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_argument"));
    let r = api
        .call(
            "get",
            "/v1/services/{service}/instances",
            "/v1/services/shop/instances?index=1&wait=soon",
            None,
        )
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_argument"));
    let r = api
        .call(
            "get",
            "/v1/services/{service}/instances",
            "/v1/services/shop/instances?healthy=maybe",
            None,
        )
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_argument"));
    let r = api
        .call(
            "post",
            "/v1/services/{service}/instances",
            "/v1/services/shop/instances",
            Some(json!({"address": "bad host!", "port": 80})),
        )
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_argument"));
    let r = api.call("post", "/v1/ids", "/v1/ids?count=0", None).await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_argument"));

    // A TOML syntax error names its position.
    let item = "/v1/config/{namespace}/{group}/{data_id}";
    let r = api
        .call(
            "put",
            item,
            "/v1/config/prod/shop/bad.toml",
            Some(json!({"content": "a = 1\nb = = 2\n", "format": "toml"})),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_format"),
        "{}",
        r.json()
    );
    let detail = &r.json()["error"]["detail"];
    assert_eq!(detail["line"], 2, "{detail}");
    assert!(
        detail["column"].as_u64().is_some_and(|c| c >= 1),
        "{detail}"
    );

    // A lost compare-and-set.
    let k = "/v1/config/prod/shop/cas.json";
    let r = api
        .call(
            "put",
            item,
            k,
            Some(json!({"content": "{}", "format": "json"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = api
        .call(
            "put",
            item,
            k,
            Some(json!({"content": "[]", "format": "json", "if_version": 7})),
        )
        .await;
    assert_eq!((r.status, r.error_code()), (409, "conflict"));
    let r = api
        .call(
            "get",
            &format!("{item}/diff"),
            &format!("{k}/diff?from=1"),
            None,
        )
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_argument"));

    // A lock wait that runs out.
    let r = api
        .call(
            "post",
            "/v1/locks/{name}",
            "/v1/locks/busy",
            Some(json!({"ttl_seconds": 30, "holder": "first"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = api
        .call(
            "post",
            "/v1/locks/{name}",
            "/v1/locks/busy",
            Some(json!({"ttl_seconds": 30, "timeout_ms": 200})),
        )
        .await;
    assert_eq!((r.status, r.error_code()), (409, "lock_held"));
    assert_eq!(r.json()["error"]["detail"]["holder"], "first");
}

// ---------------------------------------------------------------------------
// Regression tests for handler bugs found while writing the document.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_ids_in_decimal_name_the_lease() {
    let h = start().await;
    let api = &h.api;
    let r = api
        .expect(
            201,
            "post",
            "/v1/leases",
            "/v1/leases",
            Some(json!({"ttl_seconds": 30})),
        )
        .await;
    let lease = r.json()["id"].as_i64().unwrap();
    // The id as the grant answered it (a JSON number, so decimal).
    let r = api
        .call(
            "post",
            "/v1/leases/{id}/keepalive",
            &format!("/v1/leases/{lease}/keepalive"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["id"], lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_calls_refuse_keys_outside_their_queue() {
    let h = start().await;
    let api = &h.api;
    let r = api
        .expect(
            200,
            "post",
            "/v1/locks/{name}",
            "/v1/locks/owned",
            Some(json!({"ttl_seconds": 30, "holder": "owner"})),
        )
        .await;
    let mut foreign = r.json().clone();
    // Another lock's name, with the first lock's key and token.
    foreign["name"] = json!("other");
    let r = api
        .call(
            "delete",
            "/v1/locks/{name}",
            "/v1/locks/other",
            Some(foreign),
        )
        .await;
    assert_eq!(
        (r.status, r.json.as_ref().map(|_| r.error_code())),
        (400, Some("invalid_argument")),
        "releasing lock \"other\" must not release \"owned\""
    );
    let r = api.expect(200, "get", "/v1/locks", "/v1/locks", None).await;
    assert!(
        r.json()["locks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "owned"),
        "lock \"owned\" was released through another name: {}",
        r.json()
    );
}
