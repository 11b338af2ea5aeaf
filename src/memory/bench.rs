//! `errand bench-memory`: feed latency at catalog scale and memory-write
//! throughput, each as a ratio to an anchor measured in the same run.
//!
//! - The catalog: the sandbox's real items, embedded with MiniLM, then
//!   copied with jittered places and noisy vectors up to `items` (embedding
//!   100k texts would take an hour on two cores and measure MiniLM, not the
//!   feed). Indexed into qdrant-edge with its HNSW index built.
//! - Feed: users with likes, diets, dislikes and orders ask at random
//!   places and times; p50/p99 over all queries. Anchor: an exact scan of
//!   every vector in plain Rust (no filter, no re-ranking).
//! - Writes: `remember` (embed + upsert) per second. Anchor: MiniLM alone on
//!   the same texts, one at a time.

use super::embed::Embedder;
use super::feed::{Feed, FeedQuery};
use super::store::{EdgeStore, Store};
use super::{Memory, OrderMemory};
use crate::sandbox::{catalog, Service};
use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct MemoryBench {
    pub items: usize,
    pub queries: usize,
    pub index_s: f64,
    pub feed_p50_ms: f64,
    pub feed_p99_ms: f64,
    pub feed_max_ms: f64,
    /// Queries with nothing to show (a diet no place in that city fits).
    pub feed_empty: usize,
    pub scan_p50_ms: f64,
    pub writes: usize,
    pub writes_per_s: f64,
    pub embed_only_per_s: f64,
}

impl std::fmt::Display for MemoryBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "catalog: {} items (qdrant-edge, HNSW), indexed in {:.1} s", self.items, self.index_s)?;
        writeln!(f, "feed over {} queries: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (goal: p99 < 10 ms); {} had nothing to show", self.queries, self.feed_p50_ms, self.feed_p99_ms, self.feed_max_ms, self.feed_empty)?;
        writeln!(f, "anchor, exact scan of every vector: p50 {:.2} ms  → feed p50 / scan p50 = {:.2}×", self.scan_p50_ms, self.feed_p50_ms / self.scan_p50_ms)?;
        writeln!(f, "memory writes: {:.1}/s over {} writes; anchor, MiniLM alone: {:.1}/s → {:.2}× of embedding speed", self.writes_per_s, self.writes, self.embed_only_per_s, self.writes_per_s / self.embed_only_per_s)
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

pub async fn run(embedder: Arc<dyn Embedder>, items: usize, queries: usize, writes: usize) -> Result<MemoryBench> {
    let dir = tempfile_dir()?;
    let store = Arc::new(Store::Edge(EdgeStore::open(dir.join("vectors"))?));
    let memory = Memory::open(store, embedder.clone(), crate::world::Clock::wall()).await?;
    let feed = Feed::open(memory.clone()).await?;
    let real = catalog::items(42, &Service::ALL);
    let vectors = memory.embed(real.iter().map(|i| i.text.clone()).collect()).await?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut all = Vec::with_capacity(items);
    for k in 0..items {
        let i = k % real.len();
        let mut it = real[i].clone();
        let mut v = vectors[i].clone();
        if k >= real.len() {
            it.id = format!("{}#{k}", it.id);
            it.lat += rng.random_range(-0.03..0.03);
            it.lon += rng.random_range(-0.03..0.03);
            v.iter_mut().for_each(|x| *x += rng.random_range(-0.02f32..0.02));
            normalise(&mut v);
        }
        all.push((it, v));
    }
    let t = Instant::now();
    feed.index_prepared(all.clone()).await?;
    let index_s = t.elapsed().as_secs_f64();

    // Twenty people with different profiles.
    let likes = ["I love Sichuan food", "I like Japanese food", "I love hotpot", "I enjoy Cantonese dim sum", "I like western food"];
    for u in 0..20 {
        let user = format!("u{u}");
        memory.remember(&user, likes[u % likes.len()], None, "said").await?;
        if u % 4 == 0 {
            memory.remember(&user, "I'm vegetarian", None, "said").await?;
        }
        if u % 5 == 1 {
            memory.remember(&user, "I don't like spicy food", None, "said").await?;
        }
        for rid in ["sh01", "sh03", "bj01"].iter().take(u % 3 + 1) {
            let args = serde_json::json!({"restaurant_id": rid, "items": [{"dish_id": format!("{rid}-x"), "quantity": 1}]}).as_object().unwrap().clone();
            let tags = feed.tags_for(&args);
            memory.remember_order(&user, OrderMemory::new("food", "food_order", args, rid, 3000, "CNY"), tags).await?;
        }
    }
    let places: Vec<(f64, f64)> = crate::world::cities::CITIES.iter().flat_map(|c| c.places.iter().map(|p| (p.lat, p.lon))).collect();
    // Warm each profile once (its vector is cached until the user's memories change).
    for u in 0..20 {
        feed.feed(&format!("u{u}"), &FeedQuery::default()).await?;
    }
    let mut lat = Vec::with_capacity(queries);
    let mut empty = 0;
    for q in 0..queries {
        let (la, lo) = places[rng.random_range(0..places.len())];
        let query = FeedQuery { lat: Some(la), lon: Some(lo), minute: Some(rng.random_range(0..1440)), limit: 10, ..FeedQuery::default() };
        let t = Instant::now();
        let out = feed.feed(&format!("u{}", q % 20), &query).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        // A vegetarian in a city without a vegetarian place gets nothing: right, and counted.
        if out.is_empty() {
            empty += 1;
        }
    }
    // Anchor: exact scan.
    let mut scan = Vec::new();
    for _ in 0..queries.min(100) {
        let q = &all[rng.random_range(0..all.len())].1;
        let t = Instant::now();
        let mut best = (f32::MIN, 0usize);
        for (i, (_, v)) in all.iter().enumerate() {
            let s: f32 = v.iter().zip(q).map(|(a, b)| a * b).sum();
            if s > best.0 {
                best = (s, i);
            }
        }
        std::hint::black_box(best);
        scan.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Writes.
    let texts: Vec<String> = (0..writes).map(|i| format!("{} number {i}", likes[i % likes.len()])).collect();
    let t = Instant::now();
    for (i, text) in texts.iter().enumerate() {
        memory.remember(&format!("w{}", i % 10), text, None, "said").await?;
    }
    let writes_per_s = writes as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for text in &texts {
        memory.embed(vec![text.clone()]).await?;
    }
    let embed_only_per_s = writes as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(MemoryBench {
        items,
        queries,
        index_s,
        feed_p50_ms: pct(&mut lat.clone(), 0.5),
        feed_p99_ms: pct(&mut lat.clone(), 0.99),
        feed_max_ms: pct(&mut lat, 1.0),
        feed_empty: empty,
        scan_p50_ms: pct(&mut scan, 0.5),
        writes,
        writes_per_s,
        embed_only_per_s,
    })
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("errand-bench-memory-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
