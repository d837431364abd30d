//! The order service. `POST /orders` prices the order, then starts one TCC
//! transaction on Meshwork's coordinator with three branches:
//!
//! - stage 0, in parallel: `order` (this service): try = record the order
//!   `pending`, confirm = `confirmed`, cancel = `failed` with the reason; and
//!   `stock` (inventory): try = reserve, confirm = commit, cancel = release;
//! - stage 1, once both succeeded (no charge for what is out of stock):
//!   `payment`: try = charge, confirm = capture, cancel = refund.
//!
//! Why TCC and not a saga: the stock is sold and the order confirmed only in
//! the confirm phase, after every try succeeded, and the coordinator retries
//! confirms until they succeed — a decision to commit is finished forward,
//! never undone. A saga would sell the stock in a forward step that a later
//! failure has to undo.
//!
//! The transaction is durable before the client is answered and is driven by
//! the coordinator, not by this handler: a client that disconnects or gives
//! up, or a kill of this service, of a participant or of the coordinating
//! node, leaves it to finish on its own (each branch call behind the SDK's
//! transaction barrier, so nothing happens twice). The handler waits up to
//! [`ORDER_WAIT`] for the outcome and answers it, or answers 202 with the
//! order as it stands.
//!
//! `Idempotency-Key` (per customer) makes a retried request answer the first
//! one's result (202 while it runs) instead of creating a second order.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use meshwork_sdk::mq::outbox::MqOutbox;
use meshwork_sdk::mq::{OutMessage, Received, SubscribeOptions};
use meshwork_sdk::txn::sqlite::Ran;
use meshwork_sdk::txn::{BranchCall, BranchSpec, Call, RetryPolicy, Spec, TxnClient};
use meshwork_sdk::{Meshwork, TypedConfig};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::db::Db;
use crate::error::{ApiError, parse_json};
use crate::inventory::{MAX_QTY, Product};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    customer TEXT NOT NULL,
    idem_key TEXT,
    sku TEXT NOT NULL,
    qty INTEGER NOT NULL,
    account TEXT NOT NULL,
    amount_cents INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'failed', 'compensating', 'committing')),
    reason TEXT NOT NULL DEFAULT '',
    http_status INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS orders_idem ON orders (customer, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS orders_status ON orders (status);
CREATE TABLE IF NOT EXISTS notifications (
    order_id INTEGER PRIMARY KEY,
    event TEXT NOT NULL CHECK (event IN ('confirmed', 'cancelled')),
    deliveries INTEGER NOT NULL,
    first_ms INTEGER NOT NULL
);
";

/// The topic of the order events (`OrderConfirmed`, `OrderCancelled`).
pub const EVENTS_TOPIC: &str = "shop.orders";
/// Its partitions (an order's events keep their order: the key is the order id).
const EVENTS_PARTITIONS: u32 = 3;
/// The consumer group that records one notification per order.
pub const NOTIFY_GROUP: &str = "notifications";
/// How often the outbox is drained (a committed event waits at most this).
const OUTBOX_EVERY: Duration = Duration::from_millis(200);
/// How often a missing topic or broker is tried again.
const MQ_RETRY: Duration = Duration::from_secs(2);

/// Config entry holding the payments switch (JSON `true`/`false`; absent = on).
pub const PAYMENTS_FLAG: &str = "shop/features/payments-enabled";

/// Longest a request waits for its order's outcome before answering 202 (well
/// under the gateway route's 10 s timeout, so the 202 reaches the client).
pub const ORDER_WAIT: Duration = Duration::from_secs(5);
/// Deadline of one call from the coordinator to a participant.
const BRANCH_TIMEOUT: Duration = Duration::from_secs(1);
/// The forward phase (every try) must finish within this, or the order fails.
const ORDER_TIMEOUT: Duration = Duration::from_secs(30);

/// An order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    /// Unique id (from Meshwork's id generator).
    #[serde(with = "crate::ids")]
    pub id: i64,
    /// Who ordered.
    pub customer: String,
    /// What.
    pub sku: String,
    /// How many.
    pub qty: i64,
    /// Account paying.
    pub account: String,
    /// Amount charged, cents.
    pub amount_cents: i64,
    /// `pending`, `confirmed` or `failed`.
    pub status: String,
    /// Why it failed (a stable code), empty otherwise.
    pub reason: String,
    /// Created, Unix milliseconds.
    pub created_ms: i64,
}

