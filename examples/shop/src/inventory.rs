//! The inventory service: stock per SKU, and reservations an order holds until it
//! commits or releases them — the `stock` branch of an order's TCC
//! transaction (try = reserve, confirm = commit, cancel = release), each call
//! run behind the transaction barrier. Every operation is also idempotent on
//! the order id: a repeated reserve answers the first result.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use meshwork_sdk::txn::sqlite::Ran;
use rusqlite::{OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use meshwork_sdk::cache::Cache;

use crate::db::{Db, branch_call};
use crate::error::{ApiError, parse_json};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS products (
    sku TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    stock INTEGER NOT NULL CHECK (stock >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id INTEGER PRIMARY KEY,
    sku TEXT NOT NULL,
    qty INTEGER NOT NULL,
    price_cents INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'released'))
);
";

/// Largest quantity one reservation may hold.
pub const MAX_QTY: i64 = 100;

/// A product with its stock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Product {
    /// Stock keeping unit.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Unit price, cents.
    pub price_cents: i64,
    /// Units available (not reserved, not sold).
    pub stock: i64,
}

/// A reservation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reservation {
    /// The order holding it.
    #[serde(with = "crate::ids")]
    pub order_id: i64,
    /// What.
    pub sku: String,
    /// How many (0 for a tombstone).
    pub qty: i64,
    /// Unit price at reservation time, cents.
    pub price_cents: i64,
    /// `reserved`, `committed` or `released`.
    pub state: String,
}

/// A reserve request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// The order reserving.
    #[serde(with = "crate::ids")]
    pub order_id: i64,
    /// What.
    pub sku: String,
    /// How many (1..=100).
    pub qty: i64,
    /// The unit price the order was priced at, cents: refused with 409
    /// `price_changed` when the product costs something else now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_cents: Option<i64>,
}

/// The products the demo starts with.
pub fn seed_products() -> Vec<Product> {
    [
        ("sku-keyboard", "Mechanical keyboard", 8_900, 100_000),
        ("sku-mouse", "Wireless mouse", 2_900, 100_000),
        ("sku-monitor", "27\" monitor", 24_900, 200),
        ("sku-cable", "USB-C cable", 900, 500_000),
        ("sku-last", "Limited edition mug (last one)", 1_500, 1),
    ]
    .into_iter()
    .map(|(sku, name, price, stock)| Product {
        sku: sku.into(),
        name: name.into(),
        price_cents: price,
        stock,
    })
    .collect()
}

/// Inserts products that do not exist yet.
pub(crate) async fn seed(db: &Db, products: Vec<Product>) -> Result<(), ApiError> {
    db.tx(move |tx| {
        for p in &products {
            tx.execute(
                "INSERT OR IGNORE INTO products (sku, name, price_cents, stock) VALUES (?1, ?2, ?3, ?4)",
                params![p.sku, p.name, p.price_cents, p.stock],
            )?;
        }
        Ok(())
    })
    .await
}

/// The service's routes. `prices` is the shared price cache the order service
/// reads through: a price change invalidates its entry everywhere.
pub(crate) fn router(db: Db, prices: Option<Cache>) -> Router {
    let price_routes = Router::new()
        .route("/products/{sku}/price", put(set_price))
        .with_state((db.clone(), prices));
    Router::new()
        .route("/products", get(list_products))
        .route("/products/{sku}", get(get_product))
        .route("/reservations", post(reserve).get(list_reservations))
        .route("/reservations/{order_id}/commit", post(commit))
        .route("/reservations/{order_id}/release", post(release))
        .with_state(db)
        .merge(price_routes)
}

/// The body of `PUT /products/{sku}/price`.
#[derive(Deserialize)]
struct PriceChange {
    price_cents: i64,
}

