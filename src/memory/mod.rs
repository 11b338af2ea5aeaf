//! Personal memory and recommendations.
//!
//! ```text
//!  agent / REST ──► Memory ──► keys (tags, commands; en/zh/ko)
//!                    │  embed (MiniLM on candle, blocking threads)
//!                    ▼
//!                  store: VectorStore ── EdgeStore (qdrant-edge, in-process, default)
//!                    ▲                └─ QdrantStore (qdrant-client, --qdrant-url)
//!  sandbox /catalog ─┴─► feed: catalog index (incremental) + ranking with reasons
//! ```
//!
//! Two collections: `memories` (one point per memory, payload `user`, so every
//! read filters by the owner) and `catalog` (what the mini-programs sell).

pub mod embed;
pub mod extract;
pub mod feed;
pub mod keys;
pub mod store;
pub mod bench;

use anyhow::{bail, Context, Result};
use embed::Embedder;
use keys::Kind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use store::{Cond, FieldKind, Filter, Point, Store, VectorStore};

pub const MEMORIES: &str = "memories";

/// The most memories one user keeps; the oldest non-order ones go first.
pub const MAX_PER_USER: usize = 2000;
/// Longest memory text kept, in characters.
pub const MAX_TEXT: usize = 500;

/// One thing remembered about a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryItem {
    /// Below 2^53, so JavaScript clients keep it exact.
    pub id: u64,
    pub user: String,
    pub kind: Kind,
    pub text: String,
    pub tags: Vec<String>,
    /// `said` (the person's words), `extracted` (the model's reading of
    /// them) or `order` (a paid order).
    pub source: String,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderMemory>,
}

/// A confirmed order, kept so "my usual" can place it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderMemory {
    pub app: String,
    pub tool: String,
    pub arguments: Map<String, Value>,
    pub summary: String,
    pub amount: i64,
    pub currency: String,
    /// Orders with the same key are "the same order" (the arguments that
    /// choose what is bought: everything but free text such as notes).
    pub key: String,
}

impl OrderMemory {
    pub fn new(app: &str, tool: &str, arguments: Map<String, Value>, summary: &str, amount: i64, currency: &str) -> Self {
        let mut k = arguments.clone();
        for free in ["note", "notes", "remark", "address", "phone"] {
            k.remove(free);
        }
        Self {
            app: app.into(),
            tool: tool.into(),
            key: format!("{tool} {}", canonical(&Value::Object(k))),
            arguments,
            summary: summary.into(),
            amount,
            currency: currency.into(),
        }
    }
}

/// JSON with object keys sorted, so equal arguments give equal keys.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys.iter().map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k]))).collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// "My usual": the order and how often it was placed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usual {
    pub order: OrderMemory,
    pub times: usize,
    pub last_ms: i64,
}

/// What the feed needs to know about a person.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Profile {
    /// Tag → weight from what they said they like.
    pub likes: HashMap<String, f32>,
    pub dislikes: Vec<String>,
    /// Diet tags (`vegetarian`): a hard rule.
    pub diet: Vec<String>,
    /// Tag → number of paid orders carrying it.
    pub ordered_tags: HashMap<String, usize>,
    /// Catalog refs (`restaurant_id` values) → number of orders.
    pub ordered_refs: HashMap<String, usize>,
    pub orders: usize,
    /// Text to embed for similarity: likes and recent orders.
    pub query: String,
    /// Changes with every write, for caches.
    pub version: u64,
}

use crate::world::Clock;

fn new_id() -> u64 {
    rand::random::<u64>() >> 11
}

/// A user id as given to the store: plain, bounded, no control characters.
pub fn check_user(user: &str) -> Result<()> {
    if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
        bail!("a user id is 1 to 128 printable characters");
    }
    Ok(())
}