/// What a client sends to order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// Product.
    pub sku: String,
    /// Quantity (1..=100).
    pub qty: i64,
    /// Account to charge.
    pub account: String,
}

/// The `order` branch's try: the order to record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenRequest {
    order: Order,
    #[serde(default)]
    idem_key: Option<String>,
}

#[derive(Clone)]
pub(crate) struct OrderState {
    db: Db,
    mw: Meshwork,
    prices: Option<meshwork_sdk::cache::Cache>,
    txns: TxnClient,
    payments: Arc<TypedConfig<bool>>,
}

pub(crate) async fn router(db: Db, mw: Meshwork) -> Result<Router, meshwork_sdk::Error> {
    let payments = Arc::new(mw.config::<bool>(PAYMENTS_FLAG).await?);
    let mut txns = mw.transactions();
    // Starting a transaction is a write to the node's API: when the node has a
    // console login, the demo hands it to its children in the environment.
    if let Ok(password) = std::env::var("MESHWORK_CONSOLE_PASSWORD") {
        let user = std::env::var("MESHWORK_CONSOLE_USER").unwrap_or_else(|_| "admin".into());
        txns = txns.with_login(&user, &password);
    }
    db.with(|c| Ok(MqOutbox::install(c)?)).await.map_err(|e| {
        meshwork_sdk::Error::Invalid(format!("installing the message outbox: {e:?}"))
    })?;
    events(&db, &mw);
    let prices = crate::price_cache(&mw).await;
    let state = OrderState {
        db,
        prices,
        mw,
        txns,
        payments,
    };
    Ok(Router::new()
        .route("/notifications", get(notifications))
        .route("/orders", post(create).get(list))
        .route("/orders/{id}", get(get_one))
        .route("/orders/{id}/open", post(open))
        .route("/orders/{id}/confirm", post(confirm))
        .route("/orders/{id}/cancel", post(cancel))
        .with_state(state))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The transaction of an order.
fn txn_id(order: i64) -> String {
    format!("order-{order}")
}

const ORDER_COLS: &str =
    "id, customer, sku, qty, account, amount_cents, status, reason, created_ms, http_status";

fn order_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Order, u16)> {
    Ok((
        Order {
            id: r.get(0)?,
            customer: r.get(1)?,
            sku: r.get(2)?,
            qty: r.get(3)?,
            account: r.get(4)?,
            amount_cents: r.get(5)?,
            status: r.get(6)?,
            reason: r.get(7)?,
            created_ms: r.get(8)?,
        },
        r.get(9)?,
    ))
}

fn valid_token(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// What a failure reason tells the client.
fn failure(reason: &str, sku: &str, account: &str) -> (StatusCode, String) {
    let (status, message) = match reason {
        "out_of_stock" => (409, format!("{sku} is out of stock")),
        "price_changed" => (409, format!("the price of {sku} changed: order again")),
        "insufficient_funds" => (402, format!("account {account} has insufficient funds")),
        "payment_unavailable" => (503, "payment unavailable: try again later".into()),
        "inventory_unavailable" => (503, "inventory unavailable: try again later".into()),
        "payments_disabled" => (
            503,
            "payments are switched off (shop/features/payments-enabled)".into(),
        ),
        "unknown_product" => (404, format!("no product {sku:?}")),
        "unknown_account" => (404, format!("no account {account:?}")),
        "timeout" => (
            503,
            "the order did not go through in time: try again".into(),
        ),
        "order_unavailable" => (503, "the order service was unavailable: try again".into()),
        "coordinator_unavailable" => (
            503,
            "the transaction coordinator is unavailable: retry with the same Idempotency-Key"
                .into(),
        ),
        other => (409, format!("order failed: {other}")),
    };
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT),
        message,
    )
}

/// A failure with no order behind it (refused before one was started).
fn refuse(reason: &'static str, req: &OrderRequest) -> ApiError {
    let (status, message) = failure(reason, &req.sku, &req.account);
    ApiError::new(status, reason, message)
}

