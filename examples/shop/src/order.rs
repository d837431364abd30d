//! The order service. `POST /orders` reserves stock in `inventory`, charges
//! `payment`, and commits the reservation; on a failure it compensates by hand
//! (refund/void the charge, release the reservation). Calls go through the
//! SDK's resilient client, so a payment outage trips the breaker and orders fail
//! fast with `payment_unavailable` while reads keep working.
//!
//! Outcome rules:
//! - a definite "no" (out of stock, insufficient funds, unknown account) fails
//!   the order and releases what was taken;
//! - an unknown outcome (timeout, connection lost, 5xx) voids the charge (the
//!   payment service refuses a late charge for a voided order) and releases;
//! - a compensation that cannot finish now leaves the order `compensating`; the
//!   sweeper (one per cluster, by leader election) finishes it, as it does for
//!   orders left `pending` by a crash.
//!
//! `Idempotency-Key` (per customer) makes a retried request answer the first
//! one's result instead of creating a second order.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use meshwork_sdk::{CallError, Meshwork, TypedConfig};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{ApiError, parse_json};
use crate::inventory::{MAX_QTY, Reservation, ReserveRequest};
use crate::payment::ChargeRequest;

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
";

/// Config entry holding the payments switch (JSON `true`/`false`; absent = on).
pub const PAYMENTS_FLAG: &str = "shop/features/payments-enabled";

/// Longest a duplicate request waits for the first one's outcome.
const IDEMPOTENT_WAIT: Duration = Duration::from_secs(10);
/// A `pending` order older than this was abandoned by a crash.
const ABANDONED_AFTER_MS: i64 = 60_000;

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
    /// Amount charged, cents (0 until priced).
    pub amount_cents: i64,
    /// `pending`, `confirmed`, `failed`, `compensating` or `committing`.
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

#[derive(Clone)]
pub(crate) struct OrderState {
    db: Db,
    mw: Meshwork,
    payments: Arc<TypedConfig<bool>>,
}

pub(crate) async fn router(db: Db, mw: Meshwork) -> Result<Router, meshwork_sdk::Error> {
    let payments = Arc::new(mw.config::<bool>(PAYMENTS_FLAG).await?);
    let state = OrderState { db, mw, payments };
    tokio::spawn(sweeper(state.clone()));
    Ok(Router::new()
        .route("/orders", post(create).get(list))
        .route("/orders/{id}", get(get_one))
        .with_state(state))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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

/// The answer for a finished (or still running) order.
fn answer(order: Order, http_status: u16) -> Response {
    let status = StatusCode::from_u16(http_status).unwrap_or(StatusCode::ACCEPTED);
    if status.is_success() {
        return (status, axum::Json(order)).into_response();
    }
    let message = match order.reason.as_str() {
        "out_of_stock" => format!("{} is out of stock", order.sku),
        "insufficient_funds" => format!("account {} has insufficient funds", order.account),
        "payment_unavailable" => "payment unavailable: try again later".to_string(),
        "inventory_unavailable" => "inventory unavailable: try again later".to_string(),
        "payments_disabled" => "payments are switched off (shop/features/payments-enabled)".into(),
        "unknown_product" => format!("no product {:?}", order.sku),
        "unknown_account" => format!("no account {:?}", order.account),
        other => format!("order failed: {other}"),
    };
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
        amount_cents: 0,
        status: "pending".into(),
        reason: String::new(),
        created_ms: now_ms(),
    };
    let o = order.clone();
    let key = idem.clone();
    let inserted = s
        .db
        .tx(move |tx| {
            let n = tx.execute(
                "INSERT INTO orders (id, customer, idem_key, sku, qty, account, status, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7)
                 ON CONFLICT DO NOTHING",
                params![o.id, o.customer, key, o.sku, o.qty, o.account, o.created_ms],
            )?;
            Ok(n == 1)
        })
        .await?;
    if !inserted {
        // A concurrent request with the same key won the insert.
        if let Some(key) = &idem
            && let Some(r) = replay(s, &customer, key).await?
        {
            return Ok(r);
        }
        return Err(ApiError::internal("order insert conflicted"));
    }
    let (order, http_status) = place(s, order).await;
    metrics::counter!("shop_orders_total", "outcome" => if order.reason.is_empty() { "confirmed".to_string() } else { order.reason.clone() }).increment(1);
    Ok(answer(order, http_status))
}

