//! The server's state on disk, behind one interface ([`Store`]): chat
//! sessions, their frame logs, each session's agent state (conversation,
//! flows, the open confirmation, payments not yet settled) and the order
//! book. [`SqliteStore`] keeps it in two SQLite files under the data
//! folder (WAL): `sessions.db` and `orders.db`.
//!
//! Every write happens before the frame that announces it goes out: a
//! frame is in the log before any client sees it, an open confirmation is
//! saved before it is shown, and an order is in the book before it is
//! paid. So after a restart or a kill -9 a client resumes its session from
//! its last `seq`, its confirmation can still be confirmed (or is refused
//! as expired), and reconciliation finds every order.
//!
//! The interface is what a shared database (Postgres) would implement for
//! several servers serving one population of users; nothing outside this
//! file speaks SQL about sessions.

use super::orders::{OrderRow, OrderView, Orders};
use crate::world::Clock;
use rusqlite::{params, Connection};
use serde_json::Value;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A session's fixed facts and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub id: String,
    pub user: String,
    pub wallet: String,
    /// `en`, `zh` or `ko` when the session's language was fixed.
    pub lang: Option<String>,
    pub created_ms: i64,
    pub last_active_ms: i64,
    pub turns: u64,
}

/// One logged frame: its number, the input it answers, its JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFrame {
    pub seq: u64,
    pub reply_to: Option<String>,
    pub text: String,
}

/// A session as read back at start.
#[derive(Debug, Clone)]
pub struct StoredSession {
    pub row: SessionRow,
    /// Oldest first.
    pub frames: Vec<StoredFrame>,
    /// What the agent wrote last ([`crate::agent::SessionBook`]).
    pub state: Option<Value>,
}

/// Where the server keeps what must survive it. Implementations are
/// called from async code with short, non-blocking-in-practice writes
/// (an embedded database); a networked one would batch or move off-thread.
pub trait Store: Send + Sync {
    /// Creates (or replaces) a session's row.
    fn put_session(&self, s: &SessionRow) -> StoreResult<()>;
    /// Updates a session's counters after an input.
    fn touch_session(&self, id: &str, last_active_ms: i64, turns: u64) -> StoreResult<()>;
    /// Deletes a session with its frames and state.
    fn delete_session(&self, id: &str) -> StoreResult<()>;
    fn append_frame(&self, session: &str, frame: &StoredFrame) -> StoreResult<()>;
    /// Drops a session's frames numbered below `seq` (the log's bound).
    fn forget_frames_before(&self, session: &str, seq: u64) -> StoreResult<()>;
    /// The agent's state of a session; a session that is not in the store
    /// gets nothing written, and an error.
    fn put_state(&self, session: &str, state: &Value) -> StoreResult<()>;
    /// Every session, with its frames and state.
    fn sessions(&self) -> StoreResult<Vec<StoredSession>>;

    /// The order book: an order as placed, or its newer status.
    fn upsert_order(&self, r: &OrderRow) -> StoreResult<()>;
    fn update_order(&self, user: &str, app: &str, order_id: &str, status: &str, payment_status: Option<&str>, data: &Value) -> StoreResult<()>;
    fn orders_awaiting_payment(&self) -> StoreResult<Vec<OrderView>>;
    fn orders_for_user(&self, user: &str) -> StoreResult<Vec<OrderView>>;
    fn orders_for_app(&self, app: &str) -> StoreResult<Vec<OrderView>>;
}

/// [`Store`] on SQLite files in the data folder.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    orders: Orders,
}

