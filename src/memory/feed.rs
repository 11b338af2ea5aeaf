//! The "Now" feed: the sandbox catalogs, embedded and indexed once
//! (incrementally: only new or changed items are embedded again), ranked
//! per person by their profile, the time and the place, with a reason for
//! every item.
//!
//! Ranking, per candidate (nearest by the profile's vector, plus every item
//! carrying a tag the person likes or orders):
//!
//! ```text
//! score = 0.4·similarity + affinity (tags ordered, tags liked, places ordered from)
//!       + time of day (+0.1 open/playing now, −0.5 not) + 0.05·(rating − 4)
//!       − distance (0.04 per km beyond the first, at most 0.4)
//! dropped: disliked tags; for a diet, food without its tag
//! diversity: each pick costs later items 0.12 per shared first tag, 0.3 for the same restaurant
//! ```

use super::keys::Kind;
use super::store::{Cond, FieldKind, Filter, Point, Store, VectorStore};
use super::{Memory, Profile};
use crate::prompt::Lang;
use crate::sandbox::catalog::CatalogItem;
use crate::world::cities;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub const CATALOG: &str = "catalog";
/// Candidates fetched by vector before re-ranking.
const CANDIDATES: usize = 200;

/// Where and when the feed is asked for.
#[derive(Debug, Clone)]
pub struct FeedQuery {
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    /// Minutes after local midnight; now when `None`.
    pub minute: Option<u32>,
    /// Item kinds; restaurants, shows, concerts and movies when empty.
    pub kinds: Vec<String>,
    pub limit: usize,
    pub lang: Lang,
}

impl Default for FeedQuery {
    fn default() -> Self {
        Self { lat: None, lon: None, minute: None, kinds: Vec::new(), limit: 10, lang: Lang::En }
    }
}

/// One recommendation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeedItem {
    pub id: String,
    pub app: String,
    pub kind: String,
    pub name: String,
    pub score: f32,
    /// Why, in the asked language: "because you often order Sichuan food".
    pub reason: String,
    /// often_ordered | ordered_here | said_like | diet | open_nearby | top_rated
    pub reason_code: String,
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<i64>,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rating: Option<f64>,
    pub city: String,
    /// How to find it in its app (`restaurant_id`, …).
    pub refs: Map<String, Value>,
}

/// What an indexing pass did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct IndexStats {
    pub total: usize,
    pub embedded: usize,
    pub unchanged: usize,
    pub removed: usize,
    pub ms: f64,
}

/// The catalog in memory (for tags and reasons) and in the store (for search).
pub struct Feed {
    store: Arc<Store>,
    memory: Arc<Memory>,
    items: RwLock<HashMap<u64, Arc<CatalogItem>>>,
    /// `restaurant_id` (and other refs) → catalog item ids.
    by_ref: RwLock<HashMap<String, u64>>,
    ready: AtomicBool,
    /// user → (memory version, profile, profile vector)
    profiles: Mutex<HashMap<String, (u64, Arc<Profile>, Option<Arc<Vec<f32>>>)>>,
    /// Vectors of context words ("dinner restaurant"), computed once.
    context: Mutex<HashMap<String, Arc<Vec<f32>>>>,
}

/// A catalog item's point id: stable across runs and stores.
pub fn point_id(item_id: &str) -> u64 {
    let h = Sha256::digest(item_id.as_bytes());
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) >> 11
}

fn content_hash(item: &CatalogItem) -> String {
    let v = serde_json::to_vec(item).unwrap_or_default();
    hex::encode(&Sha256::digest(&v)[..8])
}