/// The answer for a finished (or still running: 202) order.
fn answer(order: Order, http_status: u16) -> Response {
    let status = StatusCode::from_u16(http_status).unwrap_or(StatusCode::ACCEPTED);
    if status.is_success() {
        return (status, axum::Json(order)).into_response();
    }
    let (_, message) = failure(&order.reason, &order.sku, &order.account);
    let mut body = meshwork_sdk::ApiError::new(status, order.reason.clone(), message).envelope();
    if let (Some(fields), Ok(order)) = (body.as_object_mut(), serde_json::to_value(&order)) {
        fields.insert("order".into(), order);
    }
    (status, axum::Json(body)).into_response()
}

async fn create(State(s): State<OrderState>, headers: HeaderMap, body: Bytes) -> Response {
    match create_inner(&s, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn create_inner(
    s: &OrderState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let customer = headers
        .get("x-customer")
        .and_then(|v| v.to_str().ok())
        .filter(|c| valid_token(c, 64))
        .ok_or_else(|| {
            ApiError::invalid("header x-customer (1..=64 of A-Z a-z 0-9 - _ . :) is required")
        })?
        .to_string();
    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| valid_token(k, 128))
                .ok_or_else(|| {
                    ApiError::invalid("Idempotency-Key must be 1..=128 of A-Z a-z 0-9 - _ . :")
                })?
                .to_string(),
        ),
    };
    let req: OrderRequest = parse_json(body)?;
    if !(1..=MAX_QTY).contains(&req.qty) {
        return Err(ApiError::invalid(format!(
            "qty {} must be 1..={MAX_QTY}",
            req.qty
        )));
    }
    if !valid_token(&req.sku, 64) || !valid_token(&req.account, 64) {
        return Err(ApiError::invalid(
            "sku and account must be 1..=64 of A-Z a-z 0-9 - _ . :",
        ));
    }
    if let Some(key) = &idem
        && let Some(r) = replay(s, &customer, key).await?
    {
        return Ok(r);
    }
    if s.payments.current().is_some_and(|on| !*on) {
        return Err(refuse("payments_disabled", &req));
    }
    let price = price_of(s, &req).await?;
    let id = s.mw.next_id().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ids_unavailable",
            e.to_string(),
        )
    })?;
    let order = Order {
        id,
        customer: customer.clone(),
        sku: req.sku.clone(),
        qty: req.qty,
        account: req.account.clone(),
        amount_cents: price * req.qty,
        status: "pending".into(),
        reason: String::new(),
        created_ms: now_ms(),
    };
    let spec = order_spec(&order, idem.as_deref(), price);
    let record = s
        .txns
        .start_and_wait(Some(&txn_id(id)), spec, ORDER_WAIT)
        .await;
    if let Some(found) = stored(s, id).await? {
        return Ok(found);
    }
    if let Err(e) = &record {
        // Not started, or started and then the coordinator stopped
        // answering. Either way nothing is owed to the client yet: the
        // transaction (if any) finishes on its own, and a retry with the
        // same key finds its order, or places it.
        tracing::warn!(order = id, error = %e, "the order's transaction did not answer");
        return Err(refuse("coordinator_unavailable", &req));
    }
    // No final row: the order branch's try has not run, or was refused.
    match record {
        Ok(r) if is_final(&r) => {
            let (reason, _) = failure_of(&r);
            if reason == "duplicate_key"
                && let Some(key) = &idem
                && let Some(first) = replay(s, &customer, key).await?
            {
                return Ok(first);
            }
            // Failed before the order was recorded (its own service was
            // down, the forward phase timed out): there is no order, and a
            // retry with the same key places it anew.
            let (status, message) = failure(&reason, &order.sku, &order.account);
            let message = format!("{message} (no order was placed)");
            Ok(meshwork_sdk::ApiError::new(status, reason, message).into_response())
        }
        _ => Ok(answer(order, 202)),
    }
}

/// The order's answer when it is final (202 with it while it runs).
async fn stored(s: &OrderState, id: i64) -> Result<Option<Response>, ApiError> {
    let found =
        s.db.read(move |tx| {
            Ok(tx
                .query_row(
                    &format!("SELECT {ORDER_COLS} FROM orders WHERE id = ?1"),
                    params![id],
                    order_row,
                )
                .optional()?)
        })
        .await?;
    Ok(found.map(|(order, status)| answer(order, if status == 0 { 202 } else { status })))
}

/// How long a price stays in the shared cache (inventory invalidates it on change).
const PRICE_TTL: Duration = Duration::from_secs(300);

