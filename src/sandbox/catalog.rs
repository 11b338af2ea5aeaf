//! What the sandbox mini-programs offer, as flat items for the
//! recommendation feed: restaurants and their dishes (food), titles playing
//! at each venue (tickets), and the places a ride can go (ride).
//!
//! The catalogs are built from the seed, so the same seed always gives the
//! same items. `GET /catalog` on the sandbox serves them, so a server reads
//! a remote sandbox the same way as its own.

use crate::world::cities::{Names, CITIES};
use super::Service;
use serde::{Deserialize, Serialize};

/// One thing the feed can recommend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogItem {
    /// `food:restaurant:sh01`, `food:dish:sh01-mapo-tofu`, `tickets:show:sh-grand-theatre:swan-lake`, `ride:place:sh-pvg`
    pub id: String,
    /// The mini-program that sells it.
    pub app: String,
    /// restaurant | dish | show | concert | movie | destination
    pub kind: String,
    pub name: Names3,
    /// English text to embed: name, kind, cuisine, tags, description.
    pub text: String,
    /// Language-neutral tags: cuisine ids, `vegetarian`, `spicy`, `airport`, …
    pub tags: Vec<String>,
    pub city: String,
    pub lat: f64,
    pub lon: f64,
    /// In the smallest unit of `currency`, when it has one price.
    pub price: Option<i64>,
    pub currency: String,
    pub rating: Option<f64>,
    /// Parts of the day it suits: breakfast | lunch | afternoon | dinner | late
    pub meals: Vec<String>,
    /// The item it belongs to (a dish's restaurant).
    pub parent: Option<String>,
    /// What to tell the app to find it again (`restaurant_id`, …).
    pub refs: serde_json::Map<String, serde_json::Value>,
}

/// Names in the three languages, owned (items also come from JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Names3 {
    pub en: String,
    pub zh: String,
    pub ko: String,
}

impl From<Names> for Names3 {
    fn from(n: Names) -> Self {
        Self { en: n.en.into(), zh: n.zh.into(), ko: n.ko.into() }
    }
}

impl Names3 {
    pub fn get(&self, lang: &str) -> &str {
        match lang {
            "zh" => &self.zh,
            "ko" => &self.ko,
            _ => &self.en,
        }
    }
}

/// The parts of the day a business open from `open` to `close` (minutes
/// after midnight; `close` may pass 1440) serves.
pub fn meals_open(open: u32, close: u32) -> Vec<String> {
    const PARTS: [(&str, u32, u32); 5] = [("breakfast", 420, 600), ("lunch", 660, 840), ("afternoon", 840, 1020), ("dinner", 1020, 1260), ("late", 1320, 1560)];
    PARTS
        .iter()
        .filter(|(_, a, b)| open < *b && close > *a)
        .map(|(n, _, _)| (*n).to_owned())
        .collect()
}

/// Every item of the services given, for `seed`.
pub fn items(seed: u64, services: &[Service]) -> Vec<CatalogItem> {
    let mut out = Vec::new();
    if services.contains(&Service::Food) {
        out.extend(super::food::catalog_items(seed));
    }
    if services.contains(&Service::Tickets) {
        out.extend(super::tickets::catalog_items());
    }
    if services.contains(&Service::Ride) {
        out.extend(destinations());
    }
    out
}

fn destinations() -> Vec<CatalogItem> {
    let mut out = Vec::new();
    for c in CITIES {
        for p in c.places {
            let en = p.name.en.to_lowercase();
            let mut tags = Vec::new();
            for (word, tag) in [("airport", "airport"), ("station", "station"), ("railway", "station"), ("square", "landmark"), ("tower", "landmark"), ("lake", "landmark"), ("park", "landmark")] {
                if en.contains(word) && !tags.iter().any(|t| t == tag) {
                    tags.push(tag.to_owned());
                }
            }
            let mut refs = serde_json::Map::new();
            refs.insert("to".into(), p.name.en.into());
            out.push(CatalogItem {
                id: format!("ride:place:{}", p.id),
                app: "ride".into(),
                kind: "destination".into(),
                name: p.name.into(),
                text: format!("ride to {} in {} {}", p.name.en, c.name.en, tags.join(" ")),
                tags,
                city: c.id.into(),
                lat: p.lat,
                lon: p.lon,
                price: None,
                currency: c.currency.into(),
                rating: None,
                meals: Vec::new(),
                parent: None,
                refs,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meals_follow_opening_hours() {
        assert_eq!(meals_open(0, 1440), ["breakfast", "lunch", "afternoon", "dinner", "late"]);
        assert_eq!(meals_open(1020, 1560), ["dinner", "late"]);
        assert_eq!(meals_open(600, 1320), ["lunch", "afternoon", "dinner"]);
    }

    #[test]
    fn items_are_stable_unique_and_complete() {
        let a = items(42, &Service::ALL);
        let b = items(42, &Service::ALL);
        assert_eq!(a, b, "same seed, same catalog");
        let mut ids: Vec<&str> = a.iter().map(|i| i.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), a.len(), "ids are unique");
        for kind in ["restaurant", "dish", "show", "concert", "movie", "destination"] {
            assert!(a.iter().any(|i| i.kind == kind), "no {kind} items");
        }
        let veg = a.iter().filter(|i| i.kind == "restaurant" && i.tags.iter().any(|t| t == "vegetarian")).count();
        assert!(veg >= 3, "vegetarian restaurants are tagged ({veg})");
        // A dish points at a restaurant that exists and tells the app which one.
        let d = a.iter().find(|i| i.kind == "dish").unwrap();
        let parent = d.parent.as_deref().unwrap();
        assert!(a.iter().any(|i| i.id == parent));
        assert!(d.refs["restaurant_id"].is_string());
        assert_ne!(items(7, &Service::ALL), a, "another seed, another catalog");
    }
}