impl Feed {
    pub async fn open(memory: Arc<Memory>) -> Result<Arc<Self>> {
        let store = memory.store().clone();
        store
            .ensure_collection(
                CATALOG,
                memory.embedder().dim(),
                &[("kind", FieldKind::Keyword), ("app", FieldKind::Keyword), ("city", FieldKind::Keyword), ("tags", FieldKind::Keyword)],
            )
            .await
            .context("opening the catalog collection")?;
        Ok(Arc::new(Self {
            store,
            memory,
            items: RwLock::new(HashMap::new()),
            by_ref: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            profiles: Mutex::new(HashMap::new()),
            context: Mutex::new(HashMap::new()),
        }))
    }

    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// True once a catalog has been indexed.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.items.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `GET {sandbox}/catalog` and indexes it.
    pub async fn index_from(&self, sandbox_url: &str) -> Result<IndexStats> {
        let url = format!("{}/catalog", sandbox_url.trim_end_matches('/'));
        let v: Value = reqwest::Client::new()
            .get(&url)
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("reading the catalog from {url}"))?
            .error_for_status()?
            .json()
            .await
            .with_context(|| format!("the catalog at {url} is not JSON"))?;
        let items: Vec<CatalogItem> = serde_json::from_value(v["items"].clone()).with_context(|| format!("the catalog at {url} has unexpected items"))?;
        self.index(items).await
    }

    /// Makes the store hold exactly `items`: new or changed items are
    /// embedded (in batches, on blocking threads), unchanged ones are kept,
    /// items no longer offered are removed.
    pub async fn index(&self, items: Vec<CatalogItem>) -> Result<IndexStats> {
        let t0 = std::time::Instant::now();
        let have: HashMap<u64, String> = self
            .store
            .scroll(CATALOG, Filter::default(), usize::MAX / 2)
            .await?
            .into_iter()
            .map(|h| (h.id, h.payload.get("hash").and_then(Value::as_str).unwrap_or("").to_owned()))
            .collect();
        let mut todo = Vec::new();
        let mut keep = HashSet::new();
        let mut stats = IndexStats { total: items.len(), ..IndexStats::default() };
        for it in &items {
            let id = point_id(&it.id);
            keep.insert(id);
            let h = content_hash(it);
            if have.get(&id) == Some(&h) {
                stats.unchanged += 1;
            } else {
                todo.push((it.clone(), h));
            }
        }
        for chunk in todo.chunks(256) {
            let texts: Vec<String> = chunk.iter().map(|(it, _)| it.text.clone()).collect();
            let vectors = self.memory.embed(texts).await?;
            let points = chunk.iter().zip(vectors).map(|((it, h), v)| Self::point(it, h, v)).collect::<Result<Vec<_>>>()?;
            self.store.upsert(CATALOG, points).await?;
            stats.embedded += chunk.len();
        }
        let gone: Vec<u64> = have.keys().filter(|id| !keep.contains(id)).copied().collect();
        stats.removed = gone.len();
        if !gone.is_empty() {
            self.store.delete(CATALOG, gone).await?;
        }
        if stats.embedded > 0 || stats.removed > 0 {
            self.store.optimize(CATALOG).await?;
            self.store.flush().await?;
        }
        self.load(items);
        stats.ms = t0.elapsed().as_secs_f64() * 1000.0;
        Ok(stats)
    }

    /// Indexes items whose vectors are already known (benchmarks, imports).
    pub async fn index_prepared(&self, items: Vec<(CatalogItem, Vec<f32>)>) -> Result<()> {
        for chunk in items.chunks(1024) {
            let points = chunk.iter().map(|(it, v)| Self::point(it, &content_hash(it), v.clone())).collect::<Result<Vec<_>>>()?;
            self.store.upsert(CATALOG, points).await?;
        }
        self.store.optimize(CATALOG).await?;
        self.load(items.into_iter().map(|(i, _)| i).collect());
        Ok(())
    }

    fn point(it: &CatalogItem, hash: &str, vector: Vec<f32>) -> Result<Point> {
        let Value::Object(mut payload) = serde_json::to_value(it)? else { unreachable!("a struct serialises to an object") };
        payload.insert("hash".into(), json!(hash));
        Ok(Point { id: point_id(&it.id), vector, payload })
    }

    fn load(&self, items: Vec<CatalogItem>) {
        let mut map = HashMap::with_capacity(items.len());
        let mut refs = HashMap::new();
        for it in items {
            let id = point_id(&it.id);
            if it.parent.is_none() {
                for v in it.refs.values().filter_map(Value::as_str) {
                    if it.kind == "restaurant" {
                        refs.insert(v.to_owned(), id);
                    }
                }
            }
            map.insert(id, Arc::new(it));
        }
        *self.items.write().unwrap_or_else(|p| p.into_inner()) = map;
        *self.by_ref.write().unwrap_or_else(|p| p.into_inner()) = refs;
        self.ready.store(true, Ordering::Release);
    }

    /// The tags of what an order buys (a food order's restaurant), for its memory.
    pub fn tags_for(&self, arguments: &Map<String, Value>) -> Vec<String> {
        let refs = self.by_ref.read().unwrap_or_else(|p| p.into_inner());
        let items = self.items.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = Vec::new();
        for v in arguments.values().filter_map(Value::as_str) {
            if let Some(it) = refs.get(v).and_then(|id| items.get(id)) {
                for t in &it.tags {
                    if !out.contains(t) {
                        out.push(t.clone());
                    }
                }
            }
        }
        out
    }

    /// The catalog item a ref (`restaurant_id` value) names.
    pub fn by_ref(&self, value: &str) -> Option<Arc<CatalogItem>> {
        let id = *self.by_ref.read().unwrap_or_else(|p| p.into_inner()).get(value)?;
        self.items.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    async fn profile(&self, user: &str) -> Result<(Arc<Profile>, Option<Arc<Vec<f32>>>)> {
        let version = self.memory.version(user);
        if let Some((v, p, vec)) = self.profiles.lock().unwrap_or_else(|p| p.into_inner()).get(user) {
            if *v == version {
                return Ok((p.clone(), vec.clone()));
            }
        }
        let p = Arc::new(self.memory.profile(user).await?);
        let vec = if p.query.is_empty() { None } else { self.memory.embed(vec![p.query.clone()]).await?.pop().map(Arc::new) };
        self.profiles.lock().unwrap_or_else(|p| p.into_inner()).insert(user.to_owned(), (version, p.clone(), vec.clone()));
        Ok((p, vec))
    }

    async fn context_vector(&self, words: String) -> Result<Arc<Vec<f32>>> {
        if let Some(v) = self.context.lock().unwrap_or_else(|p| p.into_inner()).get(&words) {
            return Ok(v.clone());
        }
        let v = Arc::new(self.memory.embed(vec![words.clone()]).await?.pop().context("the embedder returned nothing")?);
        self.context.lock().unwrap_or_else(|p| p.into_inner()).insert(words, v.clone());
        Ok(v)
    }

    /// The ranked feed for a user.
    pub async fn feed(&self, user: &str, q: &FeedQuery) -> Result<Vec<FeedItem>> {
        super::check_user(user)?;
        anyhow::ensure!(self.ready(), "the catalog is still being indexed");
        let (profile, pvec) = self.profile(user).await?;
        let city = match (q.lat, q.lon) {
            (Some(lat), Some(lon)) => Some(cities::nearest_city(lat, lon)),
            _ => None,
        };
        let minute = q.minute.unwrap_or_else(|| {
            let now = self.memory.clock().now_ms();
            cities::local_minute(now, city.unwrap_or_else(|| cities::city_by_id("shanghai").expect("a known city")))
        });
        let meal = meal_at(minute);
        let kinds: Vec<String> = if q.kinds.is_empty() { ["restaurant", "show", "concert", "movie"].map(String::from).to_vec() } else { q.kinds.clone() };
        let mut filter = Filter::default().and(Cond::AnyOf("kind".into(), kinds.clone()));
        if let Some(c) = city {
            filter = filter.and(Cond::Eq("city".into(), json!(c.id)));
        }
        if !profile.dislikes.is_empty() {
            filter = filter.not(Cond::AnyOf("tags".into(), profile.dislikes.clone()));
        }
        let vector = match &pvec {
            Some(v) => v.clone(),
            None => self.context_vector(format!("{meal} {}", kinds.join(" "))).await?,
        };
        let mut hits = self.store.search_ids(CATALOG, vector.as_ref().clone(), filter.clone(), CANDIDATES).await?;
        // Items with a tag the person likes or orders are always candidates.
        let mut wanted: Vec<String> = profile.likes.keys().chain(profile.ordered_tags.keys()).chain(profile.diet.iter()).cloned().collect();
        wanted.sort();
        wanted.dedup();
        // …unless the nearest already hold enough of them (the second search
        // is half the cost of a feed at 100k items).
        let enough = {
            let items = self.items.read().unwrap_or_else(|p| p.into_inner());
            hits.iter().filter(|h| items.get(&h.0).is_some_and(|it| it.tags.iter().any(|t| wanted.contains(t)))).count() >= 2 * q.limit.max(1)
        };
        if !wanted.is_empty() && !enough {
            let more = self.store.search_ids(CATALOG, vector.as_ref().clone(), filter.and(Cond::AnyOf("tags".into(), wanted)), CANDIDATES / 2).await?;
            let seen: HashSet<u64> = hits.iter().map(|h| h.0).collect();
            hits.extend(more.into_iter().filter(|h| !seen.contains(&h.0)));
        }
        let items: HashMap<u64, Arc<CatalogItem>> = {
            let all = self.items.read().unwrap_or_else(|p| p.into_inner());
            hits.iter().filter_map(|h| Some((h.0, all.get(&h.0)?.clone()))).collect()
        };
        let mut scored: Vec<(f32, Arc<CatalogItem>, Option<f64>, &'static str, String)> = Vec::new();
        for &(id, sim) in &hits {
            let Some(it) = items.get(&id) else { continue };
            if let Some(s) = score(&profile, it, sim, q, meal) {
                let (code, reason) = reason(&profile, it, meal, s.1, q.lang);
                scored.push((s.0, it.clone(), s.1, code, reason));
            }
        }
        // Diversity: greedy picks; a pick makes later ones with its first tag or restaurant cost more.
        let mut out = Vec::new();
        let mut first_tags: HashMap<String, usize> = HashMap::new();
        let mut parents: HashSet<String> = HashSet::new();
        while out.len() < q.limit.max(1) && !scored.is_empty() {
            let adjusted = |(s, it, ..): &(f32, Arc<CatalogItem>, Option<f64>, &str, String)| {
                let t = it.tags.first().map(|t| *first_tags.get(t).unwrap_or(&0)).unwrap_or(0) as f32;
                let p = it.parent.as_ref().unwrap_or(&it.id);
                s - 0.12 * t - if parents.contains(p) { 0.3 } else { 0.0 }
            };
            let (i, best) = scored
                .iter()
                .enumerate()
                .map(|(i, c)| (i, adjusted(c)))
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
                .expect("not empty");
            let (_, it, dist, code, reason) = scored.swap_remove(i);
            if let Some(t) = it.tags.first() {
                *first_tags.entry(t.clone()).or_insert(0) += 1;
            }
            parents.insert(it.parent.clone().unwrap_or_else(|| it.id.clone()));
            out.push(FeedItem {
                id: it.id.clone(),
                app: it.app.clone(),
                kind: it.kind.clone(),
                name: it.name.get(q.lang.code()).to_owned(),
                score: (best * 1000.0).round() / 1000.0,
                reason,
                reason_code: code.into(),
                tags: it.tags.clone(),
                distance_km: dist.map(|d| (d * 10.0).round() / 10.0),
                price: it.price,
                currency: it.currency.clone(),
                rating: it.rating,
                city: it.city.clone(),
                refs: it.refs.clone(),
            });
        }
        Ok(out)
    }
}

/// The part of the day at a local minute.
pub fn meal_at(minute: u32) -> &'static str {
    match minute {
        300..=629 => "breakfast",
        630..=839 => "lunch",
        840..=1019 => "afternoon",
        1020..=1289 => "dinner",
        _ => "late",
    }
}