/// The unit price of the product ordered: through the price cache (one load per
/// SKU at a time, unknown SKUs remembered as absent), else from inventory.
async fn price_of(s: &OrderState, req: &OrderRequest) -> Result<i64, ApiError> {
    let Some(cache) = &s.prices else {
        return fetch_price(s, &req.sku)
            .await
            .and_then(|p| p.ok_or("unknown_product"))
            .map_err(|code| refuse(code, req));
    };
    match cache
        .get_or_load(&req.sku, PRICE_TTL, || fetch_price(s, &req.sku))
        .await
    {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(refuse("unknown_product", req)),
        Err(e) => {
            tracing::warn!(error = %e, "could not price the order");
            Err(refuse("inventory_unavailable", req))
        }
    }
}

/// The price of `sku` from inventory: `Ok(None)` when it sells no such product,
/// `Err(code)` when it cannot say.
async fn fetch_price(s: &OrderState, sku: &str) -> Result<Option<i64>, &'static str> {
    let path = format!("/products/{sku}");
    match s.mw.http().get("inventory", &path).await {
        Ok(r) if r.status().is_success() => serde_json::from_slice::<Product>(r.body())
            .map(|p| Some(p.price_cents))
            .map_err(|e| {
                tracing::error!(error = %e, "inventory answered an unreadable product");
                "inventory_unavailable"
            }),
        Ok(r) if r.status() == StatusCode::NOT_FOUND => Ok(None),
        Ok(r) => {
            tracing::warn!(status = %r.status(), "inventory could not price the order");
            Err("inventory_unavailable")
        }
        Err(e) => {
            tracing::warn!(error = %e, "inventory could not price the order");
            Err("inventory_unavailable")
        }
    }
}

/// The order's TCC transaction: the order and its stock in parallel, then
/// the money.
fn order_spec(order: &Order, idem: Option<&str>, price: i64) -> Spec {
    let id = order.id;
    // Each branch's confirm and cancel are `{base}/{confirm}` and `{base}/{cancel}`.
    let branch =
        |name: &str, service: &str, action: Call, base: String, [confirm, cancel]: [&str; 2]| {
            BranchSpec::new(name, service, action)
                .confirm(Call::post(format!("{base}/{confirm}")))
                .undo(Call::post(format!("{base}/{cancel}")))
                .timeout(BRANCH_TIMEOUT)
        };
    let open = OpenRequest {
        order: order.clone(),
        idem_key: idem.map(str::to_owned),
    };
    Spec::tcc()
        .timeout(ORDER_TIMEOUT)
        .retry(RetryPolicy {
            initial_backoff_ms: 50,
            max_backoff_ms: 5_000,
            multiplier: 2.0,
            max_attempts: 3,
            stuck_after: 20,
        })
        .branch(branch(
            "order",
            "order",
            Call::post(format!("/orders/{id}/open")).json(json!(open)),
            format!("/orders/{id}"),
            ["confirm", "cancel"],
        ))
        .branch(branch(
            "stock",
            "inventory",
            Call::post("/reservations").json(json!({
                "order_id": id.to_string(), "sku": order.sku, "qty": order.qty, "price_cents": price
            })),
            format!("/reservations/{id}"),
            ["commit", "release"],
        ))
        .branch(
            branch(
                "payment",
                "payment",
                Call::post("/charges").json(json!({
                    "order_id": id.to_string(), "account": order.account,
                    "amount_cents": order.amount_cents
                })),
                format!("/charges/{id}"),
                ["capture", "refund"],
            )
            .stage(1),
        )
}

fn is_final(record: &Value) -> bool {
    matches!(record["status"].as_str(), Some("committed" | "aborted"))
}