/// Changes a product's price, then drops it from the price cache (every order
/// service's L1 and the shared L2). An order priced from a stale copy in between
/// is refused at reservation with 409 `price_changed`.
async fn set_price(
    State((db, prices)): State<(Db, Option<Cache>)>,
    Path(sku): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Product>, ApiError> {
    let change: PriceChange = parse_json(&body)?;
    if !(0..=1_000_000_000).contains(&change.price_cents) {
        return Err(ApiError::invalid(format!(
            "price_cents {} must be 0..=1000000000",
            change.price_cents
        )));
    }
    let key = sku.clone();
    let p = db
        .tx(move |tx| {
            let n = tx.execute(
                "UPDATE products SET price_cents = ?1 WHERE sku = ?2",
                params![change.price_cents, sku],
            )?;
            if n == 0 {
                return Err(ApiError::not_found(format!("no product {sku:?}")));
            }
            Ok(tx.query_row(
                "SELECT sku, name, price_cents, stock FROM products WHERE sku = ?1",
                params![sku],
                product_row,
            )?)
        })
        .await?;
    if let Some(c) = &prices
        && let Err(e) = c.invalidate(&key).await
    {
        tracing::warn!(sku = %key, error = %e, "price cache not invalidated (entries expire by themselves)");
    }
    Ok(axum::Json(p))
}

fn product_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Product> {
    Ok(Product {
        sku: r.get(0)?,
        name: r.get(1)?,
        price_cents: r.get(2)?,
        stock: r.get(3)?,
    })
}

fn reservation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Reservation> {
    Ok(Reservation {
        order_id: r.get(0)?,
        sku: r.get(1)?,
        qty: r.get(2)?,
        price_cents: r.get(3)?,
        state: r.get(4)?,
    })
}

const RESERVATION_COLS: &str = "order_id, sku, qty, price_cents, state";

fn find_reservation(tx: &Transaction<'_>, order_id: i64) -> rusqlite::Result<Option<Reservation>> {
    tx.query_row(
        &format!("SELECT {RESERVATION_COLS} FROM reservations WHERE order_id = ?1"),
        params![order_id],
        reservation_row,
    )
    .optional()
}

async fn list_products(State(db): State<Db>) -> Result<axum::Json<Vec<Product>>, ApiError> {
    let v = db
        .read(|tx| {
            let mut st =
                tx.prepare("SELECT sku, name, price_cents, stock FROM products ORDER BY sku")?;
            let rows = st.query_map([], product_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(axum::Json(v))
}

async fn get_product(
    State(db): State<Db>,
    Path(sku): Path<String>,
) -> Result<axum::Json<Product>, ApiError> {
    let p = db
        .read(move |tx| {
            tx.query_row(
                "SELECT sku, name, price_cents, stock FROM products WHERE sku = ?1",
                params![sku],
                product_row,
            )
            .optional()?
            .ok_or_else(|| ApiError::not_found(format!("no product {sku:?}")))
        })
        .await?;
    Ok(axum::Json(p))
}

async fn list_reservations(State(db): State<Db>) -> Result<axum::Json<Vec<Reservation>>, ApiError> {
    let v = db
        .read(|tx| {
            let mut st = tx.prepare(&format!(
                "SELECT {RESERVATION_COLS} FROM reservations ORDER BY order_id"
            ))?;
            let rows = st.query_map([], reservation_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(axum::Json(v))
}

/// The answer to a reservation call that the barrier did not run: the
/// reservation as it stands (a duplicate, or an undo without its action), or
/// 409 for a reserve that arrived after its order was cancelled.
async fn settled(db: &Db, order_id: i64, ran: Ran<Reservation>) -> Result<Reservation, ApiError> {
    match ran {
        Ran::Done(r) => Ok(r),
        Ran::Suspended => Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancelled",
            format!("order {order_id} was cancelled before its reservation arrived"),
        )),
        Ran::Duplicate | Ran::EmptyUndo => Ok(db
            .read(move |tx| Ok(find_reservation(tx, order_id)?))
            .await?
            .unwrap_or_else(|| Reservation {
                order_id,
                sku: String::new(),
                qty: 0,
                price_cents: 0,
                state: "released".into(),
            })),
    }
}

/// Reserves stock for an order (a transaction's try: `POST /reservations`
/// with the coordinator's headers; also callable without them).
async fn reserve(
    State(db): State<Db>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Reservation>), ApiError> {
    let req: ReserveRequest = parse_json(&body)?;
    if !(1..=MAX_QTY).contains(&req.qty) {
        return Err(ApiError::invalid(format!(
            "qty {} must be 1..={MAX_QTY}",
            req.qty
        )));
    }
    let order_id = req.order_id;
    let ran = db
        .branch(branch_call(&headers)?, move |tx| reserve_in(tx, req))
        .await?;
    let created = matches!(ran, Ran::Done(_));
    let r = settled(&db, order_id, ran).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(r)))
}

fn reserve_in(tx: &Transaction<'_>, req: ReserveRequest) -> Result<Reservation, ApiError> {
    if let Some(existing) = find_reservation(tx, req.order_id)? {
        if existing.state == "released" {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "released",
                format!("order {} already released its reservation", req.order_id),
            ));
        }
        return Ok(existing);
    }
    let product = tx
        .query_row(
            "SELECT sku, name, price_cents, stock FROM products WHERE sku = ?1",
            params![req.sku],
            product_row,
        )
        .optional()?
        .ok_or_else(|| ApiError::not_found(format!("no product {:?}", req.sku)))?;
    if let Some(price) = req.price_cents
        && price != product.price_cents
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "price_changed",
            format!(
                "{} costs {} now, the order priced it at {price}",
                req.sku, product.price_cents
            ),
        ));
    }
    // The stock check and the decrement are one statement: no oversell.
    let taken = tx.execute(
        "UPDATE products SET stock = stock - ?1 WHERE sku = ?2 AND stock >= ?1",
        params![req.qty, req.sku],
    )?;
    if taken == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "out_of_stock",
            format!("{} has {} left, {} asked", req.sku, product.stock, req.qty),
        ));
    }
    let r = Reservation {
        order_id: req.order_id,
        sku: req.sku,
        qty: req.qty,
        price_cents: product.price_cents,
        state: "reserved".into(),
    };
    tx.execute(
        "INSERT INTO reservations (order_id, sku, qty, price_cents, state) VALUES (?1, ?2, ?3, ?4, 'reserved')",
        params![r.order_id, r.sku, r.qty, r.price_cents],
    )?;
    Ok(r)
}