const FOOD: [&str; 2] = ["restaurant", "dish"];

/// `(score, distance)`, or `None` when the item must not be shown.
fn score(p: &Profile, it: &CatalogItem, sim: f32, q: &FeedQuery, meal: &str) -> Option<(f32, Option<f64>)> {
    if it.tags.iter().any(|t| p.dislikes.contains(t)) {
        return None;
    }
    if FOOD.contains(&it.kind.as_str()) && p.diet.iter().any(|d| !it.tags.contains(d)) {
        return None;
    }
    let mut s = 0.4 * sim;
    let orders = p.orders.max(1) as f32;
    let mut affinity = 0.0;
    for t in &it.tags {
        affinity += 0.25 * p.likes.get(t).copied().unwrap_or(0.0).min(2.0);
        affinity += 0.5 * *p.ordered_tags.get(t).unwrap_or(&0) as f32 / orders;
    }
    if it.refs.values().filter_map(Value::as_str).any(|v| p.ordered_refs.contains_key(v)) {
        affinity += 0.1;
    }
    s += affinity.min(0.8);
    if !it.meals.is_empty() {
        s += if it.meals.iter().any(|m| m == meal) { 0.1 } else { -0.5 };
    }
    if let Some(r) = it.rating {
        s += 0.05 * (r as f32 - 4.0);
    }
    let dist = match (q.lat, q.lon) {
        (Some(lat), Some(lon)) => Some(cities::distance_km((lat, lon), (it.lat, it.lon))),
        _ => None,
    };
    if let Some(d) = dist {
        s -= (0.04 * (d - 1.0).max(0.0)).min(0.4) as f32;
    }
    Some((s, dist))
}