/// The stored answer of an earlier request with the same key, waiting for it if
/// it is still running.
async fn replay(s: &OrderState, customer: &str, key: &str) -> Result<Option<Response>, ApiError> {
    let deadline = tokio::time::Instant::now() + IDEMPOTENT_WAIT;
    loop {
        let (c, k) = (customer.to_string(), key.to_string());
        let found =
            s.db.tx(move |tx| {
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
            None => return Ok(None),
            Some((order, status)) if status != 0 => return Ok(Some(answer(order, status))),
            Some((order, _)) if tokio::time::Instant::now() >= deadline => {
                return Ok(Some(answer(order, 202)));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// How a call ended, for the order flow.
enum Outcome {
    /// 2xx with this body.
    Ok(Bytes),
    /// A definite refusal: status and the callee's error code.
    No(u16, String),
    /// Never sent (breaker open, no instance): nothing happened.
    NotSent,
    /// Unknown: it may or may not have happened.
    Unknown(String),
}

async fn call<T: Serialize>(s: &OrderState, service: &str, path: &str, body: &T) -> Outcome {
    match s.mw.http().json(service, Method::POST, path, body).await {
        Ok(r) if r.status().is_success() => Outcome::Ok(r.into_body()),
        Ok(r) if r.status().is_client_error() => {
            let code = meshwork_sdk::ErrorBody::parse(r.body())
                .map_or_else(|| r.status().as_str().to_string(), |e| e.code);
            Outcome::No(r.status().as_u16(), code)
        }
        Ok(r) => Outcome::Unknown(format!("{service} answered {}", r.status())),
        Err(e @ (CallError::CircuitOpen { .. } | CallError::NoInstance { .. })) => {
            tracing::warn!(error = %e, "call not sent");
            Outcome::NotSent
        }
        Err(e) => Outcome::Unknown(e.to_string()),
    }
}

/// Runs the order flow and records the outcome.
async fn place(s: &OrderState, mut order: Order) -> (Order, u16) {
    if s.payments.current().is_some_and(|on| !*on) {
        return finish(s, order, "failed", "payments_disabled", 503).await;
    }
    let reserve = ReserveRequest {
        order_id: order.id,
        sku: order.sku.clone(),
        qty: order.qty,
    };
    let reservation: Reservation = match call(s, "inventory", "/reservations", &reserve).await {
        Outcome::Ok(body) => match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "inventory answered an unreadable reservation");
                return fail(s, order, "inventory_unavailable", false).await;
            }
        },
        Outcome::No(409, code) if code == "out_of_stock" => {
            return finish(s, order, "failed", "out_of_stock", 409).await;
        }
        Outcome::No(404, _) => return finish(s, order, "failed", "unknown_product", 404).await,
        Outcome::No(status, code) => {
            tracing::warn!(status, %code, "inventory refused the reservation");
            return finish(s, order, "failed", "inventory_refused", 409).await;
        }
        Outcome::NotSent => {
            return finish(s, order, "failed", "inventory_unavailable", 503).await;
        }
        Outcome::Unknown(why) => {
            tracing::warn!(%why, "reservation outcome unknown; releasing");
            return fail(s, order, "inventory_unavailable", false).await;
        }
    };
    order.amount_cents = reservation.price_cents * reservation.qty;
    let (id, amount) = (order.id, order.amount_cents);
    if let Err(e) =
        s.db.tx(move |tx| {
            tx.execute(
                "UPDATE orders SET amount_cents = ?1, updated_ms = ?2 WHERE id = ?3",
                params![amount, now_ms(), id],
            )?;
            Ok(())
        })
        .await
    {
        tracing::error!(error = %e, "recording the amount failed");
    }
    let charge = ChargeRequest {
        order_id: order.id,
        account: order.account.clone(),
        amount_cents: order.amount_cents,
    };
    match call(s, "payment", "/charges", &charge).await {
        Outcome::Ok(_) => {
            let path = format!("/reservations/{}/commit", order.id);
            for _ in 0..3 {
                if let Outcome::Ok(_) = call(s, "inventory", &path, &()).await {
                    return finish(s, order, "confirmed", "", 201).await;
                }
            }
            // Paid; the sweeper commits the reservation.
            finish(s, order, "committing", "", 201).await
        }
        Outcome::No(402, _) => fail(s, order, "insufficient_funds", false).await,
        Outcome::No(404, _) => fail(s, order, "unknown_account", false).await,
        Outcome::No(status, code) => {
            tracing::warn!(status, %code, "payment refused the charge");
            fail(s, order, "payment_refused", true).await
        }
        Outcome::NotSent => fail(s, order, "payment_unavailable", false).await,
        Outcome::Unknown(why) => {
            tracing::warn!(%why, "charge outcome unknown; voiding");
            fail(s, order, "payment_unavailable", true).await
        }
    }
}

fn status_of(reason: &str) -> u16 {
    match reason {
        "out_of_stock" | "inventory_refused" | "payment_refused" => 409,
        "insufficient_funds" => 402,
        "unknown_product" | "unknown_account" => 404,
        _ => 503,
    }
}

/// Fails the order after undoing what may have happened: void the charge (when
/// its outcome is unknown) and release the reservation.
async fn fail(s: &OrderState, order: Order, reason: &str, void: bool) -> (Order, u16) {
    let status = status_of(reason);
    if compensate(s, order.id, void).await {
        finish(s, order, "failed", reason, status).await
    } else {
        finish(s, order, "compensating", reason, status).await
    }
}

/// Undoes an order's side effects; true when all are undone.
async fn compensate(s: &OrderState, order_id: i64, void: bool) -> bool {
    if void {
        let path = format!("/charges/{order_id}/refund");
        if !matches!(call(s, "payment", &path, &()).await, Outcome::Ok(_)) {
            return false;
        }
    }
    let path = format!("/reservations/{order_id}/release");
    matches!(call(s, "inventory", &path, &()).await, Outcome::Ok(_))
}

async fn finish(
    s: &OrderState,
    mut order: Order,
    status: &str,
    reason: &str,
    http_status: u16,
) -> (Order, u16) {
    order.status = status.into();
    order.reason = reason.into();
    let (id, st, re) = (order.id, order.status.clone(), order.reason.clone());
    if let Err(e) = s
        .db
        .tx(move |tx| {
            tx.execute(
                "UPDATE orders SET status = ?1, reason = ?2, http_status = ?3, updated_ms = ?4 WHERE id = ?5",
                params![st, re, http_status, now_ms(), id],
            )?;
            Ok(())
        })
        .await
    {
        tracing::error!(error = %e, order = order.id, "recording the outcome failed");
    }
    (order, http_status)
}

/// Finishes orders left `compensating`, `committing` or abandoned `pending`;
/// runs on the elected leader among order instances.
async fn sweeper(s: OrderState) {
    loop {
        let lead = match s.mw.campaign("shop-order-sweeper", "order", None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "sweeper election failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(token = lead.fencing_token(), "order sweeper is leader");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if !s.mw.control_plane_reachable() {
                continue;
            }
            if let Err(e) = sweep(&s).await {
                tracing::warn!(error = %e, "sweep failed");
            }
        }
    }
}

async fn sweep(s: &OrderState) -> Result<(), ApiError> {
    let cutoff = now_ms() - ABANDONED_AFTER_MS;
    let todo: Vec<(Order, u16)> =
        s.db.tx(move |tx| {
            let mut st = tx.prepare(&format!(
                "SELECT {ORDER_COLS} FROM orders WHERE status IN ('compensating', 'committing')
                 OR (status = 'pending' AND created_ms < ?1) LIMIT 100"
            ))?;
            let rows = st.query_map(params![cutoff], order_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    for (order, http_status) in todo {
        match order.status.as_str() {
            "committing" => {
                let path = format!("/reservations/{}/commit", order.id);
                if let Outcome::Ok(_) = call(s, "inventory", &path, &()).await {
                    finish(s, order, "confirmed", "", http_status).await;
                }
            }
            "compensating" => {
                if compensate(s, order.id, true).await {
                    let reason = order.reason.clone();
                    finish(s, order, "failed", &reason, http_status).await;
                }
            }
            _ => {
                tracing::warn!(order = order.id, "abandoned pending order; compensating");
                if compensate(s, order.id, true).await {
                    finish(s, order, "failed", "abandoned", 503).await;
                }
            }
        }
    }
    Ok(())
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
        .tx(move |tx| {
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
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("order id {id:?} is not an integer")))?;
    let o =
        s.db.tx(move |tx| {
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