/// Why an aborted order's transaction aborted, as the order's reason code
/// and HTTP status, from the record's reason (`{branch} rejected: {status}
/// {text}: {body}`, `{branch} failed N times: ...`, a timeout, or an
/// operator's words).
fn failure_of(record: &Value) -> (String, u16) {
    let why = record["reason"].as_str().unwrap_or("");
    let (branch, rest) = why.split_once(' ').unwrap_or(("", why));
    let code = |detail: &str| -> (u16, String) {
        let (head, body) = detail.split_once(": ").unwrap_or((detail, ""));
        let status = head.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
        // The error envelope's code; the record keeps only the body's first
        // bytes, so it is found by its key rather than by parsing.
        let code = body
            .split_once("\"code\":\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or_else(String::new, |(code, _)| code.to_owned());
        (status, code)
    };
    let reason = if let Some(detail) = rest.strip_prefix("rejected: ") {
        match (branch, code(detail)) {
            ("stock", (_, c)) if c == "out_of_stock" || c == "price_changed" => c,
            ("stock", (404, _)) => "unknown_product".into(),
            ("stock", _) => "inventory_refused".into(),
            ("payment", (402, _)) => "insufficient_funds".into(),
            ("payment", (404, _)) => "unknown_account".into(),
            ("payment", _) => "payment_refused".into(),
            ("order", (_, c)) if c == "duplicate_key" => c,
            _ => "cancelled".into(),
        }
    } else if rest.starts_with("failed ") {
        match branch {
            "stock" => "inventory_unavailable".into(),
            "payment" => "payment_unavailable".into(),
            _ => "order_unavailable".into(),
        }
    } else if why.starts_with("the forward phase did not finish") {
        "timeout".into()
    } else {
        "cancelled".into()
    };
    let status = failure(&reason, "", "").0.as_u16();
    (reason, status)
}

/// The stored answer of an earlier request with the same key: at once when
/// it is final, else after waiting up to [`ORDER_WAIT`] for it (202 with the
/// order as it stands if it is still running).
async fn replay(s: &OrderState, customer: &str, key: &str) -> Result<Option<Response>, ApiError> {
    let (c, k) = (customer.to_string(), key.to_string());
    let found =
        s.db.read(move |tx| {
            Ok(tx
                .query_row(
                    &format!(
                        "SELECT {ORDER_COLS} FROM orders WHERE customer = ?1 AND idem_key = ?2"
                    ),
                    params![c, k],
                    order_row,
                )
                .optional()?)
        })
        .await?;
    match found {
        None => Ok(None),
        Some((order, status)) if status != 0 => Ok(Some(answer(order, status))),
        Some((order, _)) => {
            if let Err(e) = s.txns.wait(&txn_id(order.id), ORDER_WAIT).await {
                tracing::warn!(order = order.id, error = %e, "waiting for a running order");
            }
            Ok(stored(s, order.id).await?.or(Some(answer(order, 202))))
        }
    }
}

/// The `order` branch's try: records the order, `pending`. Refused with 409
/// `duplicate_key` when the customer's idempotency key has an order already.
async fn open(
    State(s): State<OrderState>,
    call: BranchCall,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Order>, ApiError> {
    let id = crate::ids::from_path(&id)?;
    let req: OpenRequest = parse_json(&body)?;
    let o = req.order;
    if o.id != id {
        return Err(ApiError::invalid(format!(
            "the body's order {} is not the path's {id}",
            o.id
        )));
    }
    let ran = s
        .db
        .branch(Some(call), move |tx| {
            if let Some(key) = &req.idem_key {
                let other: Option<i64> = tx
                    .query_row(
                        "SELECT id FROM orders WHERE customer = ?1 AND idem_key = ?2",
                        params![o.customer, key],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(other) = other.filter(|other| *other != o.id) {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "duplicate_key",
                        format!("the idempotency key is order {other}'s"),
                    ));
                }
            }
            tx.execute(
                "INSERT INTO orders (id, customer, idem_key, sku, qty, account, amount_cents, status, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?8)
                 ON CONFLICT (id) DO NOTHING",
                params![o.id, o.customer, req.idem_key, o.sku, o.qty, o.account, o.amount_cents, o.created_ms],
            )?;
            Ok(())
        })
        .await?;
    match ran {
        Ran::Suspended => Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancelled",
            format!("order {id} was cancelled before it was recorded"),
        )),
        _ => get_one(State(s), Path(id.to_string())).await,
    }
}