/// A tag as people say it, in `lang`.
pub fn tag_words(tag: &str, lang: Lang) -> String {
    if let Some(n) = crate::sandbox::food::cuisine_name(tag, lang.code()) {
        return n.to_owned();
    }
    let (en, zh, ko) = match tag {
        "vegetarian" => ("vegetarian", "素食", "채식"),
        "spicy" => ("spicy", "辣味", "매운"),
        "seafood" => ("seafood", "海鲜", "해산물"),
        "dessert" => ("dessert", "甜品", "디저트"),
        "noodles" => ("noodle", "面食", "면"),
        "show" => ("show", "演出", "공연"),
        "concert" => ("concert", "音乐会", "콘서트"),
        "movie" => ("movie", "电影", "영화"),
        other => (other, other, other),
    };
    match lang {
        Lang::En => en,
        Lang::Zh => zh,
        Lang::Ko => ko,
    }
    .to_owned()
}

fn meal_words(meal: &str, lang: Lang) -> &'static str {
    match (meal, lang) {
        ("breakfast", Lang::En) => "breakfast",
        ("lunch", Lang::En) => "lunch",
        ("afternoon", Lang::En) => "the afternoon",
        ("dinner", Lang::En) => "dinner",
        (_, Lang::En) => "late night",
        ("breakfast", Lang::Zh) => "早餐",
        ("lunch", Lang::Zh) => "午餐",
        ("afternoon", Lang::Zh) => "下午",
        ("dinner", Lang::Zh) => "晚餐",
        (_, Lang::Zh) => "夜宵",
        ("breakfast", Lang::Ko) => "아침",
        ("lunch", Lang::Ko) => "점심",
        ("afternoon", Lang::Ko) => "오후",
        ("dinner", Lang::Ko) => "저녁",
        (_, Lang::Ko) => "야식",
    }
}

