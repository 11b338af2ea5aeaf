//! The orders each user placed through the assistant, in SQLite
//! (`$DATA/orders.db`), so `GET /v1/orders` answers after a restart and
//! without asking every mini-program. Rows are written when a confirmed
//! order comes back and updated as the order's status moves on.
//!
//! Queries take the user (or the app) as a parameter: there is no way to
//! list orders without saying whose.

use rusqlite::{params, Connection};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;
use std::sync::Mutex;
use crate::world::Clock;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OrderRow {
    pub user: String,
    pub session: String,
    pub app: String,
    pub tool: String,
    pub order_id: String,
    pub status: String,
    pub amount: i64,
    pub currency: String,
    pub summary: String,
    pub payment_status: String,
    pub data: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    #[serde(flatten)]
    pub row: OrderRow,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A small SQLite file; calls are short, so a std mutex is enough (no
/// lock is ever held across an `.await`).
pub struct Orders {
    conn: Mutex<Connection>,
    clock: Clock,
}

impl Orders {
    pub fn open(path: &Path, clock: Clock) -> rusqlite::Result<Self> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        Self::setup(Connection::open(path)?, clock)
    }

    pub fn in_memory(clock: Clock) -> rusqlite::Result<Self> {
        Self::setup(Connection::open_in_memory()?, clock)
    }

    fn setup(conn: Connection, clock: Clock) -> rusqlite::Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (
                app TEXT NOT NULL,
                order_id TEXT NOT NULL,
                user TEXT NOT NULL,
                session TEXT NOT NULL,
                tool TEXT NOT NULL,
                status TEXT NOT NULL,
                amount INTEGER NOT NULL,
                currency TEXT NOT NULL,
                summary TEXT NOT NULL,
                payment_status TEXT NOT NULL,
                data TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL,
                PRIMARY KEY (app, order_id));
             CREATE INDEX IF NOT EXISTS orders_user ON orders (user, created_ms);",
        )?;
        Ok(Self { conn: Mutex::new(conn), clock })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn upsert(&self, r: &OrderRow) -> rusqlite::Result<()> {
        let now = self.clock.now_ms();
        self.conn().execute(
            "INSERT INTO orders (app, order_id, user, session, tool, status, amount, currency, summary, payment_status, data, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)
             ON CONFLICT (app, order_id) DO UPDATE SET status = ?6, payment_status = ?10, data = ?11, updated_ms = ?12
             WHERE user = ?3",
            params![r.app, r.order_id, r.user, r.session, r.tool, r.status, r.amount, r.currency, r.summary, r.payment_status, r.data.to_string(), now],
        )?;
        Ok(())
    }

    /// Updates one of `user`'s orders (another user's row with the same
    /// ids is left alone).
    pub fn update_status(&self, user: &str, app: &str, order_id: &str, status: &str, payment_status: Option<&str>, data: &Value) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE orders SET status = ?3, payment_status = COALESCE(?4, payment_status), data = ?5, updated_ms = ?6
             WHERE app = ?1 AND order_id = ?2 AND user = ?7",
            params![app, order_id, status, payment_status, data.to_string(), self.clock.now_ms(), user],
        )?;
        Ok(())
    }

    fn query(&self, filter: &str, arg: &str) -> rusqlite::Result<Vec<OrderView>> {
        let c = self.conn();
        let mut st = c.prepare(&format!(
            "SELECT user, session, app, tool, order_id, status, amount, currency, summary, payment_status, data, created_ms, updated_ms
             FROM orders WHERE {filter} = ?1 ORDER BY created_ms DESC, order_id LIMIT 500"
        ))?;
        let rows = st.query_map(params![arg], |r| {
            Ok(OrderView {
                row: OrderRow {
                    user: r.get(0)?,
                    session: r.get(1)?,
                    app: r.get(2)?,
                    tool: r.get(3)?,
                    order_id: r.get(4)?,
                    status: r.get(5)?,
                    amount: r.get(6)?,
                    currency: r.get(7)?,
                    summary: r.get(8)?,
                    payment_status: r.get(9)?,
                    data: serde_json::from_str(&r.get::<_, String>(10)?).unwrap_or(Value::Null),
                },
                created_ms: r.get(11)?,
                updated_ms: r.get(12)?,
            })
        })?;
        rows.collect()
    }

    /// Every user's orders still awaiting payment (to reconcile at start).
    pub fn awaiting_payment(&self) -> rusqlite::Result<Vec<OrderView>> {
        self.query("payment_status", "awaiting_payment")
    }

    /// A user's orders, newest first.
    pub fn for_user(&self, user: &str) -> rusqlite::Result<Vec<OrderView>> {
        self.query("user", user)
    }

    /// Orders placed with one mini-program (for its app key with `orders:read`).
    pub fn for_app(&self, app: &str) -> rusqlite::Result<Vec<OrderView>> {
        self.query("app", app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(user: &str, id: &str) -> OrderRow {
        OrderRow {
            user: user.into(),
            session: "s".into(),
            app: "food".into(),
            tool: "food_order".into(),
            order_id: id.into(),
            status: "accepted".into(),
            amount: 4300,
            currency: "CNY".into(),
            summary: "kung pao".into(),
            payment_status: "paid".into(),
            data: json!({"order_id": id}),
        }
    }

    #[test]
    fn orders_are_per_user_and_another_user_cannot_overwrite_one() {
        let o = Orders::in_memory(crate::world::Clock::pinned(0)).unwrap();
        o.upsert(&row("alice", "o1")).unwrap();
        o.upsert(&row("bob", "o2")).unwrap();
        // Same (app, order id) claimed by another user: ignored.
        let mut stolen = row("bob", "o1");
        stolen.status = "cancelled".into();
        o.upsert(&stolen).unwrap();
        let a = o.for_user("alice").unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].row.status, "accepted");
        assert_eq!(o.for_user("bob").unwrap().len(), 1);
        o.update_status("bob", "food", "o1", "stolen", None, &json!({})).unwrap();
        assert_eq!(o.for_user("alice").unwrap()[0].row.status, "accepted");
        o.update_status("alice", "food", "o1", "delivered", None, &json!({})).unwrap();
        assert_eq!(o.for_user("alice").unwrap()[0].row.status, "delivered");
        assert_eq!(o.for_user("alice").unwrap()[0].row.payment_status, "paid");
        assert_eq!(o.for_app("food").unwrap().len(), 2);
        assert!(o.for_user("carol").unwrap().is_empty());
    }
}
