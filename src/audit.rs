//! The audit log: every tool call, confirmation and payment, with who asked
//! for it, what it was, when, and how it ended, in SQLite.
//!
//! Rows are only ever appended. A row's `actor` says who caused it: `model`
//! (a tool call the model made), `user` (a confirmation or decline), or
//! `system` (the agent itself, e.g. paying after a confirmation).

use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::world::Clock;

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: String,
    source: rusqlite::Error,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    pub id: i64,
    pub ts_ms: i64,
    pub session: String,
    pub actor: String,
    pub kind: String,
    pub tool: Option<String>,
    pub detail: Value,
    pub outcome: String,
}

#[derive(Clone)]
pub struct Audit {
    conn: Arc<Mutex<Connection>>,
    /// Rows are stamped by the world's clock.
    clock: Clock,
}

impl Audit {
    pub fn open(path: &Path, clock: Clock) -> Result<Self, AuditError> {
        let err = |source| AuditError {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        Self::setup(Connection::open(path).map_err(err)?, clock).map_err(err)
    }

    pub fn in_memory(clock: Clock) -> Self {
        Self::setup(Connection::open_in_memory().expect("in-memory SQLite opens"), clock).expect("schema applies")
    }

    fn setup(conn: Connection, clock: Clock) -> rusqlite::Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS audit (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                ts_ms INTEGER NOT NULL,
                session TEXT NOT NULL,
                actor TEXT NOT NULL,      -- model | user | system
                kind TEXT NOT NULL,       -- tool_call | confirmation_request | confirm | decline | superseded | payment
                tool TEXT,
                detail TEXT NOT NULL,     -- JSON: arguments, amounts, tokens' ids
                outcome TEXT NOT NULL)",
        )?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            clock,
        })
    }

    /// Appends one row. A failure to write the log is returned: callers that
    /// move money must not go on without it.
    pub fn record(
        &self,
        session: &str,
        actor: &str,
        kind: &str,
        tool: Option<&str>,
        detail: &Value,
        outcome: &str,
    ) -> rusqlite::Result<()> {
        let now = self.clock.now_ms();
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "INSERT INTO audit (ts_ms, session, actor, kind, tool, detail, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rusqlite::params![now, session, actor, kind, tool, detail.to_string(), outcome],
        )?;
        Ok(())
    }

    /// Every row of a session (or all sessions), oldest first.
    pub fn entries(&self, session: Option<&str>) -> rusqlite::Result<Vec<Entry>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn.prepare(
            "SELECT id, ts_ms, session, actor, kind, tool, detail, outcome FROM audit
             WHERE ?1 IS NULL OR session = ?1 ORDER BY id",
        )?;
        let rows = st.query_map([session], |r| {
            let detail: String = r.get(6)?;
            Ok(Entry {
                id: r.get(0)?,
                ts_ms: r.get(1)?,
                session: r.get(2)?,
                actor: r.get(3)?,
                kind: r.get(4)?,
                tool: r.get(5)?,
                detail: serde_json::from_str(&detail).unwrap_or(Value::String(detail)),
                outcome: r.get(7)?,
            })
        })?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_append_and_filter_by_session() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(&dir.path().join("audit.db"), crate::world::Clock::pinned(0)).unwrap();
        a.record("s1", "model", "tool_call", Some("food_search_restaurants"), &json!({"near": "People's Square"}), "ok").unwrap();
        a.record("s2", "user", "decline", Some("food_order"), &json!({}), "declined").unwrap();
        a.record("s1", "user", "confirm", Some("food_order"), &json!({"amount": 3800}), "confirmed").unwrap();
        let s1 = a.entries(Some("s1")).unwrap();
        assert_eq!(s1.len(), 2);
        assert_eq!(s1[1].detail["amount"], 3800);
        assert_eq!(a.entries(None).unwrap().len(), 3);
        // Survives reopening.
        drop(a);
        let a = Audit::open(&dir.path().join("audit.db"), crate::world::Clock::pinned(0)).unwrap();
        assert_eq!(a.entries(None).unwrap().len(), 3);
    }
}