/// The strongest reason an item is shown, as a code and a sentence.
fn reason(p: &Profile, it: &CatalogItem, meal: &str, dist: Option<f64>, lang: Lang) -> (&'static str, String) {
    // The most ordered tag; on a tie the earlier one (an item's cuisine comes first).
    let often = it.tags.iter().filter(|t| p.ordered_tags.get(*t).copied().unwrap_or(0) >= 2).fold(None::<&String>, |best, t| match best {
        Some(b) if p.ordered_tags[b] >= p.ordered_tags[t] => Some(b),
        _ => Some(t),
    });
    if let Some(t) = often {
        let w = tag_words(t, lang);
        return ("often_ordered", match lang {
            Lang::En => format!("because you often order {w} food"),
            Lang::Zh => format!("因为你常点{w}"),
            Lang::Ko => format!("{w} 음식을 자주 주문하셔서"),
        });
    }
    if it.refs.values().filter_map(Value::as_str).any(|v| p.ordered_refs.contains_key(v)) {
        return ("ordered_here", match lang {
            Lang::En => "you ordered from here before".into(),
            Lang::Zh => "你以前在这里点过".into(),
            Lang::Ko => "전에 여기서 주문하셨어요".into(),
        });
    }
    if let Some(t) = it.tags.iter().find(|t| p.likes.contains_key(*t)) {
        let w = tag_words(t, lang);
        return ("said_like", match lang {
            Lang::En => format!("because you said you like {w}"),
            Lang::Zh => format!("因为你说过喜欢{w}"),
            Lang::Ko => format!("{w}을(를) 좋아한다고 하셔서"),
        });
    }
    if let Some(t) = p.diet.iter().find(|d| it.tags.contains(d)) {
        let w = tag_words(t, lang);
        return ("diet", match lang {
            Lang::En => format!("{w}, as you asked"),
            Lang::Zh => format!("{w}，符合你的饮食要求"),
            Lang::Ko => format!("말씀하신 대로 {w}"),
        });
    }
    if it.meals.iter().any(|m| m == meal) {
        let m = meal_words(meal, lang);
        return ("open_nearby", match (lang, dist) {
            (Lang::En, Some(d)) => format!("open for {m}, {d:.1} km away"),
            (Lang::En, None) => format!("open for {m}"),
            (Lang::Zh, Some(d)) => format!("{m}营业中，距离{d:.1}公里"),
            (Lang::Zh, None) => format!("{m}营业中"),
            (Lang::Ko, Some(d)) => format!("{m} 영업 중, {d:.1}km 거리"),
            (Lang::Ko, None) => format!("{m} 영업 중"),
        });
    }
    let r = it.rating.unwrap_or(0.0);
    ("top_rated", match lang {
        Lang::En if r > 0.0 => format!("rated {r:.1}"),
        Lang::Zh if r > 0.0 => format!("评分{r:.1}"),
        Lang::Ko if r > 0.0 => format!("평점 {r:.1}"),
        Lang::En => "popular in the city".into(),
        Lang::Zh => "本地热门".into(),
        Lang::Ko => "이 도시에서 인기".into(),
    })
}

