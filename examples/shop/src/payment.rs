//! The payment service: accounts with balances, charges and refunds — the
//! `payment` branch of an order's TCC transaction (try = charge, confirm =
//! capture, cancel = refund), each call run behind the transaction barrier
//! and idempotent on the order id; a decline is recorded like a charge. A
//! fault switch (`PUT /admin/fault`) slows or fails charges, for the demo.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use meshwork_sdk::txn::sqlite::Ran;
use rusqlite::{OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::db::{Db, branch_call};
use crate::error::{ApiError, parse_json};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0)
);
CREATE TABLE IF NOT EXISTS charges (
    order_id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('charged', 'declined', 'refunded', 'voided'))
);
";

/// Largest single charge, cents.
pub const MAX_CHARGE_CENTS: i64 = 100_000_000;

/// An account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Account {
    /// Account id.
    pub id: String,
    /// Balance, cents.
    pub balance_cents: i64,
}

/// A charge (or its tombstone).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Charge {
    /// The order paid.
    #[serde(with = "crate::ids")]
    pub order_id: i64,
    /// Account charged.
    pub account: String,
    /// Amount, cents.
    pub amount_cents: i64,
    /// `charged`, `declined`, `refunded` or `voided`.
    pub state: String,
}

/// A charge request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    /// The order paid.
    #[serde(with = "crate::ids")]
    pub order_id: i64,
    /// Account to charge.
    pub account: String,
    /// Amount, cents (1..=100000000).
    pub amount_cents: i64,
}

/// Injected faults (demo): every charge waits `delay_ms`, then fails with 503
/// when `fail` is set.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Delay before answering a charge, milliseconds (at most 60000).
    #[serde(default)]
    pub delay_ms: u64,
    /// Answer 503 to charges.
    #[serde(default)]
    pub fail: bool,
}

#[derive(Clone)]
pub(crate) struct PaymentState {
    db: Db,
    delay_ms: Arc<AtomicU64>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

/// Balance of each of the demo's 100 accounts, cents (100,000.00: enough for a
/// long load run).
pub const SEED_BALANCE_CENTS: i64 = 10_000_000;

/// The accounts the demo starts with: `acct-1` .. `acct-100` with
/// [`SEED_BALANCE_CENTS`] each, and `acct-poor` with 1.00.
pub fn seed_accounts() -> Vec<Account> {
    let mut v: Vec<Account> = (1..=100)
        .map(|i| Account {
            id: format!("acct-{i}"),
            balance_cents: SEED_BALANCE_CENTS,
        })
        .collect();
    v.push(Account {
        id: "acct-poor".into(),
        balance_cents: 100,
    });
    v
}

/// Inserts accounts that do not exist yet.
pub(crate) async fn seed(db: &Db, accounts: Vec<Account>) -> Result<(), ApiError> {
    db.tx(move |tx| {
        for a in &accounts {
            tx.execute(
                "INSERT OR IGNORE INTO accounts (id, balance_cents) VALUES (?1, ?2)",
                params![a.id, a.balance_cents],
            )?;
        }
        Ok(())
    })
    .await
}

/// The service's routes.
pub(crate) fn router(db: Db) -> Router {
    let state = PaymentState {
        db,
        delay_ms: Arc::default(),
        fail: Arc::default(),
    };
    Router::new()
        .route("/accounts", get(list_accounts))
        .route("/accounts/{id}", get(get_account))
        .route("/charges", post(charge).get(list_charges))
        .route("/charges/{order_id}/capture", post(capture))
        .route("/charges/{order_id}/refund", post(refund))
        .route("/admin/fault", put(set_fault).get(get_fault))
        .with_state(state)
}

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: r.get(0)?,
        balance_cents: r.get(1)?,
    })
}

fn charge_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Charge> {
    Ok(Charge {
        order_id: r.get(0)?,
        account: r.get(1)?,
        amount_cents: r.get(2)?,
        state: r.get(3)?,
    })
}

