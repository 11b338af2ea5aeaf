//! Vector storage: one trait, two Qdrant backends.
//!
//! [`EdgeStore`] is the default: qdrant-edge embedded in this process, one
//! directory per collection under a root, nothing to install or run.
//! [`QdrantStore`] speaks gRPC to a Qdrant server, for deployments that
//! outgrow one machine. [`Store`] picks one at run time (`--qdrant-url`).
//!
//! Both backends store one unnamed dense vector per point with cosine
//! distance, so scores mean the same whichever wrote them, and both reject
//! the same inputs up front (names, ids, filter values): code that works on
//! the embedded store works against a server.
//!
//! Ids are `u64` below 2^53 so they pass through JSON (JavaScript numbers)
//! unchanged. Payloads are flat JSON objects; keys are plain names, because
//! Qdrant reads a dot as a path into nested objects.

use anyhow::{anyhow, bail, ensure, Context, Result};
use qdrant_client::qdrant::{
    self as grpc, vectors_config, CountPointsBuilder, CreateCollectionBuilder,
    CreateFieldIndexCollectionBuilder, DeletePointsBuilder, FieldType, GetPointsBuilder,
    PointsIdsList, Query, QueryPointsBuilder, ScrollPointsBuilder, UpsertPointsBuilder,
    VectorParamsBuilder,
};
use qdrant_client::{Payload, Qdrant};
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    CountRequestBuilder, CreateIndex, Distance, EdgeConfig, EdgeConfigBuilder,
    EdgeOptimizersConfig, EdgeShard, EdgeVectorParamsBuilder, FieldIndexOperations,
    HnswIndexConfig, JsonPath, PayloadFieldSchema, PayloadSchemaType, PointId,
    PointInsertOperations, PointOperations, PointStruct, QueryEnum, QueryRequestBuilder,
    RetrieveRequestBuilder, ScoringQuery, ScrollRequestBuilder, UpdateOperation,
    WithPayloadInterface, DEFAULT_VECTOR_NAME,
};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A point to store: its id, its vector and a flat JSON payload.
#[derive(Debug, Clone)]
pub struct Point {
    pub id: u64,
    pub vector: Vec<f32>,
    pub payload: Map<String, Value>,
}

/// A point read back: from a search (`score` is the cosine similarity) or
/// from scroll/get (`score` is 0).
#[derive(Debug, Clone)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
    pub payload: Map<String, Value>,
}

/// One condition on a payload field.
#[derive(Debug, Clone)]
pub enum Cond {
    /// payload[key] == value; value is a string, integer or bool
    Eq(String, Value),
    /// payload[key] (a keyword, or an array of keywords) matches any of these
    AnyOf(String, Vec<String>),
    /// gte <= payload[key] <= lte (numbers)
    Range {
        key: String,
        gte: Option<f64>,
        lte: Option<f64>,
    },
}

impl Cond {
    /// The payload key the condition reads.
    pub fn key(&self) -> &str {
        match self {
            Cond::Eq(key, _) | Cond::AnyOf(key, _) | Cond::Range { key, .. } => key,
        }
    }
}

/// Points must match every `must` condition and none of the `must_not` ones.
/// The default (empty) filter matches every point.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub must: Vec<Cond>,
    pub must_not: Vec<Cond>,
}

impl Filter {
    /// payload[key] == value.
    pub fn eq(key: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::default().and(Cond::Eq(key.into(), value.into()))
    }

    /// Also require `cond`.
    pub fn and(mut self, cond: Cond) -> Self {
        self.must.push(cond);
        self
    }

    /// Also exclude points matching `cond`.
    pub fn not(mut self, cond: Cond) -> Self {
        self.must_not.push(cond);
        self
    }

    /// True when the filter has no conditions (matches everything).
    pub fn is_empty(&self) -> bool {
        self.must.is_empty() && self.must_not.is_empty()
    }
}

/// Payload index types; an index speeds up filtering on that field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Keyword,
    Integer,
    Float,
    Bool,
}