/// Parses the feed's `time`: `HH:MM` (local), or Unix seconds or
/// milliseconds (turned into local time at the nearest city).
pub fn parse_time(s: &str, lat: Option<f64>, lon: Option<f64>) -> Result<u32, String> {
    if let Some((h, m)) = s.split_once(':') {
        let (h, m): (u32, u32) = (h.trim().parse().map_err(|_| format!("bad hour in time {s:?}"))?, m.trim().parse().map_err(|_| format!("bad minute in time {s:?}"))?);
        if h > 23 || m > 59 {
            return Err(format!("time {s:?} is not a time of day (00:00 to 23:59)"));
        }
        return Ok(h * 60 + m);
    }
    let n: i64 = s.trim().parse().map_err(|_| format!("time {s:?} is neither HH:MM nor a Unix timestamp"))?;
    let ms = if n > 100_000_000_000 { n } else { n * 1000 };
    let city = match (lat, lon) {
        (Some(a), Some(b)) => cities::nearest_city(a, b),
        _ => cities::city_by_id("shanghai").expect("a known city"),
    };
    Ok(cities::local_minute(ms, city))
}

/// What a person's memory says, in a line for the model's prompt.
pub fn memory_line(items: &[(super::MemoryItem, f32)]) -> Option<String> {
    let parts: Vec<String> = items
        .iter()
        .map(|(m, _)| match m.kind {
            Kind::Order => format!("ordered before: {}", m.text),
            _ => m.text.clone(),
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("19:30", None, None), Ok(1170));
        assert!(parse_time("25:00", None, None).is_err());
        assert!(parse_time("dinner", None, None).is_err());
        // 2026-11-22 11:00 UTC is 19:00 in Shanghai and 20:00 in Seoul.
        let t = "1795345200";
        assert_eq!(parse_time(t, None, None), Ok(19 * 60));
        assert_eq!(parse_time(t, Some(37.56), Some(126.97)), Ok(20 * 60));
        assert_eq!(meal_at(1170), "dinner");
        assert_eq!(meal_at(720), "lunch");
    }

    #[test]
    fn keys_stay_stable() {
        assert_eq!(point_id("food:restaurant:sh01"), point_id("food:restaurant:sh01"));
        assert_ne!(point_id("food:restaurant:sh01"), point_id("food:restaurant:sh02"));
        assert!(point_id("x") < 1 << 53);
        assert!(crate::memory::keys::tags("").is_empty());
    }
}