/// The order events: the topic made (retried until a broker answers), the
/// outbox drained to it, and the notification consumer, which records one
/// notification per order whatever the redeliveries (the order id is the
/// key of the table).
fn events(db: &Db, mw: &Meshwork) {
    let mq = mw.mq();
    let (conn, topic_mq) = (db.conn(), mq.clone());
    tokio::spawn(async move {
        while let Err(e) = topic_mq.create_topic(EVENTS_TOPIC, EVENTS_PARTITIONS).await {
            tracing::warn!(error = %e, "cannot create the order events topic yet; retrying");
            tokio::time::sleep(MQ_RETRY).await;
        }
        MqOutbox.spawn_drainer(conn, topic_mq, OUTBOX_EVERY);
    });
    let db = db.clone();
    tokio::spawn(async move {
        let opts = SubscribeOptions {
            concurrency: 8,
            group: json!({"start": "earliest"}),
            ..SubscribeOptions::default()
        };
        loop {
            let db = db.clone();
            let handler = move |m: Received| {
                let db = db.clone();
                async move { notify(&db, &m).await }
            };
            match mq
                .subscribe(EVENTS_TOPIC, NOTIFY_GROUP, opts.clone(), handler)
                .await
            {
                Ok(sub) => {
                    // Runs for the life of the service.
                    std::mem::forget(sub);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to the order events yet; retrying");
                    tokio::time::sleep(MQ_RETRY).await;
                }
            }
        }
    });
}

/// Records the notification of an order event (once per order: a redelivery
/// only counts).
async fn notify(db: &Db, m: &Received) -> Result<(), String> {
    let v: Value = m.json().map_err(|e| format!("not an order event: {e}"))?;
    let id = v["order"]
        .as_str()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or("an order event without an order id")?;
    let event = match v["event"].as_str() {
        Some(e @ ("confirmed" | "cancelled")) => e.to_owned(),
        other => return Err(format!("unknown order event {other:?}")),
    };
    db.tx(move |tx| {
        tx.execute(
            "INSERT INTO notifications (order_id, event, deliveries, first_ms) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (order_id) DO UPDATE SET deliveries = deliveries + 1",
            params![id, event, now_ms()],
        )?;
        Ok(())
    })
    .await
    .map_err(|e| format!("recording the notification: {e:?}"))
}

/// `GET /notifications`: one per order that reached a final state.
async fn notifications(State(s): State<OrderState>) -> Result<axum::Json<Value>, ApiError> {
    let v =
        s.db.read(|tx| {
            let mut st = tx.prepare(
                "SELECT order_id, event, deliveries, first_ms FROM notifications ORDER BY order_id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(json!({
                    "order": r.get::<_, i64>(0)?.to_string(),
                    "event": r.get::<_, String>(1)?,
                    "deliveries": r.get::<_, i64>(2)?,
                    "first_ms": r.get::<_, i64>(3)?,
                }))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(axum::Json(Value::Array(v)))
}

/// Sets a recorded order's final state (confirm and cancel).
async fn settle(
    s: &OrderState,
    call: BranchCall,
    id: i64,
    status: &'static str,
    reason: String,
    http_status: u16,
) -> Result<axum::Json<Value>, ApiError> {
    let outcome = if reason.is_empty() {
        "confirmed".to_owned()
    } else {
        reason.clone()
    };
    // The event belongs to this request's trace (the closure runs on the
    // database's thread, outside the request's task).
    let ctx = meshwork_sdk::RequestContext::current();
    let ran =
        s.db.branch(Some(call), move |tx| {
            let n = tx.execute(
                "UPDATE orders SET status = ?1, reason = ?2, http_status = ?3, updated_ms = ?4
                 WHERE id = ?5 AND status = 'pending'",
                params![status, reason, http_status, now_ms(), id],
            )?;
            if n == 1 {
                // The event commits with the order's state (the outbox).
                let event = if status == "confirmed" {
                    "confirmed"
                } else {
                    "cancelled"
                };
                let body = json!({"order": id.to_string(), "event": event, "reason": reason});
                let msg = OutMessage::new(body.to_string())
                    .key(id.to_string())
                    .tag(event);
                MqOutbox
                    .stage_in(tx, EVENTS_TOPIC, &msg, ctx.as_ref())
                    .map_err(|e| ApiError::internal(&format!("staging the order event: {e}")))?;
            }
            Ok(n)
        })
        .await?;
    if let Ran::Done(1) = ran {
        metrics::counter!("shop_orders_total", "outcome" => outcome).increment(1);
    }
    Ok(axum::Json(
        json!({ "id": id.to_string(), "status": status }),
    ))
}