/// A vector collection store. Every method names its collection; errors
/// say which collection and operation failed.
pub trait VectorStore: Send + Sync {
    /// Creates the collection (cosine distance, `dim`) with payload indexes if it does not exist; checks dim if it does (clear error on mismatch).
    ///
    /// Indexes missing from an existing collection are added, so a new
    /// index can be introduced without a migration.
    fn ensure_collection(
        &self,
        name: &str,
        dim: usize,
        indexes: &[(&str, FieldKind)],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Inserts points, replacing (vector and whole payload) any with the same id.
    fn upsert(
        &self,
        collection: &str,
        points: Vec<Point>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Nearest first, cosine similarity as score; only points matching the filter.
    fn search(
        &self,
        collection: &str,
        vector: Vec<f32>,
        filter: Filter,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Hit>>> + Send;
    /// [`VectorStore::search`] without payloads, for callers that keep
    /// their own copy of them (the feed): the payload conversion is most of
    /// a search's cost at scale.
    fn search_ids(
        &self,
        collection: &str,
        vector: Vec<f32>,
        filter: Filter,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, f32)>>> + Send;
    /// Every matching point (paging internally), score 0, ordered by id; at most `limit`.
    fn scroll(
        &self,
        collection: &str,
        filter: Filter,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Hit>>> + Send;
    /// The points with these ids, in the order asked, score 0; unknown ids are skipped.
    fn get(&self, collection: &str, ids: Vec<u64>)
        -> impl Future<Output = Result<Vec<Hit>>> + Send;
    /// Deletes these ids; unknown ids are not an error.
    fn delete(&self, collection: &str, ids: Vec<u64>) -> impl Future<Output = Result<()>> + Send;
    /// Deletes every point matching the filter. An empty filter is refused:
    /// deleting a whole collection by accident should take more than a
    /// forgotten condition.
    fn delete_where(
        &self,
        collection: &str,
        filter: Filter,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Exact number of points matching the filter.
    fn count(&self, collection: &str, filter: Filter)
        -> impl Future<Output = Result<usize>> + Send;
    /// Durability point (edge: flush; server: no-op).
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Builds search indexes after a bulk load (edge: optimize(); server: no-op).
    fn optimize(&self, collection: &str) -> impl Future<Output = Result<()>> + Send;
    /// "qdrant-edge" or "qdrant"
    fn backend(&self) -> &'static str;
}

/// Ids stay below 2^53 so JSON clients (JavaScript numbers) read them exactly.
pub const MAX_ID: u64 = 1 << 53;

/// Points per scroll request: bounds one response's size on a server.
const SCROLL_PAGE: usize = 128;

/// Collection names become directory names (edge) and server collection
/// names after a prefix, so they are kept to one safe alphabet.
pub fn validate_collection_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "invalid collection name {name:?}: use 1 to 64 of a-z, 0-9 and '_'"
    );
    Ok(())
}

/// Payload keys in filters and indexes are plain names: Qdrant reads dots
/// and brackets as paths into nested values.
fn validate_key(key: &str) -> Result<()> {
    ensure!(
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "invalid payload key {key:?}: use letters, digits and '_' (no nesting)"
    );
    Ok(())
}

fn validate_id(id: u64) -> Result<()> {
    ensure!(id < MAX_ID, "point id {id} is not below 2^53");
    Ok(())
}

/// The values Qdrant can match exactly. Floats are not among them: compare
/// floats with a range.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Keyword(String),
    Integer(i64),
    Bool(bool),
}

fn scalar(key: &str, value: &Value) -> Result<Scalar> {
    match value {
        Value::String(s) => Ok(Scalar::Keyword(s.clone())),
        Value::Bool(b) => Ok(Scalar::Bool(*b)),
        Value::Number(n) => n.as_i64().map(Scalar::Integer).ok_or_else(|| {
            anyhow!("filter on {key:?}: {n} is not an integer; compare floats with a range")
        }),
        other => bail!("filter on {key:?}: cannot match {other}; use a string, integer or bool"),
    }
}

/// Checks every key and value of a filter, so both backends refuse the same
/// filters before anything is sent.
fn validate_filter(filter: &Filter) -> Result<()> {
    for cond in filter.must.iter().chain(&filter.must_not) {
        validate_key(cond.key())?;
        match cond {
            Cond::Eq(key, value) => {
                scalar(key, value)?;
            }
            Cond::AnyOf(..) => {}
            Cond::Range { key, gte, lte } => {
                ensure!(
                    gte.is_none_or(f64::is_finite) && lte.is_none_or(f64::is_finite),
                    "filter on {key:?}: range bounds must be finite numbers"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Embedded: qdrant-edge
// ---------------------------------------------------------------------------

/// Settings for collections an [`EdgeStore`] creates; existing collections
/// keep the settings they were created with.
#[derive(Debug, Clone, Default)]
pub struct EdgeOptions {
    /// `optimize()` builds an HNSW index only for segments with more vector
    /// data than this (KiB). `None`: qdrant's default, 10 MB, under which an
    /// exact scan is fast anyway.
    pub indexing_threshold_kb: Option<usize>,
    /// Searches scan exactly, even with an HNSW index, when fewer vectors
    /// than this much data (KiB) can match. `None`: qdrant's default, 10 MB.
    pub full_scan_threshold_kb: Option<usize>,
}

/// Embedded collections under one root directory, one qdrant-edge shard per
/// collection in `root/<collection>`, opened on first use and kept open.
///
/// Every write goes to the shard's write-ahead log before it is applied, so
/// a restart (even after a crash) sees every upsert that returned, flushed
/// or not. qdrant-edge is blocking, so every call runs on tokio's blocking
/// pool. The store is cheap to share: clones use the same open shards.
#[derive(Clone)]
pub struct EdgeStore {
    inner: Arc<EdgeInner>,
}

struct EdgeInner {
    root: PathBuf,
    options: EdgeOptions,
    /// Open shards. A shard's directory holds a lock while it is open, so
    /// each is opened once and shared.
    shards: Mutex<HashMap<String, Arc<EdgeShard>>>,
}

impl EdgeStore {
    /// Opens (creating if needed) the root directory. Collections are opened lazily.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(root, EdgeOptions::default())
    }

    /// Like [`EdgeStore::open`], with settings for the collections it creates.
    pub fn open_with(root: impl Into<PathBuf>, options: EdgeOptions) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the vector store directory {}", root.display()))?;
        Ok(Self {
            inner: Arc::new(EdgeInner {
                root,
                options,
                shards: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The directory holding the collections.
    pub fn root(&self) -> &std::path::Path {
        &self.inner.root
    }

    /// How many vectors of the collection are in an HNSW index (0 until
    /// `optimize` indexes a segment past the indexing threshold).
    pub async fn indexed_vectors(&self, collection: &str) -> Result<usize> {
        self.with_shard(collection, "info", |shard| {
            Ok(shard.info()?.indexed_vectors_count)
        })
        .await
    }

    /// Runs `f` on the collection's shard on the blocking pool.
    async fn with_shard<T: Send + 'static>(
        &self,
        collection: &str,
        op: &'static str,
        f: impl FnOnce(&EdgeShard) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        validate_collection_name(collection)?;
        let inner = self.inner.clone();
        let name = collection.to_owned();
        tokio::task::spawn_blocking(move || f(&*inner.shard(&name, None)?))
            .await
            .map_err(|e| anyhow!("the blocking task failed: {e}"))
            .and_then(|r| r)
            .with_context(|| format!("qdrant-edge: {op} in collection {collection:?}"))
    }
}

impl EdgeInner {
    /// The open shard for `name`: cached, loaded from disk, or (with
    /// `create_dim`) created. The map stays locked while a shard loads so
    /// that two callers never open one directory twice.
    fn shard(&self, name: &str, create_dim: Option<usize>) -> Result<Arc<EdgeShard>> {
        let mut shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shard) = shards.get(name) {
            return Ok(shard.clone());
        }
        let dir = self.root.join(name);
        // A shard writes its config when it is created, so the config file
        // (not the bare directory, which a failed create can leave) marks an
        // existing collection.
        let shard = if EdgeConfig::load(&dir).is_some() {
            // Replays the WAL: updates not yet flushed into segments come back.
            EdgeShard::load(&dir, None).with_context(|| format!("loading {}", dir.display()))?
        } else if let Some(dim) = create_dim {
            EdgeShard::new(&dir, self.config(dim))
                .with_context(|| format!("creating {}", dir.display()))?
        } else {
            bail!("collection {name:?} does not exist (ensure_collection creates it)");
        };
        let shard = Arc::new(shard);
        shards.insert(name.to_owned(), shard.clone());
        Ok(shard)
    }

    fn config(&self, dim: usize) -> EdgeConfig {
        let vector = EdgeVectorParamsBuilder::new(dim, Distance::Cosine).build();
        let mut config = EdgeConfigBuilder::new().vector(DEFAULT_VECTOR_NAME, vector);
        if let Some(kb) = self.options.indexing_threshold_kb {
            config = config.optimizers(EdgeOptimizersConfig {
                indexing_threshold: Some(kb),
                ..Default::default()
            });
        }
        if let Some(kb) = self.options.full_scan_threshold_kb {
            config = config.hnsw_config(HnswIndexConfig {
                full_scan_threshold: kb,
                ..Default::default()
            });
        }
        config.build()
    }

    fn open_shards(&self) -> Vec<Arc<EdgeShard>> {
        let shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        shards.values().cloned().collect()
    }
}

fn edge_key(key: &str) -> Result<JsonPath> {
    validate_key(key)?;
    key.parse()
        .map_err(|()| anyhow!("invalid payload key {key:?}"))
}

fn edge_schema(kind: FieldKind) -> PayloadSchemaType {
    match kind {
        FieldKind::Keyword => PayloadSchemaType::Keyword,
        FieldKind::Integer => PayloadSchemaType::Integer,
        FieldKind::Float => PayloadSchemaType::Float,
        FieldKind::Bool => PayloadSchemaType::Bool,
    }
}

fn edge_condition(cond: &Cond) -> Result<qdrant_edge::Condition> {
    use qdrant_edge::{FieldCondition, Match, Range, ValueVariants};
    let key = edge_key(cond.key())?;
    let field = match cond {
        Cond::Eq(k, value) => {
            let value = match scalar(k, value)? {
                Scalar::Keyword(s) => ValueVariants::String(s),
                Scalar::Integer(i) => ValueVariants::Integer(i),
                Scalar::Bool(b) => ValueVariants::Bool(b),
            };
            FieldCondition::new_match(key, Match::new_value(value))
        }
        Cond::AnyOf(_, values) => FieldCondition::new_match(key, Match::from(values.clone())),
        Cond::Range { gte, lte, .. } => FieldCondition::new_range(
            key,
            Range {
                lt: None,
                gt: None,
                gte: gte.map(OrderedFloat),
                lte: lte.map(OrderedFloat),
            },
        ),
    };
    Ok(qdrant_edge::Condition::Field(field))
}

/// Our filter as qdrant-edge's; `None` for the empty filter.
fn edge_filter(filter: &Filter) -> Result<Option<qdrant_edge::Filter>> {
    validate_filter(filter)?;
    if filter.is_empty() {
        return Ok(None);
    }
    let conditions = |conds: &[Cond]| -> Result<Option<Vec<_>>> {
        let converted = conds
            .iter()
            .map(edge_condition)
            .collect::<Result<Vec<_>>>()?;
        Ok((!converted.is_empty()).then_some(converted))
    };
    Ok(Some(qdrant_edge::Filter {
        should: None,
        min_should: None,
        must: conditions(&filter.must)?,
        must_not: conditions(&filter.must_not)?,
    }))
}

fn edge_id(id: PointId) -> Result<u64> {
    match id {
        PointId::NumId(n) => Ok(n),
        PointId::Uuid(u) => bail!("point id {u} is a UUID; this store uses integer ids"),
    }
}

fn edge_hit(id: PointId, score: f32, payload: Option<qdrant_edge::Payload>) -> Result<Hit> {
    Ok(Hit {
        id: edge_id(id)?,
        score,
        payload: payload.map(|p| p.0).unwrap_or_default(),
    })
}

fn edge_update(shard: &EdgeShard, op: PointOperations) -> Result<()> {
    Ok(shard.update(UpdateOperation::PointOperation(op))?)
}

impl EdgeStore {
    /// The shared body of `search` and `search_ids`.
    async fn nearest(&self, collection: &str, vector: Vec<f32>, filter: Filter, limit: usize, payload: bool) -> Result<Vec<qdrant_edge::ScoredPoint>> {
        let filter = edge_filter(&filter)?;
        if limit == 0 {
            return validate_collection_name(collection).map(|()| Vec::new());
        }
        self.with_shard(collection, "search", move |shard| {
            let mut request = QueryRequestBuilder::new(limit)
                .query(ScoringQuery::Vector(QueryEnum::from(vector)))
                .with_payload(WithPayloadInterface::Bool(payload));
            if let Some(filter) = filter {
                request = request.filter(filter);
            }
            Ok(shard.query(request.build())?)
        })
        .await
    }
}

impl VectorStore for EdgeStore {
    async fn ensure_collection(
        &self,
        name: &str,
        dim: usize,
        indexes: &[(&str, FieldKind)],
    ) -> Result<()> {
        validate_collection_name(name)?;
        ensure!(dim > 0, "collection {name:?}: dim must be positive");
        let indexes = indexes
            .iter()
            .map(|&(key, kind)| Ok((edge_key(key)?, edge_schema(kind))))
            .collect::<Result<Vec<_>>>()?;
        let inner = self.inner.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let shard = inner.shard(&owned, Some(dim))?;
            let params = shard.config().vectors.get(DEFAULT_VECTOR_NAME).cloned();
            let Some(params) = params else {
                bail!("collection {owned:?} has no unnamed vector; it was not made by this store");
            };
            ensure!(
                params.size == dim,
                "collection {owned:?} holds {}-dimensional vectors, not {dim} (a different embedding model?)",
                params.size
            );
            ensure!(
                params.distance == Distance::Cosine,
                "collection {owned:?} uses {:?} distance, not cosine",
                params.distance
            );
            let existing = shard.info()?.payload_schema;
            for (key, schema) in indexes {
                match existing.get(&key) {
                    Some(info) if info.data_type == schema => continue,
                    Some(info) => bail!(
                        "payload index {key} is {:?}, not {schema:?}; drop the collection to change it",
                        info.data_type
                    ),
                    None => shard.update(UpdateOperation::FieldIndexOperation(
                        FieldIndexOperations::CreateIndex(CreateIndex {
                            field_name: key,
                            field_schema: Some(PayloadFieldSchema::FieldType(schema)),
                        }),
                    ))?,
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| anyhow!("the blocking task failed: {e}"))
        .and_then(|r| r)
        .with_context(|| format!("qdrant-edge: ensure_collection {name:?}"))
    }

    async fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<()> {
        if points.is_empty() {
            return validate_collection_name(collection);
        }
        let points = points
            .into_iter()
            .map(|p| {
                validate_id(p.id)?;
                Ok(PointStruct::new(p.id, p.vector, Value::Object(p.payload)).into())
            })
            .collect::<Result<Vec<_>>>()?;
        self.with_shard(collection, "upsert", move |shard| {
            edge_update(
                shard,
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
            )
        })
        .await
    }

    async fn search(&self, collection: &str, vector: Vec<f32>, filter: Filter, limit: usize) -> Result<Vec<Hit>> {
        let found = self.nearest(collection, vector, filter, limit, true).await?;
        found.into_iter().map(|p| edge_hit(p.id, p.score, p.payload)).collect()
    }

    async fn search_ids(&self, collection: &str, vector: Vec<f32>, filter: Filter, limit: usize) -> Result<Vec<(u64, f32)>> {
        let found = self.nearest(collection, vector, filter, limit, false).await?;
        found.into_iter().map(|p| Ok((edge_id(p.id)?, p.score))).collect()
    }

    async fn scroll(&self, collection: &str, filter: Filter, limit: usize) -> Result<Vec<Hit>> {
        let filter = edge_filter(&filter)?;
        self.with_shard(collection, "scroll", move |shard| {
            let mut hits = Vec::new();
            let mut offset = None;
            while hits.len() < limit {
                let mut request = ScrollRequestBuilder::new()
                    .limit((limit - hits.len()).min(SCROLL_PAGE))
                    .with_payload(WithPayloadInterface::Bool(true));
                if let Some(filter) = &filter {
                    request = request.filter(filter.clone());
                }
                if let Some(offset) = offset.take() {
                    request = request.offset(offset);
                }
                let (records, next) = shard.scroll(request.build())?;
                for r in records {
                    hits.push(edge_hit(r.id, 0.0, r.payload)?);
                }
                // `next` is the first id of the following page (inclusive).
                match next {
                    Some(next) => offset = Some(next),
                    None => break,
                }
            }
            Ok(hits)
        })
        .await
    }

    async fn get(&self, collection: &str, ids: Vec<u64>) -> Result<Vec<Hit>> {
        let ids = dedup(ids);
        if ids.is_empty() {
            return validate_collection_name(collection).map(|()| Vec::new());
        }
        self.with_shard(collection, "get", move |shard| {
            let request =
                RetrieveRequestBuilder::new(ids.into_iter().map(PointId::NumId).collect())
                    .with_payload(WithPayloadInterface::Bool(true))
                    .build();
            // qdrant-edge keeps the requested order and skips unknown ids.
            shard
                .retrieve(request)?
                .into_iter()
                .map(|r| edge_hit(r.id, 0.0, r.payload))
                .collect()
        })
        .await
    }

    async fn delete(&self, collection: &str, ids: Vec<u64>) -> Result<()> {
        if ids.is_empty() {
            return validate_collection_name(collection);
        }
        self.with_shard(collection, "delete", move |shard| {
            let ids = ids.into_iter().map(PointId::NumId).collect();
            edge_update(shard, PointOperations::DeletePoints { ids })
        })
        .await
    }

    async fn delete_where(&self, collection: &str, filter: Filter) -> Result<()> {
        let filter = edge_filter(&filter)?
            .context("delete_where needs at least one condition; refusing to delete everything")?;
        self.with_shard(collection, "delete_where", move |shard| {
            edge_update(shard, PointOperations::DeletePointsByFilter(filter))
        })
        .await
    }

    async fn count(&self, collection: &str, filter: Filter) -> Result<usize> {
        let filter = edge_filter(&filter)?;
        self.with_shard(collection, "count", move |shard| {
            let mut request = CountRequestBuilder::new().exact(true);
            if let Some(filter) = filter {
                request = request.filter(filter);
            }
            Ok(shard.count(request.build())?)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for shard in inner.open_shards() {
                shard
                    .flush()
                    .with_context(|| format!("flushing {}", shard.path().display()))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| anyhow!("the blocking task failed: {e}"))
        .and_then(|r| r)
        .context("qdrant-edge: flush")
    }

    async fn optimize(&self, collection: &str) -> Result<()> {
        self.with_shard(collection, "optimize", |shard| {
            shard.optimize()?;
            Ok(())
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "qdrant-edge"
    }
}

/// Drops repeated ids, keeping the first of each, so both backends return
/// one hit per id.
fn dedup(ids: Vec<u64>) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().filter(|id| seen.insert(*id)).collect()
}

// ---------------------------------------------------------------------------
// Server: qdrant-client over gRPC
// ---------------------------------------------------------------------------

/// Collections on a Qdrant server, reached over gRPC (port 6334).
///
/// Every collection name gets `prefix` in front, so several deployments (or
/// test runs) can share a server. Writes wait for the server to apply them,
/// so a read that follows a write sees it, as with the embedded store.
pub struct QdrantStore {
    client: Qdrant,
    prefix: String,
}

impl QdrantStore {
    /// A client for `url` (e.g. `http://localhost:6334`); the API key comes
    /// from `QDRANT_API_KEY` when set. Connects lazily: an unreachable server
    /// shows up as an error on the first call.
    pub fn connect(url: &str, prefix: &str) -> Result<Self> {
        ensure!(
            prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "invalid collection prefix {prefix:?}: use a-z, 0-9 and '_'"
        );
        let api_key = std::env::var("QDRANT_API_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        let client = Qdrant::from_url(url)
            .api_key(api_key)
            // The version check runs a blocking health check while building
            // and prints to stdout; the library never prints.
            .skip_compatibility_check()
            // The default 5 s is short for large upserts and index builds.
            .timeout(Duration::from_secs(60))
            .build()
            .with_context(|| format!("qdrant: connecting to {url}"))?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
        })
    }

    /// The server-side name of a collection.
    fn name(&self, collection: &str) -> Result<String> {
        validate_collection_name(collection)?;
        Ok(format!("{}{collection}", self.prefix))
    }
}

fn grpc_field_type(kind: FieldKind) -> FieldType {
    match kind {
        FieldKind::Keyword => FieldType::Keyword,
        FieldKind::Integer => FieldType::Integer,
        FieldKind::Float => FieldType::Float,
        FieldKind::Bool => FieldType::Bool,
    }
}

/// The type of an existing index as collection info reports it. Its
/// numbering differs from [`FieldType`]'s (Keyword is 1 here, 0 there).
fn grpc_schema_type(kind: FieldKind) -> grpc::PayloadSchemaType {
    match kind {
        FieldKind::Keyword => grpc::PayloadSchemaType::Keyword,
        FieldKind::Integer => grpc::PayloadSchemaType::Integer,
        FieldKind::Float => grpc::PayloadSchemaType::Float,
        FieldKind::Bool => grpc::PayloadSchemaType::Bool,
    }
}

fn grpc_condition(cond: &Cond) -> Result<grpc::Condition> {
    Ok(match cond {
        Cond::Eq(key, value) => match scalar(key, value)? {
            Scalar::Keyword(s) => grpc::Condition::matches(key, s),
            Scalar::Integer(i) => grpc::Condition::matches(key, i),
            Scalar::Bool(b) => grpc::Condition::matches(key, b),
        },
        Cond::AnyOf(key, values) => grpc::Condition::matches(key, values.clone()),
        Cond::Range { key, gte, lte } => grpc::Condition::range(
            key,
            grpc::Range {
                gte: *gte,
                lte: *lte,
                ..Default::default()
            },
        ),
    })
}

/// Our filter as the server's; `None` for the empty filter.
fn grpc_filter(filter: &Filter) -> Result<Option<grpc::Filter>> {
    validate_filter(filter)?;
    if filter.is_empty() {
        return Ok(None);
    }
    let conditions = |conds: &[Cond]| conds.iter().map(grpc_condition).collect::<Result<Vec<_>>>();
    Ok(Some(grpc::Filter {
        must: conditions(&filter.must)?,
        must_not: conditions(&filter.must_not)?,
        ..Default::default()
    }))
}

fn grpc_id(id: Option<grpc::PointId>) -> Result<u64> {
    use grpc::point_id::PointIdOptions;
    match id.and_then(|id| id.point_id_options) {
        Some(PointIdOptions::Num(n)) => Ok(n),
        Some(PointIdOptions::Uuid(u)) => {
            bail!("point id {u} is a UUID; this store uses integer ids")
        }
        None => bail!("the server returned a point without an id"),
    }
}

/// A server payload as JSON. gRPC delivers it as a hash map; keys are sorted
/// so the same point always reads back the same.
fn grpc_payload(payload: HashMap<String, grpc::Value>) -> Map<String, Value> {
    let mut fields: Vec<_> = payload.into_iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields
        .into_iter()
        .map(|(k, v)| (k, v.into_json()))
        .collect()
}

impl VectorStore for QdrantStore {
    async fn ensure_collection(
        &self,
        name: &str,
        dim: usize,
        indexes: &[(&str, FieldKind)],
    ) -> Result<()> {
        let full = self.name(name)?;
        ensure!(dim > 0, "collection {name:?}: dim must be positive");
        for (key, _) in indexes {
            validate_key(key)?;
        }
        let ctx = || format!("qdrant: ensure_collection {full:?}");
        if !self
            .client
            .collection_exists(&full)
            .await
            .with_context(ctx)?
        {
            let create = CreateCollectionBuilder::new(&full)
                .vectors_config(VectorParamsBuilder::new(dim as u64, grpc::Distance::Cosine));
            if let Err(e) = self.client.create_collection(create).await {
                // Another client may have created it since we looked.
                if !self
                    .client
                    .collection_exists(&full)
                    .await
                    .with_context(ctx)?
                {
                    return Err(e).with_context(ctx);
                }
            }
        }
        let info = self
            .client
            .collection_info(&full)
            .await
            .with_context(ctx)?
            .result
            .with_context(|| format!("qdrant: no info for collection {full:?}"))?;
        let vectors = info
            .config
            .and_then(|c| c.params)
            .and_then(|p| p.vectors_config)
            .and_then(|v| v.config);
        let Some(vectors_config::Config::Params(params)) = vectors else {
            bail!(
                "collection {full:?} has no single unnamed vector; it was not made by this store"
            );
        };
        ensure!(
            params.size == dim as u64,
            "collection {full:?} holds {}-dimensional vectors, not {dim} (a different embedding model?)",
            params.size
        );
        ensure!(
            params.distance == grpc::Distance::Cosine as i32,
            "collection {full:?} does not use cosine distance"
        );
        for &(key, kind) in indexes {
            match info.payload_schema.get(key) {
                Some(schema) if schema.data_type == grpc_schema_type(kind) as i32 => {}
                Some(_) => bail!(
                    "collection {full:?}: payload index {key} is not {kind:?}; drop the collection to change it"
                ),
                None => {
                    let create =
                        CreateFieldIndexCollectionBuilder::new(&full, key, grpc_field_type(kind))
                            .wait(true);
                    self.client
                        .create_field_index(create)
                        .await
                        .with_context(|| format!("qdrant: creating index {key} in {full:?}"))?;
                }
            }
        }
        Ok(())
    }

    async fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<()> {
        let full = self.name(collection)?;
        if points.is_empty() {
            return Ok(());
        }
        let points = points
            .into_iter()
            .map(|p| {
                validate_id(p.id)?;
                Ok(grpc::PointStruct::new(
                    p.id,
                    p.vector,
                    Payload::from(p.payload),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.client
            .upsert_points(UpsertPointsBuilder::new(&full, points).wait(true))
            .await
            .with_context(|| format!("qdrant: upsert in collection {full:?}"))?;
        Ok(())
    }

    async fn search(
        &self,
        collection: &str,
        vector: Vec<f32>,
        filter: Filter,
        limit: usize,
    ) -> Result<Vec<Hit>> {
        let full = self.name(collection)?;
        let filter = grpc_filter(&filter)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut request = QueryPointsBuilder::new(&full)
            .query(Query::new_nearest(vector))
            .limit(limit as u64)
            .with_payload(true);
        if let Some(filter) = filter {
            request = request.filter(filter);
        }
        let response = self
            .client
            .query(request)
            .await
            .with_context(|| format!("qdrant: search in collection {full:?}"))?;
        response
            .result
            .into_iter()
            .map(|p| {
                Ok(Hit {
                    id: grpc_id(p.id)?,
                    score: p.score,
                    payload: grpc_payload(p.payload),
                })
            })
            .collect()
    }

    async fn search_ids(&self, collection: &str, vector: Vec<f32>, filter: Filter, limit: usize) -> Result<Vec<(u64, f32)>> {
        let full = self.name(collection)?;
        let filter = grpc_filter(&filter)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut request = QueryPointsBuilder::new(&full).query(Query::new_nearest(vector)).limit(limit as u64).with_payload(false);
        if let Some(filter) = filter {
            request = request.filter(filter);
        }
        let response = self.client.query(request).await.with_context(|| format!("qdrant: search in collection {full:?}"))?;
        response.result.into_iter().map(|p| Ok((grpc_id(p.id)?, p.score))).collect()
    }

    async fn scroll(&self, collection: &str, filter: Filter, limit: usize) -> Result<Vec<Hit>> {
        let full = self.name(collection)?;
        let filter = grpc_filter(&filter)?;
        let mut hits = Vec::new();
        let mut offset = None;
        while hits.len() < limit {
            let page = (limit - hits.len()).min(SCROLL_PAGE) as u32;
            let mut request = ScrollPointsBuilder::new(&full)
                .limit(page)
                .with_payload(true);
            if let Some(filter) = &filter {
                request = request.filter(filter.clone());
            }
            if let Some(offset) = offset.take() {
                request = request.offset(offset);
            }
            let response = self
                .client
                .scroll(request)
                .await
                .with_context(|| format!("qdrant: scroll in collection {full:?}"))?;
            for p in response.result {
                hits.push(Hit {
                    id: grpc_id(p.id)?,
                    score: 0.0,
                    payload: grpc_payload(p.payload),
                });
            }
            match response.next_page_offset {
                Some(next) => offset = Some(next),
                None => break,
            }
        }
        Ok(hits)
    }

    async fn get(&self, collection: &str, ids: Vec<u64>) -> Result<Vec<Hit>> {
        let full = self.name(collection)?;
        let ids = dedup(ids);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let request = GetPointsBuilder::new(
            &full,
            ids.iter()
                .map(|&id| grpc::PointId::from(id))
                .collect::<Vec<_>>(),
        )
        .with_payload(true);
        let response = self
            .client
            .get_points(request)
            .await
            .with_context(|| format!("qdrant: get in collection {full:?}"))?;
        let mut found = HashMap::new();
        for p in response.result {
            found.insert(grpc_id(p.id)?, grpc_payload(p.payload));
        }
        // The server does not promise an order; give the one asked for.
        Ok(ids
            .into_iter()
            .filter_map(|id| {
                found.remove(&id).map(|payload| Hit {
                    id,
                    score: 0.0,
                    payload,
                })
            })
            .collect())
    }

    async fn delete(&self, collection: &str, ids: Vec<u64>) -> Result<()> {
        let full = self.name(collection)?;
        if ids.is_empty() {
            return Ok(());
        }
        let request = DeletePointsBuilder::new(&full)
            .points(PointsIdsList::from(ids))
            .wait(true);
        self.client
            .delete_points(request)
            .await
            .with_context(|| format!("qdrant: delete in collection {full:?}"))?;
        Ok(())
    }

    async fn delete_where(&self, collection: &str, filter: Filter) -> Result<()> {
        let full = self.name(collection)?;
        let filter = grpc_filter(&filter)?
            .context("delete_where needs at least one condition; refusing to delete everything")?;
        let request = DeletePointsBuilder::new(&full).points(filter).wait(true);
        self.client
            .delete_points(request)
            .await
            .with_context(|| format!("qdrant: delete_where in collection {full:?}"))?;
        Ok(())
    }

    async fn count(&self, collection: &str, filter: Filter) -> Result<usize> {
        let full = self.name(collection)?;
        let mut request = CountPointsBuilder::new(&full).exact(true);
        if let Some(filter) = grpc_filter(&filter)? {
            request = request.filter(filter);
        }
        let response = self
            .client
            .count(request)
            .await
            .with_context(|| format!("qdrant: count in collection {full:?}"))?;
        Ok(response.result.map_or(0, |r| r.count as usize))
    }

    async fn flush(&self) -> Result<()> {
        // The server's own WAL makes every acknowledged write durable.
        Ok(())
    }

    async fn optimize(&self, collection: &str) -> Result<()> {
        // The server's optimizers run in the background on their own.
        self.name(collection).map(drop)
    }

    fn backend(&self) -> &'static str {
        "qdrant"
    }
}

// ---------------------------------------------------------------------------
// Either, chosen at run time
// ---------------------------------------------------------------------------

/// Either backend, chosen at run time (`--qdrant-url`).
pub enum Store {
    Edge(EdgeStore),
    Qdrant(QdrantStore),
}

impl VectorStore for Store {
    async fn ensure_collection(
        &self,
        name: &str,
        dim: usize,
        indexes: &[(&str, FieldKind)],
    ) -> Result<()> {
        match self {
            Store::Edge(s) => s.ensure_collection(name, dim, indexes).await,
            Store::Qdrant(s) => s.ensure_collection(name, dim, indexes).await,
        }
    }

    async fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<()> {
        match self {
            Store::Edge(s) => s.upsert(collection, points).await,
            Store::Qdrant(s) => s.upsert(collection, points).await,
        }
    }

    async fn search(
        &self,
        collection: &str,
        vector: Vec<f32>,
        filter: Filter,
        limit: usize,
    ) -> Result<Vec<Hit>> {
        match self {
            Store::Edge(s) => s.search(collection, vector, filter, limit).await,
            Store::Qdrant(s) => s.search(collection, vector, filter, limit).await,
        }
    }

    async fn search_ids(&self, collection: &str, vector: Vec<f32>, filter: Filter, limit: usize) -> Result<Vec<(u64, f32)>> {
        match self {
            Store::Edge(s) => s.search_ids(collection, vector, filter, limit).await,
            Store::Qdrant(s) => s.search_ids(collection, vector, filter, limit).await,
        }
    }

    async fn scroll(&self, collection: &str, filter: Filter, limit: usize) -> Result<Vec<Hit>> {
        match self {
            Store::Edge(s) => s.scroll(collection, filter, limit).await,
            Store::Qdrant(s) => s.scroll(collection, filter, limit).await,
        }
    }

    async fn get(&self, collection: &str, ids: Vec<u64>) -> Result<Vec<Hit>> {
        match self {
            Store::Edge(s) => s.get(collection, ids).await,
            Store::Qdrant(s) => s.get(collection, ids).await,
        }
    }

    async fn delete(&self, collection: &str, ids: Vec<u64>) -> Result<()> {
        match self {
            Store::Edge(s) => s.delete(collection, ids).await,
            Store::Qdrant(s) => s.delete(collection, ids).await,
        }
    }

    async fn delete_where(&self, collection: &str, filter: Filter) -> Result<()> {
        match self {
            Store::Edge(s) => s.delete_where(collection, filter).await,
            Store::Qdrant(s) => s.delete_where(collection, filter).await,
        }
    }

    async fn count(&self, collection: &str, filter: Filter) -> Result<usize> {
        match self {
            Store::Edge(s) => s.count(collection, filter).await,
            Store::Qdrant(s) => s.count(collection, filter).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        match self {
            Store::Edge(s) => s.flush().await,
            Store::Qdrant(s) => s.flush().await,
        }
    }

    async fn optimize(&self, collection: &str) -> Result<()> {
        match self {
            Store::Edge(s) => s.optimize(collection).await,
            Store::Qdrant(s) => s.optimize(collection).await,
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            Store::Edge(s) => s.backend(),
            Store::Qdrant(s) => s.backend(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn collection_names_are_lowercase_digits_and_underscores() {
        for ok in ["memories", "facts_v2", "0", &"a".repeat(64)] {
            validate_collection_name(ok).unwrap();
        }
        for bad in [
            "",
            "Memories",
            "a-b",
            "a b",
            "a.b",
            "../x",
            "é",
            &"a".repeat(65),
        ] {
            let err = validate_collection_name(bad).unwrap_err().to_string();
            assert!(err.contains("invalid collection name"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn payload_keys_are_plain_names() {
        for ok in ["user", "createdAt", "n_2"] {
            validate_key(ok).unwrap();
        }
        for bad in ["", "a.b", "tags[]", "a b", "a-b"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filter_builders_fill_must_and_must_not() {
        let f = Filter::eq("user", "a")
            .and(Cond::AnyOf("tags".into(), vec!["x".into()]))
            .not(Cond::Eq("pinned".into(), json!(true)));
        assert_eq!(f.must.len(), 2);
        assert_eq!(f.must_not.len(), 1);
        assert_eq!(f.must[0].key(), "user");
        assert!(!f.is_empty());
        assert!(Filter::default().is_empty());
    }

    #[test]
    fn empty_filter_converts_to_none() {
        assert!(edge_filter(&Filter::default()).unwrap().is_none());
        assert!(grpc_filter(&Filter::default()).unwrap().is_none());
    }

    /// Compared as JSON, the shape qdrant documents for filters, so the test
    /// checks what the engine will read rather than repeating the conversion.
    #[test]
    fn filter_converts_to_edge_conditions() {
        let f = Filter::eq("user", "a")
            .and(Cond::Eq("n".into(), json!(4)))
            .and(Cond::AnyOf("tags".into(), vec!["x".into(), "y".into()]))
            .and(Cond::Range {
                key: "score".into(),
                gte: Some(0.5),
                lte: None,
            })
            .not(Cond::Eq("pinned".into(), json!(true)));
        let edge = edge_filter(&f).unwrap().unwrap();
        let got = serde_json::to_value(&edge).unwrap();
        assert_eq!(
            got,
            json!({
                "must": [
                    {"key": "user", "match": {"value": "a"}},
                    {"key": "n", "match": {"value": 4}},
                    {"key": "tags", "match": {"any": ["x", "y"]}},
                    {"key": "score", "range": {"lt": null, "gt": null, "gte": 0.5, "lte": null}},
                ],
                "must_not": [
                    {"key": "pinned", "match": {"value": true}},
                ],
            }),
            "{got:#}"
        );
    }

    #[test]
    fn filter_converts_to_grpc_conditions() {
        use grpc::condition::ConditionOneOf;
        use grpc::r#match::MatchValue;
        let f = Filter::eq("user", "a")
            .and(Cond::Eq("n".into(), json!(-4)))
            .and(Cond::AnyOf("tags".into(), vec!["x".into()]))
            .and(Cond::Range {
                key: "score".into(),
                gte: None,
                lte: Some(2.0),
            })
            .not(Cond::Eq("pinned".into(), json!(false)));
        let g = grpc_filter(&f).unwrap().unwrap();
        let field = |c: &grpc::Condition| match &c.condition_one_of {
            Some(ConditionOneOf::Field(f)) => f.clone(),
            other => panic!("not a field condition: {other:?}"),
        };
        let matched = |c: &grpc::Condition| field(c).r#match.and_then(|m| m.match_value).unwrap();
        assert_eq!(g.must.len(), 4);
        assert_eq!(field(&g.must[0]).key, "user");
        assert_eq!(matched(&g.must[0]), MatchValue::Keyword("a".into()));
        assert_eq!(matched(&g.must[1]), MatchValue::Integer(-4));
        assert_eq!(
            matched(&g.must[2]),
            MatchValue::Keywords(grpc::RepeatedStrings {
                strings: vec!["x".into()]
            })
        );
        let range = field(&g.must[3]).range.unwrap();
        assert_eq!(
            (range.gte, range.lte, range.gt, range.lt),
            (None, Some(2.0), None, None)
        );
        assert_eq!(g.must_not.len(), 1);
        assert_eq!(matched(&g.must_not[0]), MatchValue::Boolean(false));
        assert!(g.should.is_empty());
    }

    #[test]
    fn eq_takes_strings_integers_and_bools_only() {
        for bad in [
            json!(1.5),
            json!(null),
            json!([1]),
            json!({"a": 1}),
            json!(u64::MAX),
        ] {
            let f = Filter::eq("k", bad.clone());
            let err = edge_filter(&f).unwrap_err().to_string();
            assert!(err.contains("\"k\""), "{bad}: {err}");
            assert!(grpc_filter(&f).is_err(), "{bad}");
        }
        // Integral numbers are fine however they were written.
        assert!(edge_filter(&Filter::eq("k", 3u64)).is_ok());
    }

    #[test]
    fn invalid_keys_and_ranges_are_rejected_in_filters() {
        assert!(edge_filter(&Filter::eq("a.b", "x")).is_err());
        let nan = Filter::default().and(Cond::Range {
            key: "k".into(),
            gte: Some(f64::NAN),
            lte: None,
        });
        assert!(edge_filter(&nan).is_err());
        assert!(grpc_filter(&nan).is_err());
    }

    /// The server reports index types in a different enum than the one used
    /// to create them; mixing them up would recreate or reject every index.
    #[test]
    fn grpc_index_type_enums_differ() {
        assert_eq!(grpc_field_type(FieldKind::Keyword) as i32, 0);
        assert_eq!(grpc_schema_type(FieldKind::Keyword) as i32, 1);
        assert_eq!(
            grpc_schema_type(FieldKind::Bool),
            grpc::PayloadSchemaType::Bool
        );
    }

    #[test]
    fn dedup_keeps_first_occurrence_order() {
        assert_eq!(dedup(vec![3, 1, 3, 2, 1]), vec![3, 1, 2]);
    }

    #[test]
    fn edge_config_uses_one_unnamed_cosine_vector() {
        let inner = EdgeInner {
            root: PathBuf::new(),
            options: EdgeOptions {
                indexing_threshold_kb: Some(7),
                full_scan_threshold_kb: None,
            },
            shards: Mutex::new(HashMap::new()),
        };
        let config = inner.config(12);
        let params = &config.vectors[DEFAULT_VECTOR_NAME];
        assert_eq!(config.vectors.len(), 1);
        assert_eq!((params.size, params.distance), (12, Distance::Cosine));
        assert_eq!(config.optimizers().indexing_threshold, Some(7));
        assert!(config.hnsw_config.is_none());
    }
}