/// Per-user memories on a vector store, with embeddings.
pub struct Memory {
    store: Arc<Store>,
    embedder: Arc<dyn Embedder>,
    /// Bumped on every write of a user's memories (profile caches).
    versions: Mutex<HashMap<String, u64>>,
    /// Stamps memories; the feed's time of day when none is asked for.
    clock: Clock,
}

impl Memory {
    /// Opens (or creates) the `memories` collection.
    pub async fn open(store: Arc<Store>, embedder: Arc<dyn Embedder>, clock: Clock) -> Result<Arc<Self>> {
        store
            .ensure_collection(MEMORIES, embedder.dim(), &[("user", FieldKind::Keyword), ("kind", FieldKind::Keyword), ("tags", FieldKind::Keyword), ("created_ms", FieldKind::Integer)])
            .await
            .context("opening the memories collection")?;
        Ok(Arc::new(Self { store, embedder, versions: Mutex::new(HashMap::new()), clock }))
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }

    /// Embeds on a blocking thread (MiniLM is CPU work).
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let e = self.embedder.clone();
        tokio::task::spawn_blocking(move || e.embed(&texts)).await.context("the embedding thread failed")?
    }

    /// The version of a user's memories (changes on every write).
    pub fn version(&self, user: &str) -> u64 {
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()).get(user).unwrap_or(&0)
    }

    fn bump(&self, user: &str) {
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()).entry(user.to_owned()).or_insert(0) += 1;
    }

    fn owner(user: &str) -> Filter {
        Filter::eq("user", json!(user))
    }

    /// What a memory's vector is made from: the words plus English tags
    /// (see [`keys`] for why).
    fn embed_text(text: &str, tags: &[String]) -> String {
        if tags.is_empty() {
            text.to_owned()
        } else {
            format!("{text} ({})", tags.join(", "))
        }
    }

    /// Keeps what the person said about themselves. A like replaces an
    /// earlier dislike of the same thing and the other way round; the same
    /// statement twice is kept once.
    pub async fn remember(&self, user: &str, text: &str, kind: Option<Kind>, source: &str) -> Result<MemoryItem> {
        check_user(user)?;
        let text = text.trim();
        if text.is_empty() {
            bail!("there is nothing to remember: the text is empty");
        }
        if text.chars().count() > MAX_TEXT {
            bail!("a memory is at most {MAX_TEXT} characters");
        }
        if keys::is_payment_instruction(text) {
            bail!("an instruction to pay without asking is not kept: every payment waits for the person's tap on Confirm");
        }
        let (k, tags) = match keys::preference(text) {
            Some((k, t)) => (kind.unwrap_or(k), t),
            None => (kind.unwrap_or(Kind::Fact), keys::tags(text)),
        };
        if k == Kind::Order {
            bail!("orders are remembered from the order flow, not from text");
        }
        // Superseded: the opposite stance on any of the same tags, and the same words again.
        let mine = self.list(user).await?;
        let opposite = |o: Kind| matches!((k, o), (Kind::Like, Kind::Dislike) | (Kind::Dislike, Kind::Like) | (Kind::Diet, Kind::Dislike) | (Kind::Dislike, Kind::Diet));
        let gone: Vec<u64> = mine
            .iter()
            .filter(|m| m.kind != Kind::Order)
            .filter(|m| m.text.eq_ignore_ascii_case(text) || (opposite(m.kind) && m.tags.iter().any(|t| tags.contains(t))))
            .map(|m| m.id)
            .collect();
        let item = MemoryItem { id: new_id(), user: user.into(), kind: k, text: text.into(), tags, source: source.into(), created_ms: self.clock.now_ms(), order: None };
        self.write(item.clone()).await?;
        if !gone.is_empty() {
            self.store.delete(MEMORIES, gone).await?;
        }
        self.trim(&mine).await?;
        self.bump(user);
        Ok(item)
    }

    /// Keeps a paid order, tagged with what was bought (`tags` from the catalog).
    pub async fn remember_order(&self, user: &str, order: OrderMemory, tags: Vec<String>) -> Result<MemoryItem> {
        check_user(user)?;
        let text = order.summary.clone();
        let item = MemoryItem { id: new_id(), user: user.into(), kind: Kind::Order, text, tags, source: "order".into(), created_ms: self.clock.now_ms(), order: Some(order) };
        self.write(item.clone()).await?;
        self.bump(user);
        Ok(item)
    }

    async fn write(&self, item: MemoryItem) -> Result<()> {
        let v = self.embed(vec![Self::embed_text(&item.text, &item.tags)]).await?;
        let vector = v.into_iter().next().context("the embedder returned nothing")?;
        let Value::Object(payload) = serde_json::to_value(&item)? else { unreachable!("a struct serialises to an object") };
        self.store.upsert(MEMORIES, vec![Point { id: item.id, vector, payload }]).await
    }

    /// Over the cap, the oldest memories that are not orders go.
    async fn trim(&self, before: &[MemoryItem]) -> Result<()> {
        if before.len() < MAX_PER_USER {
            return Ok(());
        }
        let mut old: Vec<&MemoryItem> = before.iter().filter(|m| m.kind != Kind::Order).collect();
        old.sort_by_key(|m| m.created_ms);
        let n = before.len() + 1 - MAX_PER_USER;
        let ids = old.iter().take(n).map(|m| m.id).collect();
        self.store.delete(MEMORIES, ids).await
    }

    /// A user's memories, newest first.
    pub async fn list(&self, user: &str) -> Result<Vec<MemoryItem>> {
        check_user(user)?;
        let hits = self.store.scroll(MEMORIES, Self::owner(user), MAX_PER_USER * 2).await?;
        let mut v: Vec<MemoryItem> = hits.into_iter().filter_map(|h| serde_json::from_value(Value::Object(h.payload)).ok()).collect();
        v.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        Ok(v)
    }

    /// Forgets one memory of this user. `false` when the user has no such memory
    /// (another user's id included: it is not theirs to forget).
    pub async fn forget(&self, user: &str, id: u64) -> Result<bool> {
        check_user(user)?;
        let f = Self::owner(user).and(Cond::Eq("id".into(), json!(id)));
        if self.store.count(MEMORIES, f.clone()).await? == 0 {
            return Ok(false);
        }
        self.store.delete_where(MEMORIES, f).await?;
        self.bump(user);
        Ok(true)
    }

    /// "Forget that …": the memory that best matches the words (not orders).
    pub async fn forget_matching(&self, user: &str, text: &str) -> Result<Option<MemoryItem>> {
        let hits = self.recall(user, text, 1, &[Kind::Like, Kind::Dislike, Kind::Diet, Kind::Fact]).await?;
        let Some((m, score)) = hits.into_iter().next() else { return Ok(None) };
        let tags = keys::tags(text);
        // Similar enough, or about the same thing.
        if score < 0.55 && !(tags.iter().any(|t| m.tags.contains(t))) {
            return Ok(None);
        }
        self.forget(user, m.id).await?;
        Ok(Some(m))
    }

    /// Forgets everything about a user; returns how many memories went.
    pub async fn delete_all(&self, user: &str) -> Result<usize> {
        check_user(user)?;
        let n = self.store.count(MEMORIES, Self::owner(user)).await?;
        self.store.delete_where(MEMORIES, Self::owner(user)).await?;
        self.bump(user);
        Ok(n)
    }

    /// The `k` memories most relevant to `query`, of the given kinds.
    pub async fn recall(&self, user: &str, query: &str, k: usize, kinds: &[Kind]) -> Result<Vec<(MemoryItem, f32)>> {
        check_user(user)?;
        let v = self.embed(vec![query.to_owned()]).await?.pop().context("the embedder returned nothing")?;
        let kinds: Vec<String> = kinds.iter().map(|k| k.as_str().to_owned()).collect();
        let f = Self::owner(user).and(Cond::AnyOf("kind".into(), kinds));
        let hits = self.store.search(MEMORIES, v, f, k).await?;
        Ok(hits
            .into_iter()
            .filter_map(|h| Some((serde_json::from_value::<MemoryItem>(Value::Object(h.payload)).ok()?, h.score)))
            .collect())
    }

    /// The order a person places most often in `app` (any app when `None`);
    /// the most recent wins a tie.
    pub async fn usual(&self, user: &str, app: Option<&str>) -> Result<Option<Usual>> {
        let orders: Vec<MemoryItem> = self.list(user).await?.into_iter().filter(|m| m.kind == Kind::Order).collect();
        let mut by_key: HashMap<String, Usual> = HashMap::new();
        for m in orders {
            let Some(o) = m.order else { continue };
            if app.is_some_and(|a| a != o.app) {
                continue;
            }
            let e = by_key.entry(o.key.clone()).or_insert(Usual { order: o, times: 0, last_ms: m.created_ms });
            e.times += 1;
            // Newest first: the first seen is the latest version of this order.
            e.last_ms = e.last_ms.max(m.created_ms);
        }
        Ok(by_key.into_values().max_by(|a, b| a.times.cmp(&b.times).then(a.last_ms.cmp(&b.last_ms))))
    }

    /// What the feed ranks by.
    pub async fn profile(&self, user: &str) -> Result<Profile> {
        let mut p = Profile { version: self.version(user), ..Profile::default() };
        let mut query = Vec::new();
        for m in self.list(user).await? {
            match m.kind {
                Kind::Like => {
                    for t in &m.tags {
                        *p.likes.entry(t.clone()).or_insert(0.0) += 1.0;
                    }
                    query.push(m.text.clone());
                }
                Kind::Dislike => p.dislikes.extend(m.tags.iter().cloned()),
                Kind::Diet => p.diet.extend(m.tags.iter().cloned()),
                Kind::Fact => {}
                Kind::Order => {
                    p.orders += 1;
                    for t in &m.tags {
                        *p.ordered_tags.entry(t.clone()).or_insert(0) += 1;
                    }
                    if let Some(o) = &m.order {
                        for v in o.arguments.iter().filter(|(k, _)| k.ends_with("_id")).filter_map(|(_, v)| v.as_str()) {
                            *p.ordered_refs.entry(v.to_owned()).or_insert(0) += 1;
                        }
                        if p.orders <= 5 {
                            query.push(m.text.clone());
                        }
                    }
                }
            }
        }
        p.dislikes.sort();
        p.dislikes.dedup();
        p.diet.sort();
        p.diet.dedup();
        let mut tags: Vec<&String> = p.likes.keys().chain(p.ordered_tags.keys()).chain(p.diet.iter()).collect();
        tags.sort();
        tags.dedup();
        if !tags.is_empty() {
            query.push(tags.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "));
        }
        p.query = query.join(". ");
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_ignore_free_text_and_key_order() {
        let a: Map<String, Value> = serde_json::from_str(r#"{"restaurant_id":"sh01","items":[{"dish_id":"a","quantity":1}],"address":"1 Road"}"#).unwrap();
        let b: Map<String, Value> = serde_json::from_str(r#"{"address":"2 Street","items":[{"quantity":1,"dish_id":"a"}],"restaurant_id":"sh01"}"#).unwrap();
        let c: Map<String, Value> = serde_json::from_str(r#"{"restaurant_id":"sh01","items":[{"dish_id":"a","quantity":2}]}"#).unwrap();
        let k = |m: Map<String, Value>| OrderMemory::new("food", "food_order", m, "x", 1, "CNY").key;
        assert_eq!(k(a.clone()), k(b));
        assert_ne!(k(a), k(c));
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(check_user("alice").is_ok());
        assert!(check_user("").is_err());
        assert!(check_user("a\nb").is_err());
        assert!(check_user(&"x".repeat(200)).is_err());
    }
}