/// Sells a reservation's stock (a transaction's confirm).
async fn commit(
    State(db): State<Db>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<axum::Json<Reservation>, ApiError> {
    let order_id = crate::ids::from_path(&order_id)?;
    let ran = db
        .branch(branch_call(&headers)?, move |tx| {
            let mut r = find_reservation(tx, order_id)?.ok_or_else(|| {
                ApiError::not_found(format!("order {order_id} has no reservation"))
            })?;
            match r.state.as_str() {
                "committed" => {}
                "reserved" => {
                    tx.execute(
                        "UPDATE reservations SET state = 'committed' WHERE order_id = ?1",
                        params![order_id],
                    )?;
                    r.state = "committed".into();
                }
                _ => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "released",
                        format!("order {order_id}'s reservation was released"),
                    ));
                }
            }
            Ok(r)
        })
        .await?;
    Ok(axum::Json(settled(&db, order_id, ran).await?))
}

/// Gives a reservation's stock back (a transaction's cancel). Without the
/// barrier (a call outside any transaction), releasing a reservation that
/// never arrived leaves a tombstone that refuses a late reserve.
async fn release(
    State(db): State<Db>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<axum::Json<Reservation>, ApiError> {
    let order_id = crate::ids::from_path(&order_id)?;
    let ran = db
        .branch(branch_call(&headers)?, move |tx| {
            match find_reservation(tx, order_id)? {
                None => {
                    tx.execute(
                        "INSERT INTO reservations (order_id, sku, qty, price_cents, state) VALUES (?1, '', 0, 0, 'released')",
                        params![order_id],
                    )?;
                    Ok(Reservation {
                        order_id,
                        sku: String::new(),
                        qty: 0,
                        price_cents: 0,
                        state: "released".into(),
                    })
                }
                Some(mut r) => match r.state.as_str() {
                    "released" => Ok(r),
                    "reserved" => {
                        tx.execute(
                            "UPDATE products SET stock = stock + ?1 WHERE sku = ?2",
                            params![r.qty, r.sku],
                        )?;
                        tx.execute(
                            "UPDATE reservations SET state = 'released' WHERE order_id = ?1",
                            params![order_id],
                        )?;
                        r.state = "released".into();
                        Ok(r)
                    }
                    _ => Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "committed",
                        format!("order {order_id}'s reservation is committed"),
                    )),
                },
            }
        })
        .await?;
    Ok(axum::Json(settled(&db, order_id, ran).await?))
}