impl SqliteStore {
    /// Opens (creating) `dir/sessions.db` and `dir/orders.db`.
    pub fn open(dir: &Path, clock: Clock) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let orders = Orders::open(&dir.join("orders.db"), clock)?;
        Self::setup(Connection::open(dir.join("sessions.db"))?, orders)
    }

    pub fn in_memory(clock: Clock) -> StoreResult<Self> {
        Self::setup(Connection::open_in_memory()?, Orders::in_memory(clock)?)
    }

    fn setup(conn: Connection, orders: Orders) -> StoreResult<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL with NORMAL loses nothing when the process dies (kill -9); a
        // power cut may lose the last commits, never the file.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sessions (
                id TEXT PRIMARY KEY,
                user TEXT NOT NULL,
                wallet TEXT NOT NULL,
                lang TEXT,
                created_ms INTEGER NOT NULL,
                last_active_ms INTEGER NOT NULL,
                turns INTEGER NOT NULL,
                state TEXT);
             CREATE TABLE IF NOT EXISTS frames (
                session TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
                seq INTEGER NOT NULL,
                reply_to TEXT,
                frame TEXT NOT NULL,
                PRIMARY KEY (session, seq));",
        )?;
        Ok(Self { conn: Mutex::new(conn), orders })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn put_session(&self, s: &SessionRow) -> StoreResult<()> {
        self.conn().execute(
            "INSERT INTO sessions (id, user, wallet, lang, created_ms, last_active_ms, turns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET last_active_ms = ?6, turns = ?7",
            params![s.id, s.user, s.wallet, s.lang, s.created_ms, s.last_active_ms, seq_param(s.turns)],
        )?;
        Ok(())
    }

    fn touch_session(&self, id: &str, last_active_ms: i64, turns: u64) -> StoreResult<()> {
        self.conn().execute("UPDATE sessions SET last_active_ms = ?2, turns = ?3 WHERE id = ?1", params![id, last_active_ms, seq_param(turns)])?;
        Ok(())
    }

    fn delete_session(&self, id: &str) -> StoreResult<()> {
        self.conn().execute("DELETE FROM sessions WHERE id = ?1", params![id])?;
        Ok(())
    }

    fn append_frame(&self, session: &str, f: &StoredFrame) -> StoreResult<()> {
        // A frame of a deleted session (a reply still finishing) is not kept.
        self.conn().execute(
            "INSERT OR REPLACE INTO frames (session, seq, reply_to, frame) SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?1)",
            params![session, seq_param(f.seq), f.reply_to, f.text],
        )?;
        Ok(())
    }

    fn forget_frames_before(&self, session: &str, seq: u64) -> StoreResult<()> {
        self.conn().execute("DELETE FROM frames WHERE session = ?1 AND seq < ?2", params![session, seq_param(seq)])?;
        Ok(())
    }

    fn put_state(&self, session: &str, state: &Value) -> StoreResult<()> {
        // No row: the session was deleted, or never written (its creation
        // failed to store). Either way the state is not safe on disk, and
        // the agent must not show a confirmation or pay on it.
        match self.conn().execute("UPDATE sessions SET state = ?2 WHERE id = ?1", params![session, state.to_string()])? {
            0 => Err(StoreError(format!("session {session} is not in the store"))),
            _ => Ok(()),
        }
    }

    fn sessions(&self) -> StoreResult<Vec<StoredSession>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT id, user, wallet, lang, created_ms, last_active_ms, turns, state FROM sessions ORDER BY created_ms, id")?;
        let rows = st.query_map([], |r| {
            let state: Option<String> = r.get(7)?;
            Ok(StoredSession {
                row: SessionRow {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    wallet: r.get(2)?,
                    lang: r.get(3)?,
                    created_ms: r.get(4)?,
                    last_active_ms: r.get(5)?,
                    turns: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                },
                frames: Vec::new(),
                // A state that does not parse is left out (the session
                // resumes with an empty conversation), not a failed start.
                state: state.and_then(|s| serde_json::from_str(&s).ok()),
            })
        })?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        let mut fr = c.prepare("SELECT seq, reply_to, frame FROM frames WHERE session = ?1 ORDER BY seq")?;
        for s in &mut out {
            let frames = fr.query_map(params![s.row.id], |r| {
                Ok(StoredFrame { seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), reply_to: r.get(1)?, text: r.get(2)? })
            })?;
            s.frames = frames.collect::<Result<Vec<_>, _>>()?;
        }
        Ok(out)
    }

    fn upsert_order(&self, r: &OrderRow) -> StoreResult<()> {
        Ok(self.orders.upsert(r)?)
    }

    fn update_order(&self, user: &str, app: &str, order_id: &str, status: &str, payment_status: Option<&str>, data: &Value) -> StoreResult<()> {
        Ok(self.orders.update_status(user, app, order_id, status, payment_status, data)?)
    }

    fn orders_awaiting_payment(&self) -> StoreResult<Vec<OrderView>> {
        Ok(self.orders.awaiting_payment()?)
    }

    fn orders_for_user(&self, user: &str) -> StoreResult<Vec<OrderView>> {
        Ok(self.orders.for_user(user)?)
    }

    fn orders_for_app(&self, app: &str) -> StoreResult<Vec<OrderView>> {
        Ok(self.orders.for_app(app)?)
    }
}

/// Whether a session row with this id exists (tests).
#[cfg(test)]
fn has_session(s: &SqliteStore, id: &str) -> bool {
    use rusqlite::OptionalExtension;
    s.conn().query_row("SELECT 1 FROM sessions WHERE id = ?1", params![id], |_| Ok(())).optional().ok().flatten().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(id: &str) -> SessionRow {
        SessionRow { id: id.into(), user: "alice".into(), wallet: "alice".into(), lang: Some("zh".into()), created_ms: 5, last_active_ms: 5, turns: 0 }
    }

    fn frame(seq: u64, reply_to: Option<&str>) -> StoredFrame {
        StoredFrame { seq, reply_to: reply_to.map(str::to_owned), text: format!("{{\"seq\":{seq}}}") }
    }

    #[test]
    fn sessions_frames_and_state_come_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let st = SqliteStore::open(dir.path(), Clock::pinned(0)).unwrap();
            st.put_session(&row("s-1")).unwrap();
            for seq in 1..=5 {
                st.append_frame("s-1", &frame(seq, Some("m1"))).unwrap();
            }
            st.forget_frames_before("s-1", 3).unwrap();
            st.put_state("s-1", &json!({"v": 1, "x": [1, 2]})).unwrap();
            st.touch_session("s-1", 99, 2).unwrap();
        }
        let st = SqliteStore::open(dir.path(), Clock::pinned(0)).unwrap();
        let all = st.sessions().unwrap();
        assert_eq!(all.len(), 1);
        let s = &all[0];
        assert_eq!(s.row, SessionRow { last_active_ms: 99, turns: 2, ..row("s-1") });
        assert_eq!(s.frames.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(s.frames[0], frame(3, Some("m1")));
        assert_eq!(s.state, Some(json!({"v": 1, "x": [1, 2]})));
    }

    #[test]
    fn a_deleted_session_takes_its_frames_and_gets_no_late_writes() {
        let st = SqliteStore::in_memory(Clock::pinned(0)).unwrap();
        st.put_session(&row("s-1")).unwrap();
        st.put_session(&row("s-2")).unwrap();
        st.append_frame("s-1", &frame(1, None)).unwrap();
        st.delete_session("s-1").unwrap();
        assert!(!has_session(&st, "s-1"));
        // A reply still finishing after the delete writes nothing back.
        st.append_frame("s-1", &frame(2, None)).unwrap();
        assert!(st.put_state("s-1", &json!({"v": 1})).is_err());
        let all = st.sessions().unwrap();
        assert_eq!(all.iter().map(|s| s.row.id.as_str()).collect::<Vec<_>>(), vec!["s-2"]);
        let n: i64 = st.conn().query_row("SELECT COUNT(*) FROM frames", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
    }
}