/// The `order` branch's confirm: the order is `confirmed`.
async fn confirm(
    State(s): State<OrderState>,
    call: BranchCall,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = crate::ids::from_path(&id)?;
    settle(&s, call, id, "confirmed", String::new(), 201).await
}

/// The `order` branch's cancel: the order is `failed`, with the reason read
/// from the transaction's record.
async fn cancel(
    State(s): State<OrderState>,
    call: BranchCall,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = crate::ids::from_path(&id)?;
    // The reason is recorded for good (a retried cancel is a duplicate), so
    // without the record answer 503: the coordinator retries the cancel.
    let (reason, status) = match s.txns.wait(&call.txn, Duration::ZERO).await {
        Ok(record) => failure_of(&record),
        Err(e) => {
            tracing::warn!(order = id, error = %e, "cannot read why the order's transaction aborted");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "coordinator_unavailable",
                format!("cannot read transaction {}: {e}", call.txn),
            ));
        }
    };
    settle(&s, call, id, "failed", reason, status).await
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    status: Option<String>,
}

async fn list(
    State(s): State<OrderState>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<Vec<Order>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1..=10000"));
    }
    let status = q.status.unwrap_or_default();
    let v = s
        .db
        .read(move |tx| {
            let mut st = tx.prepare(&format!(
                "SELECT {ORDER_COLS} FROM orders WHERE (?1 = '' OR status = ?1) ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = st.query_map(params![status, limit], order_row)?;
            Ok(rows
                .map(|r| r.map(|(o, _)| o))
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(axum::Json(v))
}

async fn get_one(
    State(s): State<OrderState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Order>, ApiError> {
    let id = crate::ids::from_path(&id)?;
    let o =
        s.db.read(move |tx| {
            tx.query_row(
                &format!("SELECT {ORDER_COLS} FROM orders WHERE id = ?1"),
                params![id],
                order_row,
            )
            .optional()?
            .map(|(o, _)| o)
            .ok_or_else(|| ApiError::not_found(format!("no order {id}")))
        })
        .await?;
    Ok(axum::Json(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aborted(reason: &str) -> Value {
        json!({ "status": "aborted", "reason": reason })
    }

    #[test]
    fn an_aborted_transaction_names_the_order_s_failure() {
        let cases = [
            (
                r#"stock rejected: 409 Conflict: {"error":{"code":"out_of_stock","message":"sku-last has 0 left"}}"#,
                ("out_of_stock", 409),
            ),
            (
                r#"stock rejected: 404 Not Found: {"error":{"code":"not_found","mes"#,
                ("unknown_product", 404),
            ),
            (
                r#"payment rejected: 402 Payment Required: {"error":{"code":"insufficient_funds","message":"x"}}"#,
                ("insufficient_funds", 402),
            ),
            (
                "payment failed 3 times: 127.0.0.1:1: connection refused",
                ("payment_unavailable", 503),
            ),
            (
                "stock failed 3 times: no answer within 1s",
                ("inventory_unavailable", 503),
            ),
            (
                r#"order rejected: 409 Conflict: {"error":{"code":"duplicate_key","message":"x"}}"#,
                ("duplicate_key", 409),
            ),
            (
                "the forward phase did not finish within 30000 ms",
                ("timeout", 503),
            ),
            ("aborted by an operator", ("cancelled", 409)),
        ];
        for (why, (reason, status)) in cases {
            assert_eq!(
                failure_of(&aborted(why)),
                (reason.to_owned(), status),
                "{why}"
            );
        }
    }

    #[test]
    fn the_spec_is_a_valid_three_branch_tcc() {
        let order = Order {
            id: 1 << 60,
            customer: "c".into(),
            sku: "sku-mouse".into(),
            qty: 2,
            account: "acct-1".into(),
            amount_cents: 5_800,
            status: "pending".into(),
            reason: String::new(),
            created_ms: 1,
        };
        let spec = order_spec(&order, Some("k"), 2_900);
        assert!(spec.validate().is_ok(), "{spec:?}");
        let names: Vec<&str> = spec.branches.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["order", "stock", "payment"]);
        let stages: Vec<u32> = spec.branches.iter().map(|b| b.stage).collect();
        assert_eq!(stages, [0, 0, 1]);
        assert_eq!(
            spec.branches[2].undo.as_ref().map(|c| c.path.clone()),
            Some(format!("/charges/{}/refund", 1_u64 << 60))
        );
    }
}