fn find_charge(tx: &Transaction<'_>, order_id: i64) -> rusqlite::Result<Option<Charge>> {
    tx.query_row(
        "SELECT order_id, account, amount_cents, state FROM charges WHERE order_id = ?1",
        params![order_id],
        charge_row,
    )
    .optional()
}

async fn list_accounts(
    State(s): State<PaymentState>,
) -> Result<axum::Json<Vec<Account>>, ApiError> {
    let v =
        s.db.read(|tx| {
            let mut st = tx.prepare("SELECT id, balance_cents FROM accounts ORDER BY id")?;
            let rows = st.query_map([], account_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(axum::Json(v))
}

async fn get_account(
    State(s): State<PaymentState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Account>, ApiError> {
    let a =
        s.db.read(move |tx| {
            tx.query_row(
                "SELECT id, balance_cents FROM accounts WHERE id = ?1",
                params![id],
                account_row,
            )
            .optional()?
            .ok_or_else(|| ApiError::not_found(format!("no account {id:?}")))
        })
        .await?;
    Ok(axum::Json(a))
}

async fn list_charges(State(s): State<PaymentState>) -> Result<axum::Json<Vec<Charge>>, ApiError> {
    let v =
        s.db.read(|tx| {
            let mut st = tx.prepare(
                "SELECT order_id, account, amount_cents, state FROM charges ORDER BY order_id",
            )?;
            let rows = st.query_map([], charge_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(axum::Json(v))
}

/// The answer to a charge call that the barrier did not run: the charge as
/// it stands (a duplicate, or an undo without its action), or 409 for a
/// charge that arrived after its order was cancelled.
async fn settled(db: &Db, order_id: i64, ran: Ran<Charge>) -> Result<Charge, ApiError> {
    match ran {
        Ran::Done(c) => Ok(c),
        Ran::Suspended => Err(voided(order_id)),
        Ran::Duplicate | Ran::EmptyUndo => Ok(db
            .read(move |tx| Ok(find_charge(tx, order_id)?))
            .await?
            .unwrap_or_else(|| Charge {
                order_id,
                account: String::new(),
                amount_cents: 0,
                state: "voided".into(),
            })),
    }
}

fn voided(order_id: i64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "voided",
        format!("order {order_id} was voided"),
    )
}

/// Debits an account for an order (a transaction's try). A decline is
/// recorded too, so a retried charge is declined again without a second look
/// at the balance.
async fn charge(
    State(s): State<PaymentState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Charge>), ApiError> {
    let req: ChargeRequest = parse_json(&body)?;
    if !(1..=MAX_CHARGE_CENTS).contains(&req.amount_cents) {
        return Err(ApiError::invalid(format!(
            "amount_cents {} must be 1..={MAX_CHARGE_CENTS}",
            req.amount_cents
        )));
    }
    let call = branch_call(&headers)?;
    let delay = s.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    if s.fail.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "payment processor unavailable (injected fault)",
        ));
    }
    let order_id = req.order_id;
    let ran = s.db.branch(call, move |tx| charge_in(tx, req)).await?;
    let created = matches!(ran, Ran::Done(_));
    let c = settled(&s.db, order_id, ran).await?;
    match c.state.as_str() {
        "declined" => Err(declined(&c.account)),
        "voided" | "refunded" => Err(voided(order_id)),
        _ if created => Ok((StatusCode::CREATED, axum::Json(c))),
        _ => Ok((StatusCode::OK, axum::Json(c))),
    }
}

fn charge_in(tx: &Transaction<'_>, req: ChargeRequest) -> Result<Charge, ApiError> {
    if let Some(c) = find_charge(tx, req.order_id)? {
        return Ok(c);
    }
    tx.query_row(
        "SELECT id FROM accounts WHERE id = ?1",
        params![req.account],
        |_| Ok(()),
    )
    .optional()?
    .ok_or_else(|| ApiError::not_found(format!("no account {:?}", req.account)))?;
    // The balance check and the debit are one statement.
    let debited = tx.execute(
        "UPDATE accounts SET balance_cents = balance_cents - ?1 WHERE id = ?2 AND balance_cents >= ?1",
        params![req.amount_cents, req.account],
    )?;
    let state = if debited == 1 { "charged" } else { "declined" };
    tx.execute(
        "INSERT INTO charges (order_id, account, amount_cents, state) VALUES (?1, ?2, ?3, ?4)",
        params![req.order_id, req.account, req.amount_cents, state],
    )?;
    Ok(Charge {
        order_id: req.order_id,
        account: req.account,
        amount_cents: req.amount_cents,
        state: state.into(),
    })
}

fn declined(account: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_funds",
        format!("account {account:?} has insufficient funds"),
    )
}

/// Keeps a charge (a transaction's confirm): the money was taken by the try,
/// so this only checks that it still is.
async fn capture(
    State(s): State<PaymentState>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<axum::Json<Charge>, ApiError> {
    let order_id = crate::ids::from_path(&order_id)?;
    let ran =
        s.db.branch(branch_call(&headers)?, move |tx| {
            let c = find_charge(tx, order_id)?
                .ok_or_else(|| ApiError::not_found(format!("order {order_id} has no charge")))?;
            match c.state.as_str() {
                "charged" => Ok(c),
                "declined" => Err(declined(&c.account)),
                _ => Err(voided(order_id)),
            }
        })
        .await?;
    Ok(axum::Json(settled(&s.db, order_id, ran).await?))
}

/// Gives the money back (a transaction's cancel). Without the barrier (a call
/// outside any transaction), refunding a charge that never arrived leaves a
/// `voided` tombstone that refuses a late charge.
async fn refund(
    State(s): State<PaymentState>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<axum::Json<Charge>, ApiError> {
    let order_id = crate::ids::from_path(&order_id)?;
    let ran = s
        .db
        .branch(branch_call(&headers)?, move |tx| {
            match find_charge(tx, order_id)? {
                None => {
                    tx.execute(
                        "INSERT INTO charges (order_id, account, amount_cents, state) VALUES (?1, '', 0, 'voided')",
                        params![order_id],
                    )?;
                    Ok(Charge {
                        order_id,
                        account: String::new(),
                        amount_cents: 0,
                        state: "voided".into(),
                    })
                }
                Some(mut c) if c.state == "charged" => {
                    tx.execute(
                        "UPDATE accounts SET balance_cents = balance_cents + ?1 WHERE id = ?2",
                        params![c.amount_cents, c.account],
                    )?;
                    tx.execute(
                        "UPDATE charges SET state = 'refunded' WHERE order_id = ?1",
                        params![order_id],
                    )?;
                    c.state = "refunded".into();
                    Ok(c)
                }
                Some(c) => Ok(c),
            }
        })
        .await?;
    Ok(axum::Json(settled(&s.db, order_id, ran).await?))
}

async fn set_fault(
    State(s): State<PaymentState>,
    body: Bytes,
) -> Result<axum::Json<Fault>, ApiError> {
    let f: Fault = parse_json(&body)?;
    if f.delay_ms > 60_000 {
        return Err(ApiError::invalid("delay_ms must be at most 60000"));
    }
    s.delay_ms.store(f.delay_ms, Ordering::Relaxed);
    s.fail.store(f.fail, Ordering::Relaxed);
    tracing::warn!(
        delay_ms = f.delay_ms,
        fail = f.fail,
        "payment fault injection changed"
    );
    Ok(axum::Json(f))
}

async fn get_fault(State(s): State<PaymentState>) -> axum::Json<Fault> {
    axum::Json(Fault {
        delay_ms: s.delay_ms.load(Ordering::Relaxed),
        fail: s.fail.load(Ordering::Relaxed),
    })
}
