//! The tickets mini-program: high-speed trains between the sandbox cities,
//! and shows, movies and concerts, booked through search → hold → order →
//! pay → cancel/refund.
//!
//! The catalog (timetables, venues, schedules, prices and how full each
//! train or performance already is) is derived from the sandbox seed on the
//! fly: the same seed always offers the same trains and shows, and nothing
//! about it has to be stored. What people do is stored: holds (seats kept
//! for 15 minutes), orders, and the seats assigned once an order is paid.
//! Seats left = seeded capacity − seeded earlier sales − live holds and
//! orders, so availability moves when someone books. Statuses that change
//! with time (a hold or an unpaid order expiring) are worked out from
//! timestamps against the clock when read.
//!
//! | endpoint | does |
//! |---|---|
//! | `GET /v1/trains?from&to&date[&earliest&latest&seat_class&limit]` | trains on a date |
//! | `GET /v1/shows?city[&date&kind&q&limit]` | performances over the next 30 days |
//! | `POST /v1/holds` | keep seats for 15 minutes |
//! | `POST /v1/orders` (`/quote`) | order (and hold) seats, opening the payment |
//! | `GET /v1/orders/{id}` | the order with its current payment |
//! | `POST /v1/orders/{id}/cancel` (`/quote`) | cancel, refunding by the time left |

use crate::world::money::display as fmt_money;
use crate::world::cities::{self, City, Names};
use crate::world::calendar::{civil_from_days, date_text as fmt_date, parse_date as parse_ymd, DateError};
use super::core::{json_or_empty, new_id, seeded_rng, ApiError, ApiResult, Db};
use crate::world::Clock;
use super::merchant::{Merchant, Payment};
use super::terms::{check_terms, confirmed_terms};
use super::ServiceCtx;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

const DAY_MS: i64 = 86_400_000;
const MIN_MS: i64 = 60_000;
const HOLD_MINUTES: i64 = 15;
const SHOW_WINDOW_DAYS: i64 = 30;
const MAX_DAYS_AHEAD: i64 = 365;
const MAX_QUANTITY: i64 = 9;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS holds (
    hold_id TEXT PRIMARY KEY,
    item_id TEXT NOT NULL,
    class TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    passengers TEXT NOT NULL,       -- JSON array of names
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    order_id TEXT                   -- set once an order was made from it
);
CREATE INDEX IF NOT EXISTS holds_item ON holds (item_id, class);
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    hold_id TEXT NOT NULL UNIQUE,
    item_id TEXT NOT NULL,
    class TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    summary TEXT NOT NULL,
    item TEXT NOT NULL,             -- JSON: what was booked, for display
    starts_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,    -- pay before this or the seats go back
    state TEXT NOT NULL,            -- open | confirmed | expired | cancelled | refunded
    tickets TEXT,                   -- JSON, once confirmed
    fee INTEGER,
    refund INTEGER,
    closed_ms INTEGER,
    note TEXT
);
CREATE TABLE IF NOT EXISTS seat_counters (
    item_id TEXT NOT NULL,
    class TEXT NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (item_id, class)
);";

// ---------------------------------------------------------------- calendar

fn parse_date(s: &str) -> ApiResult<i64> {
    parse_ymd(s).map_err(|e| match e {
        DateError::Malformed => ApiError::bad_request(format!("date '{s}' is not a date; write it as YYYY-MM-DD, e.g. 2026-11-23")),
        DateError::NoSuchDay => ApiError::bad_request(format!("date '{s}' does not exist; check the day of the month")),
    })
}

fn fmt_hhmm(minute: i64) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

fn fmt_dt(ms: i64) -> String {
    let day = ms.div_euclid(DAY_MS);
    format!("{}T{}", fmt_date(day), fmt_hhmm(ms.rem_euclid(DAY_MS) / MIN_MS))
}

fn parse_hhmm(field: &str, s: &str) -> ApiResult<i64> {
    let bad = || ApiError::bad_request(format!("{field} '{s}' is not a time; write it as HH:MM, e.g. 08:30"));
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let h: i64 = h.parse().map_err(|_| bad())?;
    let m: i64 = m.parse().map_err(|_| bad())?;
    if !(0..=23).contains(&h) || !(0..=59).contains(&m) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn fmt_duration(min: i64) -> String {
    match (min / 60, min % 60) {
        (0, m) => format!("{m}m"),
        (h, m) => format!("{h}h{m:02}m"),
    }
}

fn round_to(x: f64, unit: i64) -> i64 {
    ((x / unit as f64).round() as i64).max(1) * unit
}

// ---------------------------------------------------------------- catalog: trains

/// Owned names in the three languages (for names built at run time).
#[derive(Debug, Clone, Serialize)]
struct Text {
    en: String,
    zh: String,
    ko: String,
}

impl From<Names> for Text {
    fn from(n: Names) -> Self {
        Text {
            en: n.en.into(),
            zh: n.zh.into(),
            ko: n.ko.into(),
        }
    }
}

const fn names(en: &'static str, zh: &'static str, ko: &'static str) -> Names {
    Names { en, zh, ko }
}

/// How seat numbers are laid out, for assigning them once paid.
#[derive(Clone, Copy)]
enum Layout {
    Train {
        first_car: i64,
        per_car: i64,
        letters: &'static str,
    },
    Hall,
}

struct ClassDef {
    id: &'static str,
    name: Names,
    /// Price relative to the cheapest class.
    factor: f64,
    capacity: (i64, i64),
    layout: Layout,
}

static CN_CLASSES: [ClassDef; 3] = [
    ClassDef {
        id: "second",
        name: names("Second class", "二等座", "2등석"),
        factor: 1.0,
        capacity: (420, 560),
        layout: Layout::Train { first_car: 4, per_car: 90, letters: "ABCDF" },
    },
    ClassDef {
        id: "first",
        name: names("First class", "一等座", "1등석"),
        factor: 1.6,
        capacity: (48, 96),
        layout: Layout::Train { first_car: 2, per_car: 56, letters: "ACDF" },
    },
    ClassDef {
        id: "business",
        name: names("Business class", "商务座", "비즈니스석"),
        factor: 3.15,
        capacity: (5, 24),
        layout: Layout::Train { first_car: 1, per_car: 24, letters: "ACF" },
    },
];

static KR_CLASSES: [ClassDef; 2] = [
    ClassDef {
        id: "standard",
        name: names("Standard", "普通座", "일반실"),
        factor: 1.0,
        capacity: (300, 380),
        layout: Layout::Train { first_car: 5, per_car: 60, letters: "ABCD" },
    },
    ClassDef {
        id: "first",
        name: names("First class", "特等座", "특실"),
        factor: 1.4,
        capacity: (30, 60),
        layout: Layout::Train { first_car: 3, per_car: 33, letters: "ABC" },
    },
];

fn class_defs(country: &str) -> &'static [ClassDef] {
    if country == "KR" {
        &KR_CLASSES
    } else {
        &CN_CLASSES
    }
}

/// The city's railway station from cities.rs, or "<City> Station".
fn station(city: &'static City) -> (Text, (f64, f64)) {
    city.places
        .iter()
        .find(|p| p.id.ends_with("station") || p.name.en.ends_with("Railway Station"))
        .map(|p| (Text::from(p.name), (p.lat, p.lon)))
        .unwrap_or_else(|| {
            (
                Text {
                    en: format!("{} Station", city.name.en),
                    zh: format!("{}站", city.name.zh),
                    ko: format!("{}역", city.name.ko),
                },
                (city.lat, city.lon),
            )
        })
}

fn short_station(en: &str) -> &str {
    en.strip_suffix(" Railway Station").unwrap_or(en)
}

struct Train {
    /// As printed: "G7311", "KTX 101".
    no: String,
    /// As used in ids: "G7311", "KTX101".
    key: String,
    from: &'static City,
    to: &'static City,
    from_station: Text,
    to_station: Text,
    depart_min: i64,
    duration_min: i64,
    /// Per class of `class_defs(from.country)`.
    prices: Vec<i64>,
    capacities: Vec<i64>,
}

struct Trains {
    list: Vec<Train>,
    by_key: HashMap<String, usize>,
}

impl Trains {
    /// Every route's daily timetable, from the seed alone.
    fn build(seed: u64) -> Self {
        let cn: Vec<&'static City> = cities::CITIES.iter().filter(|c| c.country == "CN").collect();
        let mut routes = Vec::new();
        for a in &cn {
            for b in &cn {
                if a.id != b.id {
                    routes.push((*a, *b));
                }
            }
        }
        if let (Some(s), Some(b)) = (cities::city_by_id("seoul"), cities::city_by_id("busan")) {
            routes.push((s, b));
            routes.push((b, s));
        }
        let mut taken = HashSet::new();
        let mut list = Vec::new();
        for (a, b) in routes {
            let korea = a.country == "KR";
            let mut rng = seeded_rng(seed, &format!("trains:{}:{}", a.id, b.id));
            let (sa, pa) = station(a);
            let (sb, pb) = station(b);
            let km = cities::distance_km(pa, pb) * 1.25;
            // Average speed including stops, and fare per km in minor units.
            let (speed, per_km, unit) = if korea { (180.0, 150.0, 100) } else { (300.0, 40.0, 50) };
            let base = 15.0 + km / speed * 60.0;
            let longest = (base * 1.2).ceil() as i64;
            let latest = (23 * 60 + 30 - longest).clamp(6 * 60 + 30, 21 * 60);
            let slots = (latest - 6 * 60) / 5 + 1;
            let count = rng.random_range(6..=10).min(slots);
            let mut times = BTreeSet::new();
            while (times.len() as i64) < count {
                times.insert(6 * 60 + 5 * rng.random_range(0..slots));
            }
            let defs = class_defs(a.country);
            let base_price = km * per_km;
            for (i, depart_min) in times.into_iter().enumerate() {
                let duration_min = ((base * rng.random_range(1.0..1.2)) / 5.0).round() as i64 * 5;
                let (no, key) = if korea {
                    let n = if a.id == "seoul" { 101 + 2 * i } else { 102 + 2 * i };
                    (format!("KTX {n}"), format!("KTX{n}"))
                } else {
                    loop {
                        let k = format!("G{}", rng.random_range(100..10_000));
                        if taken.insert(k.clone()) {
                            break (k.clone(), k);
                        }
                    }
                };
                let prices = defs.iter().map(|c| round_to(base_price * c.factor, unit)).collect();
                let capacities = defs
                    .iter()
                    .map(|c| rng.random_range(c.capacity.0..=c.capacity.1))
                    .collect();
                list.push(Train {
                    no,
                    key,
                    from: a,
                    to: b,
                    from_station: sa.clone(),
                    to_station: sb.clone(),
                    depart_min,
                    duration_min,
                    prices,
                    capacities,
                });
            }
        }
        let by_key = list.iter().enumerate().map(|(i, t)| (t.key.clone(), i)).collect();
        Trains { list, by_key }
    }

    fn route(&self, from: &City, to: &City) -> impl Iterator<Item = &Train> {
        let (f, t) = (from.id, to.id);
        self.list.iter().filter(move |x| x.from.id == f && x.to.id == t)
    }
}

/// Seats a train or performance had already sold before the sandbox
/// started: seeded per item and class, sometimes all of them.
fn presold(seed: u64, item_id: &str, class: &str, capacity: i64) -> i64 {
    let mut r = seeded_rng(seed, &format!("sold:{item_id}:{class}"));
    let roll: f64 = r.random();
    let load = if roll < 0.1 {
        1.0
    } else if roll < 0.25 {
        r.random_range(0.9..1.0)
    } else {
        r.random_range(0.1..0.85)
    };
    ((capacity as f64 * load).floor() as i64).min(capacity)
}

// ---------------------------------------------------------------- catalog: shows

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Show,
    Movie,
    Concert,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Show => "show",
            Kind::Movie => "movie",
            Kind::Concert => "concert",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        let f = cities::fold(s);
        let f = f.strip_suffix('s').filter(|x| x.len() > 3).unwrap_or(&f);
        match f {
            "show" | "theatre" | "theater" | "musical" | "opera" | "ballet" | "play" | "演出" | "话剧" | "戏剧" | "歌剧"
            | "芭蕾" | "京剧" | "공연" | "뮤지컬" | "연극" | "오페라" | "발레" => Some(Kind::Show),
            "movie" | "film" | "cinema" | "电影" | "영화" => Some(Kind::Movie),
            "concert" | "music" | "gig" | "音乐会" | "演唱会" | "콘서트" | "음악회" => Some(Kind::Concert),
            _ => None,
        }
    }

    /// Words a title search also matches for this kind.
    fn keywords(self) -> &'static str {
        match self {
            Kind::Show => "show theatre theater musical opera ballet play drama 演出 话剧 戏剧 歌剧 芭蕾 공연 연극 오페라 발레",
            Kind::Movie => "movie film cinema 电影 影院 영화",
            Kind::Concert => "concert music live 音乐会 演唱会 콘서트 음악회",
        }
    }

    fn sections(self) -> &'static [SectionDef] {
        match self {
            Kind::Show => &SHOW_SECTIONS,
            Kind::Movie => &MOVIE_SECTIONS,
            Kind::Concert => &CONCERT_SECTIONS,
        }
    }

    fn titles(self) -> &'static [Names] {
        match self {
            Kind::Show => SHOW_TITLES,
            Kind::Movie => MOVIE_TITLES,
            Kind::Concert => CONCERT_TITLES,
        }
    }
}

struct SectionDef {
    id: &'static str,
    name: Names,
    /// Base price in yuan.
    yuan: f64,
    capacity: (i64, i64),
}

static SHOW_SECTIONS: [SectionDef; 3] = [
    SectionDef { id: "stalls", name: names("Stalls", "池座", "1층석"), yuan: 680.0, capacity: (500, 700) },
    SectionDef { id: "circle", name: names("Circle", "二楼", "2층석"), yuan: 380.0, capacity: (250, 350) },
    SectionDef { id: "balcony", name: names("Balcony", "三楼", "3층석"), yuan: 180.0, capacity: (150, 250) },
];

static CONCERT_SECTIONS: [SectionDef; 3] = [
    SectionDef { id: "vip", name: names("VIP", "VIP席", "VIP석"), yuan: 1280.0, capacity: (60, 120) },
    SectionDef { id: "floor", name: names("Floor", "内场", "플로어석"), yuan: 680.0, capacity: (400, 700) },
    SectionDef { id: "stand", name: names("Stand", "看台", "스탠드석"), yuan: 280.0, capacity: (600, 1200) },
];

static MOVIE_SECTIONS: [SectionDef; 2] = [
    SectionDef { id: "standard", name: names("Standard", "普通座", "일반석"), yuan: 55.0, capacity: (120, 220) },
    SectionDef { id: "premium", name: names("Premium", "VIP座", "프리미엄석"), yuan: 95.0, capacity: (20, 40) },
];

static SHOW_TITLES: &[Names] = &[
    names("Swan Lake", "天鹅湖", "백조의 호수"),
    names("The Nutcracker", "胡桃夹子", "호두까기 인형"),
    names("Carmen", "卡门", "카르멘"),
    names("La Traviata", "茶花女", "라 트라비아타"),
    names("Farewell My Concubine (Peking Opera)", "京剧《霸王别姬》", "경극 패왕별희"),
    names("The Butterfly Lovers", "梁祝", "양축"),
    names("Romeo and Juliet", "罗密欧与朱丽叶", "로미오와 줄리엣"),
    names("Teahouse", "话剧《茶馆》", "연극 찻집"),
    names("Hamlet", "哈姆雷特", "햄릿"),
];

static MOVIE_TITLES: &[Names] = &[
    names("The Last Lighthouse", "最后的灯塔", "마지막 등대"),
    names("Neon Harbor", "霓虹港湾", "네온 항구"),
    names("Paper Moon Detective", "纸月亮侦探", "종이달 탐정"),
    names("Midnight Noodle Shop", "深夜面馆", "심야 국숫집"),
    names("Cloud Kingdom", "云端王国", "구름 왕국"),
    names("Rocket Grandma", "火箭奶奶", "로켓 할머니"),
    names("The Quiet Tide", "静潮", "고요한 물결"),
];

static CONCERT_TITLES: &[Names] = &[
    names("Beethoven Symphony No. 9", "贝多芬第九交响曲", "베토벤 교향곡 9번"),
    names("Chopin Piano Recital", "肖邦钢琴独奏会", "쇼팽 피아노 리사이틀"),
    names("Jazz Night", "爵士之夜", "재즈 나이트"),
    names("Film Music Gala", "电影音乐盛典", "영화음악 갈라"),
    names("City Pop Live", "城市流行乐现场", "시티팝 라이브"),
    names("Erhu and Pipa Evening", "二胡琵琶之夜", "얼후와 비파의 밤"),
    names("K-Pop Live", "韩流演唱会", "K-POP 라이브"),
];

struct Venue {
    id: &'static str,
    city: &'static str,
    kind: Kind,
    name: Names,
}

const fn venue(id: &'static str, city: &'static str, kind: Kind, name: Names) -> Venue {
    Venue { id, city, kind, name }
}

static VENUES: &[Venue] = &[
    venue("bj-ncpa", "beijing", Kind::Show, names("National Centre for the Performing Arts", "国家大剧院", "중국국가대극원")),
    venue("bj-concert-hall", "beijing", Kind::Concert, names("Beijing Concert Hall", "北京音乐厅", "베이징 음악청")),
    venue("bj-sanlitun-cinema", "beijing", Kind::Movie, names("Sanlitun Cinema", "三里屯影城", "싼리툰 영화관")),
    venue("sh-grand-theatre", "shanghai", Kind::Show, names("Shanghai Grand Theatre", "上海大剧院", "상하이 대극원")),
    venue("sh-symphony-hall", "shanghai", Kind::Concert, names("Shanghai Symphony Hall", "上海交响音乐厅", "상하이 심포니홀")),
    venue("sh-jingan-cinema", "shanghai", Kind::Movie, names("Jing'an Cinema", "静安影城", "징안 영화관")),
    venue("hz-grand-theatre", "hangzhou", Kind::Show, names("Hangzhou Grand Theatre", "杭州大剧院", "항저우 대극원")),
    venue("hz-concert-hall", "hangzhou", Kind::Concert, names("West Lake Concert Hall", "西湖音乐厅", "시후 음악청")),
    venue("hz-wulin-cinema", "hangzhou", Kind::Movie, names("Wulin Cinema", "武林影城", "우린 영화관")),
    venue("sz-grand-theatre", "shenzhen", Kind::Show, names("Shenzhen Grand Theatre", "深圳大剧院", "선전 대극원")),
    venue("sz-concert-hall", "shenzhen", Kind::Concert, names("Shenzhen Concert Hall", "深圳音乐厅", "선전 음악청")),
    venue("sz-futian-cinema", "shenzhen", Kind::Movie, names("Futian Cinema", "福田影城", "푸톈 영화관")),
    venue("gz-opera-house", "guangzhou", Kind::Show, names("Guangzhou Opera House", "广州大剧院", "광저우 오페라하우스")),
    venue("gz-xinghai", "guangzhou", Kind::Concert, names("Xinghai Concert Hall", "星海音乐厅", "싱하이 음악청")),
    venue("gz-tianhe-cinema", "guangzhou", Kind::Movie, names("Tianhe Cinema", "天河影城", "톈허 영화관")),
    venue("se-sejong", "seoul", Kind::Show, names("Sejong Center for the Performing Arts", "世宗文化会馆", "세종문화회관")),
    venue("se-lotte-hall", "seoul", Kind::Concert, names("Lotte Concert Hall", "乐天音乐厅", "롯데콘서트홀")),
    venue("se-myeongdong-cinema", "seoul", Kind::Movie, names("Myeongdong Cinema", "明洞影院", "명동 영화관")),
    venue("bs-dream-theatre", "busan", Kind::Show, names("Dream Theatre", "梦想剧场", "드림씨어터")),
    venue("bs-cultural-center", "busan", Kind::Concert, names("Busan Cultural Center", "釜山文化会馆", "부산문화회관")),
    venue("bs-cinema-center", "busan", Kind::Movie, names("Busan Cinema Center", "釜山电影殿堂", "영화의전당")),
];

struct Perf {
    id: String,
    city: &'static City,
    venue: &'static Venue,
    kind: Kind,
    title: &'static Names,
    day: i64,
    minute: i64,
}

impl Perf {
    fn starts_ms(&self) -> i64 {
        self.day * DAY_MS + self.minute * MIN_MS
    }
}

/// One city's performances on one day, in time order. A theatre runs one
/// title a week (dark on Mondays, matinees at weekends), a cinema plays a
/// weekly line-up of three films, a concert hall has a concert most nights.
fn day_schedule(seed: u64, city: &'static City, day: i64) -> Vec<Perf> {
    let week = (day + 3).div_euclid(7);
    let weekday = (day + 3).rem_euclid(7); // 0 = Monday
    let mut list: Vec<(i64, &'static Venue, &'static Names)> = Vec::new();
    for v in VENUES.iter().filter(|v| v.city == city.id) {
        let titles = v.kind.titles();
        match v.kind {
            Kind::Show => {
                let mut r = seeded_rng(seed, &format!("run:{}:{week}", v.id));
                let t = &titles[r.random_range(0..titles.len())];
                if weekday != 0 {
                    list.push((19 * 60 + 30, v, t));
                }
                if weekday >= 5 {
                    list.push((14 * 60, v, t));
                }
            }
            Kind::Movie => {
                let mut r = seeded_rng(seed, &format!("lineup:{}:{week}", v.id));
                let mut lineup: Vec<usize> = Vec::new();
                while lineup.len() < 3 {
                    let i = r.random_range(0..titles.len());
                    if !lineup.contains(&i) {
                        lineup.push(i);
                    }
                }
                let mut r = seeded_rng(seed, &format!("screenings:{}:{day}", v.id));
                for minute in [600, 750, 860, 1000, 1140, 1290] {
                    list.push((minute, v, &titles[lineup[r.random_range(0..lineup.len())]]));
                }
            }
            Kind::Concert => {
                let mut r = seeded_rng(seed, &format!("concert:{}:{day}", v.id));
                if r.random_bool(0.65) {
                    let minute = if r.random_bool(0.5) { 19 * 60 + 30 } else { 20 * 60 };
                    list.push((minute, v, &titles[r.random_range(0..titles.len())]));
                }
            }
        }
    }
    list.sort_by_key(|(m, v, _)| (*m, v.id));
    let (y, mo, d) = civil_from_days(day);
    list.into_iter()
        .enumerate()
        .map(|(i, (minute, venue, title))| Perf {
            id: format!("{}-{y:04}{mo:02}{d:02}-{i}", city.id),
            city,
            venue,
            kind: venue.kind,
            title,
            day,
            minute,
        })
        .collect()
}

// ---------------------------------------------------------------- bookable items

struct ItemClass {
    id: &'static str,
    name: Names,
    price: i64,
    capacity: i64,
    presold: i64,
    layout: Layout,
}

/// A train on a date or a performance: what a hold or order is for.
struct Item {
    id: String,
    /// train | show | movie | concert
    kind: &'static str,
    /// "G7311" or "Swan Lake", for messages.
    what: String,
    starts_ms: i64,
    currency: &'static str,
    classes: Vec<ItemClass>,
    /// "G7311 Shanghai Hongqiao 08:00 → Hangzhou East 08:45, 2026-11-23"
    label: String,
    info: Value,
}

impl Item {
    fn class_list(&self) -> String {
        self.classes.iter().map(|c| c.id).collect::<Vec<_>>().join(", ")
    }

    fn class_word(&self) -> &'static str {
        if self.kind == "train" {
            "seat_class"
        } else {
            "section"
        }
    }

    fn class(&self, input: &str) -> ApiResult<&ItemClass> {
        let q = cities::fold(input);
        self.classes
            .iter()
            .find(|c| {
                let en = cities::fold(c.name.en);
                q == c.id
                    || c.name.all().iter().any(|n| cities::fold(n) == q)
                    || q == format!("{}class", c.id)
                    || en.strip_suffix("class") == Some(q.as_str())
            })
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown {} '{input}' for {}; choose one of: {}",
                    self.class_word(),
                    self.what,
                    self.class_list()
                ))
            })
    }

    fn summary(&self, class: &ItemClass, quantity: i64) -> String {
        format!("{quantity} × {}, {}", class.name.en.to_lowercase(), self.label)
    }
}

fn train_item(seed: u64, t: &Train, day: i64) -> Item {
    let id = format!("{}@{}", t.key, fmt_date(day));
    let arrive = t.depart_min + t.duration_min;
    let classes = class_defs(t.from.country)
        .iter()
        .zip(t.prices.iter().zip(&t.capacities))
        .map(|(c, (&price, &capacity))| ItemClass {
            id: c.id,
            name: c.name,
            price,
            capacity,
            presold: presold(seed, &id, c.id, capacity),
            layout: c.layout,
        })
        .collect();
    let label = format!(
        "{} {} {} → {} {}, {}",
        t.no,
        short_station(&t.from_station.en),
        fmt_hhmm(t.depart_min),
        short_station(&t.to_station.en),
        fmt_hhmm(arrive),
        fmt_date(day)
    );
    Item {
        info: json!({
            "type": "train",
            "train_no": t.no,
            "date": fmt_date(day),
            "from": t.from_station,
            "to": t.to_station,
            "depart": fmt_hhmm(t.depart_min),
            "arrive": fmt_hhmm(arrive),
        }),
        id,
        kind: "train",
        what: t.no.clone(),
        starts_ms: day * DAY_MS + t.depart_min * MIN_MS,
        currency: t.from.currency,
        classes,
        label,
    }
}

fn perf_item(seed: u64, p: &Perf) -> Item {
    let mut r = seeded_rng(seed, &format!("prices:{}:{}", p.venue.id, p.title.en));
    let factor = r.random_range(0.8..1.3);
    let krw = p.city.currency == "KRW";
    let classes = p
        .kind
        .sections()
        .iter()
        .map(|s| {
            let yuan = s.yuan * factor;
            let price = if krw {
                round_to(yuan * 190.0, 1000)
            } else if p.kind == Kind::Movie {
                round_to(yuan * 100.0, 100)
            } else {
                round_to(yuan * 100.0, 1000)
            };
            let mut rc = seeded_rng(seed, &format!("capacity:{}:{}", p.venue.id, s.id));
            let capacity = rc.random_range(s.capacity.0..=s.capacity.1);
            ItemClass {
                id: s.id,
                name: s.name,
                price,
                capacity,
                presold: presold(seed, &p.id, s.id, capacity),
                layout: Layout::Hall,
            }
        })
        .collect();
    let date = fmt_date(p.day);
    let time = fmt_hhmm(p.minute);
    Item {
        id: p.id.clone(),
        kind: p.kind.as_str(),
        what: p.title.en.to_string(),
        starts_ms: p.starts_ms(),
        currency: p.city.currency,
        classes,
        label: format!("{} at {}, {date} {time}", p.title.en, p.venue.name.en),
        info: json!({
            "type": p.kind.as_str(),
            "title": p.title,
            "venue": p.venue.name,
            "date": date,
            "time": time,
        }),
    }
}

// ---------------------------------------------------------------- the service

struct App {
    db: Db,
    clock: Clock,
    seed: u64,
    merchant: Arc<Merchant>,
    trains: Trains,
    /// Order reads, payments and cancellations run one at a time, so a
    /// cancellation racing another can never refund twice.
    orders: tokio::sync::Mutex<()>,
}

type S = Arc<App>;

pub fn router(ctx: ServiceCtx) -> ApiResult<Router> {
    let merchant = ctx
        .merchant
        .clone()
        .ok_or_else(|| ApiError::internal("the tickets service takes payments and needs a merchant account"))?;
    ctx.db.with(|c| Ok(c.execute_batch(SCHEMA)?))?;
    let app = Arc::new(App {
        db: ctx.db.clone(),
        clock: ctx.clock.clone(),
        seed: ctx.seed,
        merchant,
        trains: Trains::build(ctx.seed),
        orders: tokio::sync::Mutex::new(()),
    });
    Ok(Router::new()
        .route("/v1/trains", get(search_trains))
        .route("/v1/shows", get(search_shows))
        .route("/v1/holds", post(create_hold))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/quote", post(quote_order))
        .route("/v1/orders/{order_id}", get(get_order))
        .route("/v1/orders/{order_id}/cancel", post(cancel_order))
        .route("/v1/orders/{order_id}/cancel/quote", post(cancel_quote))
        .with_state(app))
}

const TRAIN_CITIES: &str = "Beijing, Shanghai, Hangzhou, Shenzhen and Guangzhou among themselves, and Seoul–Busan";

impl App {
    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn today(&self) -> i64 {
        self.now().div_euclid(DAY_MS)
    }

    /// A date that is today or later, within the booking horizon.
    fn day(&self, s: &str) -> ApiResult<i64> {
        let day = parse_date(s)?;
        let today = self.today();
        if day < today {
            return Err(ApiError::bad_request(format!(
                "date {s} is in the past; today is {}, pick today or a later date",
                fmt_date(today)
            )));
        }
        if day > today + MAX_DAYS_AHEAD {
            return Err(ApiError::bad_request(format!(
                "date {s} is too far ahead; tickets are sold at most {MAX_DAYS_AHEAD} days ahead"
            )));
        }
        Ok(day)
    }

    fn item(&self, id: &str) -> ApiResult<Item> {
        let unknown = || {
            ApiError::not_found(format!(
                "no train or show with id '{id}'; use an id from a train or show search"
            ))
        };
        if let Some((key, date)) = id.split_once('@') {
            let key: String = key.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_uppercase();
            let t = self.trains.by_key.get(&key).map(|&i| &self.trains.list[i]).ok_or_else(unknown)?;
            let day = parse_date(date).map_err(|_| unknown())?;
            return Ok(train_item(self.seed, t, day));
        }
        let mut parts = id.rsplitn(3, '-');
        let (Some(n), Some(date), Some(city)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(unknown());
        };
        let city = cities::city_by_id(city).ok_or_else(unknown)?;
        let n: usize = n.parse().map_err(|_| unknown())?;
        if date.len() != 8 || !date.is_ascii() {
            return Err(unknown());
        }
        let day = parse_date(&format!("{}-{}-{}", &date[..4], &date[4..6], &date[6..])).map_err(|_| unknown())?;
        let perf = day_schedule(self.seed, city, day).into_iter().nth(n).ok_or_else(unknown)?;
        Ok(perf_item(self.seed, &perf))
    }

    fn seats_json(&self, conn: &Connection, item: &Item, now: i64) -> ApiResult<Vec<Value>> {
        let key = if item.kind == "train" { "seat_class" } else { "section" };
        item.classes
            .iter()
            .map(|c| {
                let left = seats_left(conn, item, c, now, "")?;
                Ok(json!({key: c.id, "name": c.name, "price": c.price, "seats_left": left}))
            })
            .collect()
    }
}

/// Seats held, awaiting payment in time, paid or confirmed, not counting
/// the hold `except`. Joins the merchant's `pay_orders` (same database) so
/// that a payment whose notification arrived counts without a read first.
fn seats_taken(conn: &Connection, item_id: &str, class: &str, now: i64, except: &str) -> ApiResult<i64> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(h.quantity), 0) FROM holds h
           LEFT JOIN orders o ON o.order_id = h.order_id
           LEFT JOIN pay_orders p ON p.order_id = h.order_id
          WHERE h.item_id = ?1 AND h.class = ?2 AND h.hold_id != ?4 AND (
                (h.order_id IS NULL AND h.expires_ms > ?3)
             OR o.state = 'confirmed'
             OR (o.state = 'open' AND (h.expires_ms > ?3 OR p.status = 'paid')))",
        rusqlite::params![item_id, class, now, except],
        |r| r.get(0),
    )?)
}

fn seats_left(conn: &Connection, item: &Item, c: &ItemClass, now: i64, except: &str) -> ApiResult<i64> {
    Ok((c.capacity - c.presold - seats_taken(conn, &item.id, c.id, now, except)?).max(0))
}

type Params = HashMap<String, String>;

fn param<'a>(q: &'a Params, name: &str) -> Option<&'a str> {
    q.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
}

fn required<'a>(q: &'a Params, name: &str, hint: &str) -> ApiResult<&'a str> {
    param(q, name).ok_or_else(|| ApiError::bad_request(format!("`{name}` is required: {hint}")))
}

fn limit(q: &Params) -> ApiResult<usize> {
    match param(q, "limit") {
        None => Ok(5),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=20).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("limit '{s}' must be a number from 1 to 20"))),
    }
}

fn resolve_city(field: &str, q: &str, known: &str) -> ApiResult<&'static City> {
    cities::city(q)
        .or_else(|| cities::place(q, None).map(|(c, _)| c))
        .ok_or_else(|| ApiError::bad_request(format!("unknown city or station '{q}' for `{field}`; {known}")))
}

fn city_json(c: &City) -> Value {
    json!({"id": c.id, "name": c.name})
}

async fn search_trains(State(app): State<S>, Query(q): Query<Params>) -> ApiResult<Json<Value>> {
    let known = format!("trains run between {TRAIN_CITIES}");
    let from = resolve_city("from", required(&q, "from", "the departure city or station")?, &known)?;
    let to = resolve_city("to", required(&q, "to", "the arrival city or station")?, &known)?;
    if from.id == to.id {
        return Err(ApiError::bad_request(format!(
            "from and to are both {}; pick two different cities",
            from.name.en
        )));
    }
    if from.country != to.country {
        return Err(ApiError::bad_request(format!(
            "no train connects {} and {}; trains run between {TRAIN_CITIES}. Look for a flight instead",
            from.name.en, to.name.en
        )));
    }
    let date = required(&q, "date", "the travel date as YYYY-MM-DD")?;
    let day = app.day(date)?;
    let earliest = param(&q, "earliest").map(|s| parse_hhmm("earliest", s)).transpose()?;
    let latest = param(&q, "latest").map(|s| parse_hhmm("latest", s)).transpose()?;
    let defs = class_defs(from.country);
    let class = match param(&q, "seat_class") {
        None => None,
        Some(s) => {
            let f = cities::fold(s);
            let c = defs
                .iter()
                .find(|c| {
                    f == c.id
                        || f == format!("{}class", c.id)
                        || c.name.all().iter().any(|n| cities::fold(n) == f)
                })
                .ok_or_else(|| {
                    let ids: Vec<&str> = defs.iter().map(|c| c.id).collect();
                    ApiError::bad_request(format!(
                        "unknown seat_class '{s}' for trains in {}; choose one of: {}",
                        if from.country == "KR" { "Korea" } else { "China" },
                        ids.join(", ")
                    ))
                })?;
            Some(c.id)
        }
    };
    let limit = limit(&q)?;
    let now = app.now();
    let mut trains: Vec<&Train> = app
        .trains
        .route(from, to)
        .filter(|t| day * DAY_MS + t.depart_min * MIN_MS > now)
        .filter(|t| earliest.is_none_or(|e| t.depart_min >= e))
        .filter(|t| latest.is_none_or(|l| t.depart_min <= l))
        .collect();
    trains.sort_by_key(|t| t.depart_min);
    let items = app.db.with(|conn| {
        let mut items = Vec::new();
        for t in trains {
            let item = train_item(app.seed, t, day);
            let seats = app.seats_json(conn, &item, now)?;
            if let Some(c) = class {
                if !seats.iter().any(|s| s["seat_class"] == c && s["seats_left"].as_i64() > Some(0)) {
                    continue;
                }
            }
            items.push(json!({
                "id": item.id,
                "train_no": t.no,
                "date": fmt_date(day),
                "from": t.from_station,
                "to": t.to_station,
                "depart": fmt_hhmm(t.depart_min),
                "arrive": fmt_hhmm(t.depart_min + t.duration_min),
                "duration_min": t.duration_min,
                "duration": fmt_duration(t.duration_min),
                "currency": item.currency,
                "seats": seats,
            }));
        }
        Ok(items)
    })?;
    let total = items.len();
    let items: Vec<Value> = items.into_iter().take(limit).collect();
    let mut out = json!({
        "from": city_json(from),
        "to": city_json(to),
        "date": fmt_date(day),
        "count": items.len(),
        "total": total,
        "items": items,
    });
    if total == 0 {
        out["note"] = json!("no trains with seats left match; try another time, seat class or date");
    }
    Ok(Json(out))
}

/// Search words: whole words, and for Chinese/Korean runs without spaces,
/// every pair of neighbouring characters.
fn search_terms(q: &str) -> Vec<String> {
    const STOP: &[&str] = &["the", "and", "for", "in", "of", "a", "an", "at", "on", "to", "ticket", "tickets"];
    let mut out = Vec::new();
    for word in q.split_whitespace() {
        let f = cities::fold(word);
        if f.is_empty() || STOP.contains(&f.as_str()) {
            continue;
        }
        let chars: Vec<char> = f.chars().collect();
        if !f.is_ascii() && chars.len() > 2 {
            out.extend(chars.windows(2).map(|w| w.iter().collect::<String>()));
        } else if f.is_ascii() && f.len() > 3 && f.ends_with('s') {
            out.push(f[..f.len() - 1].to_string());
        } else {
            out.push(f);
        }
    }
    out
}

fn perf_score(p: &Perf, terms: &[String]) -> usize {
    let hay = cities::fold(&format!(
        "{} {} {} {}",
        p.title.all().join(" "),
        p.venue.name.all().join(" "),
        p.kind.keywords(),
        p.kind.as_str()
    ));
    terms.iter().filter(|t| hay.contains(t.as_str())).count()
}

async fn search_shows(State(app): State<S>, Query(q): Query<Params>) -> ApiResult<Json<Value>> {
    let city_q = required(&q, "city", "the city to look in, e.g. Shanghai")?;
    let city = cities::city(city_q)
        .or_else(|| cities::place(city_q, None).map(|(c, _)| c))
        .ok_or_else(|| {
            let known: Vec<&str> = cities::CITIES.iter().map(|c| c.name.en).collect();
            ApiError::bad_request(format!("unknown city '{city_q}'; known cities: {}", known.join(", ")))
        })?;
    let days: Vec<i64> = match param(&q, "date") {
        Some(d) => vec![app.day(d)?],
        None => {
            let t = app.today();
            (t..t + SHOW_WINDOW_DAYS).collect()
        }
    };
    let kind = match param(&q, "kind") {
        None => None,
        Some(k) => Some(Kind::parse(k).ok_or_else(|| {
            ApiError::bad_request(format!("unknown kind '{k}'; choose one of: show, movie, concert"))
        })?),
    };
    let terms = search_terms(param(&q, "q").or_else(|| param(&q, "query")).unwrap_or(""));
    let limit = limit(&q)?;
    let now = app.now();
    let mut hits: Vec<(usize, Perf)> = days
        .into_iter()
        .flat_map(|d| day_schedule(app.seed, city, d))
        .filter(|p| p.starts_ms() > now && kind.is_none_or(|k| p.kind == k))
        .map(|p| (perf_score(&p, &terms), p))
        .filter(|(s, _)| terms.is_empty() || *s > 0)
        .collect();
    hits.sort_by_key(|(s, p)| (std::cmp::Reverse(*s), p.starts_ms()));
    let total = hits.len();
    let items = app.db.with(|conn| {
        hits.iter()
            .take(limit)
            .map(|(_, p)| {
                let item = perf_item(app.seed, p);
                Ok(json!({
                    "id": p.id,
                    "kind": p.kind.as_str(),
                    "title": p.title,
                    "venue": p.venue.name,
                    "date": fmt_date(p.day),
                    "time": fmt_hhmm(p.minute),
                    "datetime": fmt_dt(p.starts_ms()),
                    "currency": item.currency,
                    "sections": app.seats_json(conn, &item, now)?,
                }))
            })
            .collect::<ApiResult<Vec<Value>>>()
    })?;
    let mut out = json!({"city": city_json(city), "count": items.len(), "total": total, "items": items});
    if total == 0 {
        out["note"] = json!("nothing matches; try other words, another date or no kind filter");
    }
    Ok(Json(out))
}

// ---------------------------------------------------------------- holds and orders

/// What a booking request carries: an item, class and quantity, or an
/// existing hold.
struct BookArgs {
    item_id: Option<String>,
    class: Option<String>,
    quantity: i64,
    passengers: Vec<String>,
    hold_id: Option<String>,
}

fn book_args(body: &[u8]) -> ApiResult<BookArgs> {
    let v = json_or_empty(body)?;
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let text = |k: &str| -> ApiResult<Option<String>> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(other) => Err(ApiError::bad_request(format!("`{k}` must be text, not {other}"))),
        }
    };
    let quantity = match o.get("quantity") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        Some(_) => 0,
    };
    if !(1..=MAX_QUANTITY).contains(&quantity) {
        return Err(ApiError::bad_request(format!(
            "quantity must be a whole number from 1 to {MAX_QUANTITY} (at most {MAX_QUANTITY} tickets per order)"
        )));
    }
    let passengers = match o.get("passenger_names") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| ApiError::bad_request("passenger_names must be a list of names"))
            })
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(ApiError::bad_request("passenger_names must be a list of names")),
    };
    if !passengers.is_empty() && passengers.len() as i64 != quantity {
        return Err(ApiError::bad_request(format!(
            "{} passenger names for {quantity} tickets; give one name per ticket or none",
            passengers.len()
        )));
    }
    Ok(BookArgs {
        item_id: text("item_id")?,
        class: match text("seat_class")? {
            Some(c) => Some(c),
            None => text("section")?,
        },
        quantity,
        passengers,
        hold_id: text("hold_id")?,
    })
}

/// The item and class a request names, after every check but seats.
fn pick<'a>(app: &App, args: &BookArgs, item: &'a Item) -> ApiResult<&'a ItemClass> {
    let Some(c) = &args.class else {
        return Err(ApiError::bad_request(format!(
            "`seat_class` is required for {}; choose one of: {}",
            item.what,
            item.class_list()
        )));
    };
    let class = item.class(c)?;
    if item.starts_ms <= app.now() {
        return Err(departed(item));
    }
    Ok(class)
}

fn departed(item: &Item) -> ApiError {
    let verb = if item.kind == "train" { "departed" } else { "started" };
    ApiError::conflict(
        "already_departed",
        format!("{} {verb} at {}; search again for a later one", item.what, fmt_dt(item.starts_ms)),
    )
}

fn item_of(app: &App, args: &BookArgs) -> ApiResult<Item> {
    let id = args.item_id.as_deref().ok_or_else(|| {
        ApiError::bad_request("`item_id` is required: the id of a train or show from a search (or give `hold_id`)")
    })?;
    app.item(id)
}

fn check_seats(conn: &Connection, item: &Item, class: &ItemClass, quantity: i64, now: i64) -> ApiResult<i64> {
    let left = seats_left(conn, item, class, now, "")?;
    if left < quantity {
        let what = class.name.en.to_lowercase();
        return Err(if left == 0 {
            ApiError::conflict(
                "sold_out",
                format!("{what} is sold out on {}; pick another class or another one", item.what),
            )
        } else {
            ApiError::conflict(
                "not_enough_seats",
                format!("only {left} {what} seats left on {}; ask for fewer or pick another class", item.what),
            )
        });
    }
    Ok(left)
}

#[derive(Debug, Clone)]
struct Hold {
    hold_id: String,
    item_id: String,
    class: String,
    quantity: i64,
    passengers: Vec<String>,
    amount: i64,
    currency: String,
    expires_ms: i64,
    order_id: Option<String>,
}

fn insert_hold(app: &App, item: &Item, class: &ItemClass, args: &BookArgs) -> ApiResult<Hold> {
    let now = app.now();
    app.db.tx(|tx| {
        check_seats(tx, item, class, args.quantity, now)?;
        let hold = Hold {
            hold_id: new_id("hold"),
            item_id: item.id.clone(),
            class: class.id.to_string(),
            quantity: args.quantity,
            passengers: args.passengers.clone(),
            amount: class.price * args.quantity,
            currency: item.currency.to_string(),
            expires_ms: (now + HOLD_MINUTES * MIN_MS).min(item.starts_ms),
            order_id: None,
        };
        tx.execute(
            "INSERT INTO holds (hold_id, item_id, class, quantity, passengers, amount, currency, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![
                hold.hold_id,
                hold.item_id,
                hold.class,
                hold.quantity,
                serde_json::to_string(&hold.passengers).unwrap_or_else(|_| "[]".into()),
                hold.amount,
                hold.currency,
                now,
                hold.expires_ms
            ],
        )?;
        Ok(hold)
    })
}

fn load_hold(conn: &Connection, hold_id: &str) -> ApiResult<Hold> {
    conn.query_row(
        "SELECT hold_id, item_id, class, quantity, passengers, amount, currency, expires_ms, order_id
         FROM holds WHERE hold_id = ?1",
        [hold_id],
        |r| {
            Ok(Hold {
                hold_id: r.get(0)?,
                item_id: r.get(1)?,
                class: r.get(2)?,
                quantity: r.get(3)?,
                passengers: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
                amount: r.get(5)?,
                currency: r.get(6)?,
                expires_ms: r.get(7)?,
                order_id: r.get(8)?,
            })
        },
    )
    .optional()?
    .ok_or_else(|| ApiError::not_found(format!("no hold '{hold_id}'; make one with POST /v1/holds or order directly")))
}

async fn create_hold(State(app): State<S>, body: Bytes) -> ApiResult<Json<Value>> {
    let args = book_args(&body)?;
    let item = item_of(&app, &args)?;
    let class = pick(&app, &args, &item)?;
    let hold = insert_hold(&app, &item, class, &args)?;
    Ok(Json(json!({
        "hold_id": hold.hold_id,
        "status": "held",
        "item_id": item.id,
        item.class_word(): class.id,
        "quantity": hold.quantity,
        "summary": item.summary(class, hold.quantity),
        "amount": hold.amount,
        "currency": hold.currency,
        "expires_at": fmt_dt(hold.expires_ms),
        "note": format!("seats are kept for {HOLD_MINUTES} minutes; order them with POST /v1/orders {{\"hold_id\"}}"),
    })))
}

/// An existing hold that can still become an order.
fn usable_hold(app: &App, hold_id: &str) -> ApiResult<Hold> {
    let hold = app.db.with(|c| load_hold(c, hold_id))?;
    if hold.order_id.is_none() && hold.expires_ms <= app.now() {
        return Err(ApiError::conflict(
            "hold_expired",
            format!("hold {hold_id} expired at {}; its seats went back, book again", fmt_dt(hold.expires_ms)),
        ));
    }
    Ok(hold)
}

async fn quote_order(State(app): State<S>, body: Bytes) -> ApiResult<Json<Value>> {
    let args = book_args(&body)?;
    let now = app.now();
    let (item, class_id, quantity, seats_left) = if let Some(hid) = &args.hold_id {
        let hold = usable_hold(&app, hid)?;
        let item = app.item(&hold.item_id)?;
        let left = app.db.with(|c| {
            let class = item.class(&hold.class)?;
            seats_left(c, &item, class, now, "")
        })?;
        (item, hold.class.clone(), hold.quantity, left)
    } else {
        let item = item_of(&app, &args)?;
        let class = pick(&app, &args, &item)?;
        let left = app.db.with(|c| check_seats(c, &item, class, args.quantity, now))?;
        let id = class.id.to_string();
        (item, id, args.quantity, left)
    };
    let class = item.class(&class_id)?;
    Ok(Json(json!({
        "summary": item.summary(class, quantity),
        "amount": class.price * quantity,
        "currency": item.currency,
        "item_id": item.id,
        item.class_word(): class.id,
        "quantity": quantity,
        "unit_price": class.price,
        "seats_left": seats_left,
        "starts_at": fmt_dt(item.starts_ms),
    })))
}

async fn create_order(State(app): State<S>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    let args = book_args(&body)?;
    let _guard = app.orders.lock().await;
    let (hold, fresh) = match &args.hold_id {
        Some(hid) => {
            let hold = usable_hold(&app, hid)?;
            check_terms(confirmed, "the total", hold.amount, &hold.currency)?;
            if let Some(order_id) = &hold.order_id {
                // Ordering the same hold again answers the order it made.
                return Ok(Json(app.refresh(order_id).await?));
            }
            (hold, false)
        }
        None => {
            let item = item_of(&app, &args)?;
            let class = pick(&app, &args, &item)?;
            // Before the seats are held: a refused order holds nothing.
            check_terms(confirmed, "the total", class.price * args.quantity, &item.currency)?;
            (insert_hold(&app, &item, class, &args)?, true)
        }
    };
    let item = app.item(&hold.item_id)?;
    let class = item.class(&hold.class)?;
    if item.starts_ms <= app.now() {
        return Err(departed(&item));
    }
    let summary = item.summary(class, hold.quantity);
    let order_id = new_id("ord");
    let now = app.now();
    app.db.tx(|tx| {
        tx.execute(
            "INSERT INTO orders (order_id, hold_id, item_id, class, quantity, amount, currency, summary, item,
                                 starts_ms, created_ms, expires_ms, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'open')",
            rusqlite::params![
                order_id,
                hold.hold_id,
                item.id,
                class.id,
                hold.quantity,
                hold.amount,
                hold.currency,
                summary,
                item.info.to_string(),
                item.starts_ms,
                now,
                hold.expires_ms
            ],
        )?;
        tx.execute("UPDATE holds SET order_id = ?2 WHERE hold_id = ?1", rusqlite::params![hold.hold_id, order_id])?;
        Ok(())
    })?;
    if let Err(e) = app
        .merchant
        .open_payment(&order_id, hold.amount, &hold.currency, &summary)
        .await
    {
        // No payment, no order: give the seats back (or the hold, if it was
        // made before) and let the caller retry.
        app.db.tx(|tx| {
            tx.execute("DELETE FROM orders WHERE order_id = ?1", [&order_id])?;
            if fresh {
                tx.execute("DELETE FROM holds WHERE hold_id = ?1", [&hold.hold_id])?;
            } else {
                tx.execute("UPDATE holds SET order_id = NULL WHERE hold_id = ?1", [&hold.hold_id])?;
            }
            Ok(())
        })?;
        return Err(e);
    }
    Ok(Json(app.refresh(&order_id).await?))
}

struct OrderRow {
    order_id: String,
    hold_id: String,
    item_id: String,
    class: String,
    quantity: i64,
    amount: i64,
    currency: String,
    summary: String,
    item: Value,
    starts_ms: i64,
    expires_ms: i64,
    state: String,
    tickets: Option<Value>,
    fee: Option<i64>,
    refund: Option<i64>,
    note: Option<String>,
}

fn load_order(db: &Db, order_id: &str) -> ApiResult<OrderRow> {
    db.with(|c| {
        c.query_row(
            "SELECT order_id, hold_id, item_id, class, quantity, amount, currency, summary, item, starts_ms,
                    expires_ms, state, tickets, fee, refund, note
             FROM orders WHERE order_id = ?1",
            [order_id],
            |r| {
                Ok(OrderRow {
                    order_id: r.get(0)?,
                    hold_id: r.get(1)?,
                    item_id: r.get(2)?,
                    class: r.get(3)?,
                    quantity: r.get(4)?,
                    amount: r.get(5)?,
                    currency: r.get(6)?,
                    summary: r.get(7)?,
                    item: serde_json::from_str(&r.get::<_, String>(8)?).unwrap_or(Value::Null),
                    starts_ms: r.get(9)?,
                    expires_ms: r.get(10)?,
                    state: r.get(11)?,
                    tickets: r.get::<_, Option<String>>(12)?.and_then(|t| serde_json::from_str(&t).ok()),
                    fee: r.get(13)?,
                    refund: r.get(14)?,
                    note: r.get(15)?,
                })
            },
        )
        .optional()?
        .ok_or_else(|| ApiError::not_found(format!("no order '{order_id}'; use the order_id the booking returned")))
    })
}

fn set_state(db: &Db, order_id: &str, state: &str, fee: Option<i64>, refund: Option<i64>, note: Option<&str>, now: i64) -> ApiResult<()> {
    db.with(|c| {
        c.execute(
            "UPDATE orders SET state = ?2, fee = COALESCE(?3, fee), refund = COALESCE(?4, refund),
                    note = COALESCE(?5, note), closed_ms = ?6 WHERE order_id = ?1",
            rusqlite::params![order_id, state, fee, refund, note, now],
        )?;
        Ok(())
    })
}

/// A short number for an e-ticket, derived from the seed and the order.
fn ticket_code(seed: u64, order_id: &str, i: i64, prefix: char) -> String {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(order_id.as_bytes());
    h.update(i.to_le_bytes());
    let d = h.finalize();
    let mut n = [0u8; 8];
    n.copy_from_slice(&d[..8]);
    format!("{prefix}{:010}", u64::from_le_bytes(n) % 10_000_000_000)
}

fn seat_label(class: &ItemClass, k: i64) -> String {
    let k = k.rem_euclid(class.capacity.max(1));
    match class.layout {
        Layout::Train { first_car, per_car, letters } => {
            let per_row = letters.len() as i64;
            let car = first_car + k / per_car;
            let row = (k % per_car) / per_row + 1;
            let letter = letters.chars().nth(((k % per_car) % per_row) as usize).unwrap_or('A');
            format!("Car {car}, seat {row:02}{letter}")
        }
        Layout::Hall => format!("{}, row {}, seat {}", class.name.en, k / 30 + 1, k % 30 + 1),
    }
}

impl App {
    /// Brings an order up to date with its payment and the clock, and
    /// answers it as the agent sees it. Callers hold `self.orders`.
    async fn refresh(&self, order_id: &str) -> ApiResult<Value> {
        let row = load_order(&self.db, order_id)?;
        let pay = self.merchant.payment(order_id).await?;
        let now = self.now();
        match (row.state.as_str(), pay.status.as_str()) {
            ("open" | "expired", "paid") => self.confirm(&row, &pay, now).await?,
            ("open", "awaiting_payment") if now >= row.expires_ms => {
                set_state(&self.db, order_id, "expired", None, None, Some("not paid in time; the seats went back"), now)?;
                // Best effort: if the payment service is unreachable the trade
                // stays open, and a late payment is refunded or honoured on read.
                let _ = self.merchant.close(order_id).await;
            }
            ("open", "closed") => {
                set_state(&self.db, order_id, "expired", None, None, Some("the payment was closed"), now)?;
            }
            _ => {}
        }
        let row = load_order(&self.db, order_id)?;
        let pay = self.merchant.payment_local(order_id)?.unwrap_or(pay);
        Ok(order_json(&row, &pay))
    }

    /// A paid order gets its seats; one paid after its hold lapsed gets
    /// them only if they are still free, else its money back.
    async fn confirm(&self, row: &OrderRow, pay: &Payment, now: i64) -> ApiResult<()> {
        let item = self.item(&row.item_id)?;
        let class = item.class(&row.class)?;
        let in_time = match pay.paid_ms {
            Some(t) => t <= row.expires_ms,
            None => row.state == "open",
        };
        let seed = self.seed;
        let confirmed = self.db.tx(|tx| {
            if !in_time
                && (item.starts_ms <= now || seats_left(tx, &item, class, now, &row.hold_id)? < row.quantity)
            {
                return Ok(false);
            }
            let next: i64 = tx
                .query_row(
                    "SELECT next FROM seat_counters WHERE item_id = ?1 AND class = ?2",
                    [&row.item_id, &row.class],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(class.presold);
            let passengers = load_hold(tx, &row.hold_id)?.passengers;
            let prefix = if item.kind == "train" { 'E' } else { 'T' };
            let tickets: Vec<Value> = (0..row.quantity)
                .map(|i| {
                    let mut t = json!({
                        "seat": seat_label(class, next + i),
                        "code": ticket_code(seed, &row.order_id, i, prefix),
                    });
                    if let Some(p) = passengers.get(i as usize) {
                        t["passenger"] = json!(p);
                    }
                    t
                })
                .collect();
            tx.execute(
                "INSERT INTO seat_counters (item_id, class, next) VALUES (?1, ?2, ?3)
                 ON CONFLICT (item_id, class) DO UPDATE SET next = ?3",
                rusqlite::params![row.item_id, row.class, next + row.quantity],
            )?;
            tx.execute(
                "UPDATE orders SET state = 'confirmed', tickets = ?2, note = NULL WHERE order_id = ?1",
                rusqlite::params![row.order_id, Value::from(tickets).to_string()],
            )?;
            Ok(true)
        })?;
        if !confirmed {
            self.merchant.refund(&row.order_id, row.amount, "late").await?;
            set_state(
                &self.db,
                &row.order_id,
                "refunded",
                Some(0),
                Some(row.amount),
                Some("paid after the booking had expired and the seats were gone; refunded in full"),
                now,
            )?;
        }
        Ok(())
    }
}

fn order_json(row: &OrderRow, pay: &Payment) -> Value {
    let status = match row.state.as_str() {
        "open" => "awaiting_payment",
        other => other,
    };
    let mut v = json!({
        "order_id": row.order_id,
        "status": status,
        "summary": row.summary,
        "item_id": row.item_id,
        "item": row.item,
        "seat_class": row.class,
        "quantity": row.quantity,
        "amount": row.amount,
        "currency": row.currency,
        "starts_at": fmt_dt(row.starts_ms),
        "payment": pay,
    });
    if status == "awaiting_payment" {
        v["pay_before"] = json!(fmt_dt(row.expires_ms));
    }
    if let Some(t) = &row.tickets {
        if status == "confirmed" {
            v["tickets"] = t.clone();
        }
    }
    if let Some(f) = row.fee {
        v["fee"] = json!(f);
    }
    if let Some(r) = row.refund {
        v["refund"] = json!(r);
    }
    if let Some(n) = &row.note {
        v["note"] = json!(n);
    }
    v
}

async fn get_order(State(app): State<S>, Path(order_id): Path<String>) -> ApiResult<Json<Value>> {
    let _guard = app.orders.lock().await;
    Ok(Json(app.refresh(&order_id).await?))
}

/// Refund share by time left before departure: > 24 h all, 2–24 h 80 %,
/// < 2 h 50 %, none once departed.
fn refund_percent(row: &OrderRow, now: i64) -> ApiResult<(i64, &'static str)> {
    let left = row.starts_ms - now;
    if left <= 0 {
        return Err(ApiError::conflict(
            "already_departed",
            format!(
                "{} began at {}; used or missed tickets cannot be cancelled or refunded",
                row.summary,
                fmt_dt(row.starts_ms)
            ),
        ));
    }
    Ok(if left > 24 * 60 * MIN_MS {
        (100, "more than 24 h before the start: full refund")
    } else if left >= 2 * 60 * MIN_MS {
        (80, "2 to 24 h before the start: 80 % refund")
    } else {
        (50, "less than 2 h before the start: 50 % refund")
    })
}

/// `dry`: the quote. `confirmed`: the terms the user agreed to, checked
/// against the fee before anything is closed or refunded.
async fn cancel(app: &App, order_id: &str, dry: bool, confirmed: Option<(i64, String)>) -> ApiResult<Value> {
    let _guard = app.orders.lock().await;
    for _ in 0..2 {
        let view = app.refresh(order_id).await?;
        let row = load_order(&app.db, order_id)?;
        let now = app.now();
        match row.state.as_str() {
            "cancelled" | "refunded" if dry => {
                return Err(ApiError::conflict(
                    "already_cancelled",
                    format!("order {order_id} is already {}; nothing more to cancel or refund", row.state),
                ))
            }
            "cancelled" | "refunded" => return Ok(view),
            "expired" => {
                return Err(ApiError::conflict(
                    "order_expired",
                    format!("order {order_id} expired unpaid; its seats went back and nothing was charged"),
                ))
            }
            "open" => {
                if dry {
                    return Ok(json!({
                        "order_id": order_id,
                        "summary": format!("Cancel {}: not paid yet, nothing is charged", row.summary),
                        "amount": 0,
                        "currency": row.currency,
                        "refund": 0,
                    }));
                }
                check_terms(confirmed.clone(), "the cancellation fee", 0, &row.currency)?;
                match app.merchant.close(order_id).await {
                    Ok(()) => {
                        set_state(&app.db, order_id, "cancelled", Some(0), Some(0), None, now)?;
                        return app.refresh(order_id).await;
                    }
                    // Closing fails when the user has just paid: cancel it as paid.
                    Err(e) => {
                        if app.merchant.payment(order_id).await?.status != "paid" {
                            return Err(e);
                        }
                        continue;
                    }
                }
            }
            "confirmed" => {
                let (pct, why) = refund_percent(&row, now)?;
                let refund = row.amount * pct / 100;
                let fee = row.amount - refund;
                if dry {
                    let summary = if fee == 0 {
                        format!("Cancel {}: full refund of {}", row.summary, fmt_money(refund, &row.currency))
                    } else {
                        format!(
                            "Cancel {}: refund {} of {} ({pct} %), fee {}",
                            row.summary,
                            fmt_money(refund, &row.currency),
                            fmt_money(row.amount, &row.currency),
                            fmt_money(fee, &row.currency)
                        )
                    };
                    return Ok(json!({
                        "order_id": order_id,
                        "summary": summary,
                        "amount": fee,
                        "currency": row.currency,
                        "refund": refund,
                        "refund_percent": pct,
                        "rule": why,
                    }));
                }
                check_terms(confirmed.clone(), "the cancellation fee", fee, &row.currency)?;
                app.merchant.refund(order_id, refund, "cancel").await?;
                set_state(&app.db, order_id, "refunded", Some(fee), Some(refund), Some(why), now)?;
                return app.refresh(order_id).await;
            }
            other => return Err(ApiError::internal(format!("order {order_id} is in an unknown state {other}"))),
        }
    }
    Err(ApiError::conflict(
        "payment_changing",
        format!("the payment of order {order_id} changed while cancelling; try again"),
    ))
}

async fn cancel_order(
    State(app): State<S>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    Ok(Json(cancel(&app, &order_id, false, confirmed).await?))
}

async fn cancel_quote(State(app): State<S>, Path(order_id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(cancel(&app, &order_id, true, None).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testkit::{self, pay, sandbox_in};
    use crate::sandbox::{Sandbox, Service};
    use std::time::Duration;

    /// The tickets service's `path`, for the shared helpers.
    fn at(sb: &Sandbox, path: &str) -> String {
        format!("{}{path}", sb.url(Service::Tickets))
    }

    async fn get(sb: &Sandbox, path: &str) -> (u16, Value) {
        testkit::get(at(sb, path)).await
    }

    async fn post(sb: &Sandbox, path: &str, body: Value) -> (u16, Value) {
        testkit::post(at(sb, path), body).await
    }

    async fn post_confirmed(sb: &Sandbox, path: &str, body: Value, amount: i64, currency: &str) -> (u16, Value) {
        testkit::post_confirmed(at(sb, path), body, amount, currency).await
    }

    fn day_str(sb: &Sandbox, plus: i64) -> String {
        fmt_date(sb.clock.now_ms().div_euclid(DAY_MS) + plus)
    }

    /// The title of the next concert in a city, from the catalog itself.
    fn coming_concert(sb: &Sandbox, city: &str) -> &'static Names {
        let city = cities::city_by_id(city).unwrap();
        let now = sb.clock.now_ms();
        let today = now.div_euclid(DAY_MS);
        (today..today + SHOW_WINDOW_DAYS)
            .flat_map(|d| day_schedule(42, city, d))
            .find(|p| p.kind == Kind::Concert && p.starts_ms() > now)
            .expect("a concert within 30 days")
            .title
    }

    fn seats_of(item: &Value, class: &str) -> i64 {
        item["seats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["seat_class"] == class)
            .unwrap()["seats_left"]
            .as_i64()
            .unwrap()
    }

    /// A Shanghai → Hangzhou train on `date` with at least `n` second-class seats.
    async fn train_with_seats(sb: &Sandbox, date: &str, n: i64) -> Value {
        let (s, v) = get(sb, &format!("/v1/trains?from=Shanghai&to=Hangzhou&date={date}&limit=20")).await;
        assert_eq!(s, 200, "{v}");
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| seats_of(t, "second") >= n)
            .cloned()
            .expect("some train has seats")
    }

    async fn train(sb: &Sandbox, id: &str, date: &str) -> Value {
        let (_, v) = get(sb, &format!("/v1/trains?from=Shanghai&to=Hangzhou&date={date}&limit=20")).await;
        v["items"].as_array().unwrap().iter().find(|t| t["id"] == id).cloned().unwrap()
    }

    /// Calls every tool the way the assistant does (arguments checked
    /// against the manifest, GET as query, POST as body) and checks each
    /// answer against the manifest's `result` schema.
    #[tokio::test]
    async fn the_manifest_matches_the_service() {
        let tools = crate::tools::load_manifest(&crate::source_root().join("tools/tickets.json"))
        .unwrap();
        let tool = |n: &str| tools.iter().find(|t| t.def.name == n).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let base = sb.url(Service::Tickets);
        let http = reqwest::Client::new();
        let call = |name: &str, args: Value, quote: bool| {
            let t = tool(name);
            let map = args.as_object().unwrap().clone();
            t.validate(&map).unwrap();
            let ep = if quote { t.def.quote.as_ref().unwrap() } else { t.def.endpoint.as_ref().unwrap() };
            let mut path = ep.path.clone();
            let mut rest = map.clone();
            for p in crate::tools::path_params(&ep.path) {
                path = path.replace(&format!("{{{p}}}"), rest.remove(p).unwrap().as_str().unwrap());
            }
            let url = format!("{base}{path}");
            let req = if ep.method == "GET" {
                let q: Vec<(String, String)> = rest
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
                    .collect();
                http.get(url).query(&q)
            } else {
                http.post(url).json(&rest)
            };
            let name = name.to_string();
            async move {
                let r = req.send().await.unwrap();
                assert!(r.status().is_success(), "{name}: {}", r.status());
                r.json::<Value>().await.unwrap()
            }
        };
        let date = day_str(&sb, 2);
        let trains = call("tickets_search_trains", json!({"from": "上海", "to": "Hangzhou", "date": date}), false).await;
        tool("tickets_search_trains").validate_result(&trains).unwrap();
        let title = coming_concert(&sb, "beijing");
        let shows = call("tickets_search_shows", json!({"city": "Beijing", "query": title.en}), false).await;
        tool("tickets_search_shows").validate_result(&shows).unwrap();
        assert_eq!(shows["items"][0]["title"]["en"], title.en);

        let t = trains["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| seats_of(t, "second") >= 1)
            .unwrap();
        let args = json!({"item_id": t["id"], "seat_class": "second", "quantity": 1});
        let q = call("tickets_book", args.clone(), true).await;
        assert!(q["summary"].is_string() && q["amount"].is_i64() && q["currency"] == "CNY", "{q}");
        let o = call("tickets_book", args, false).await;
        tool("tickets_book").validate_result(&o).unwrap();
        assert_eq!(o["amount"], q["amount"]);
        pay(&sb, &o, "alipay").await;
        let id = json!({"order_id": o["order_id"]});
        let o = call("tickets_order_status", id.clone(), false).await;
        tool("tickets_order_status").validate_result(&o).unwrap();
        assert_eq!(o["status"], "confirmed");
        let q = call("tickets_cancel", id.clone(), true).await;
        assert!(q["summary"].is_string() && q["amount"] == 0 && q["refund"] == o["amount"], "{q}");
        let c = call("tickets_cancel", id, false).await;
        tool("tickets_cancel").validate_result(&c).unwrap();
        sb.stop().await;
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(parse_date("2024-02-29").map(fmt_date).unwrap(), "2024-02-29");
        assert!(parse_date("2026-02-29").unwrap_err().message.contains("does not exist"));
        assert!(parse_date("2026-13-01").is_err());
        assert!(parse_date("tomorrow").is_err());
    }

    #[test]
    fn catalog_is_deterministic_with_unique_train_numbers() {
        let a = Trains::build(42);
        let b = Trains::build(42);
        assert_eq!(a.list.len(), b.list.len());
        assert_eq!(a.by_key.len(), a.list.len(), "train numbers are unique");
        for (x, y) in a.list.iter().zip(&b.list) {
            assert_eq!((&x.no, x.depart_min, &x.prices), (&y.no, y.depart_min, &y.prices));
        }
        let c = Trains::build(7);
        assert!(a.list.iter().zip(&c.list).any(|(x, y)| x.no != y.no));
        for t in &a.list {
            assert!(t.depart_min + t.duration_min < 24 * 60, "{} arrives the same day", t.no);
            let n = a.route(t.from, t.to).count();
            assert!((6..=10).contains(&n), "{} → {}: {n}", t.from.id, t.to.id);
        }
        let ktx: Vec<&Train> = a.list.iter().filter(|t| t.from.id == "seoul").collect();
        assert!(ktx[0].no.starts_with("KTX "));
        let city = cities::city_by_id("beijing").unwrap();
        assert_eq!(
            day_schedule(42, city, 20_800).iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
            day_schedule(42, city, 20_800).iter().map(|p| p.id.clone()).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn searches_are_deterministic_and_multilingual() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (sandbox_in(d1.path(), 42).await, sandbox_in(d2.path(), 42).await);
        let date = day_str(&a, 3);
        for path in [
            format!("/v1/trains?from=Shanghai&to=Hangzhou&date={date}"),
            format!("/v1/shows?city=Beijing&date={date}"),
            "/v1/shows?city=Seoul&q=jazz&limit=3".to_string(),
        ] {
            let (s1, x) = get(&a, &path).await;
            let (s2, y) = get(&b, &path).await;
            assert_eq!((s1, s2), (200, 200), "{path}: {x}");
            assert_eq!(x, y, "{path}");
        }

        let (_, en) = get(&a, &format!("/v1/trains?from=Shanghai&to=Hangzhou&date={date}")).await;
        let (_, zh) = get(&a, &format!("/v1/trains?from=上海&to=杭州东站&date={date}")).await;
        assert_eq!(en["items"], zh["items"]);
        let first = &en["items"][0];
        assert_eq!(first["from"]["zh"], "上海虹桥站");
        assert_eq!(first["currency"], "CNY");
        assert!(first["id"].as_str().unwrap().ends_with(&format!("@{date}")));
        assert!(en["count"].as_u64().unwrap() <= 5);

        let (s, ko) = get(&a, &format!("/v1/trains?from=서울&to=부산&date={date}&seat_class=특실")).await;
        assert_eq!(s, 200, "{ko}");
        let k = &ko["items"][0];
        assert!(k["train_no"].as_str().unwrap().starts_with("KTX "), "{k}");
        assert_eq!(k["currency"], "KRW");
        assert_eq!(k["to"]["ko"], "부산역");

        let (s, e) = get(&a, &format!("/v1/trains?from=Shanghai&to=Seoul&date={date}")).await;
        assert_eq!(s, 400);
        assert!(e["error"]["message"].as_str().unwrap().contains("no train connects Shanghai and Seoul"), "{e}");

        let (s, e) = get(&a, &format!("/v1/trains?from=Atlantis&to=Seoul&date={date}")).await;
        assert_eq!(s, 400);
        assert!(e["error"]["message"].as_str().unwrap().contains("Beijing"), "{e}");
        let (s, _) = get(&a, "/v1/trains?from=Shanghai&to=Hangzhou&date=23/11/2026").await;
        assert_eq!(s, 400);
        let (s, e) = get(&a, &format!("/v1/trains?from=Shanghai&to=Hangzhou&date={}", day_str(&a, -1))).await;
        assert_eq!(s, 400);
        assert!(e["error"]["message"].as_str().unwrap().contains("past"), "{e}");
        let (s, e) = get(&a, &format!("/v1/trains?from=Seoul&to=Busan&date={date}&seat_class=business")).await;
        assert_eq!(s, 400);
        assert!(e["error"]["message"].as_str().unwrap().contains("standard, first"), "{e}");

        let (_, late) = get(&a, &format!("/v1/trains?from=Beijing&to=Shanghai&date={date}&earliest=12:00")).await;
        for t in late["items"].as_array().unwrap() {
            assert!(t["depart"].as_str().unwrap() >= "12:00");
        }

        let title = coming_concert(&a, "beijing");
        let (s, shows) = get(&a, &format!("/v1/shows?city=北京&q={}", title.zh)).await;
        assert_eq!(s, 200, "{shows}");
        let hit = &shows["items"][0];
        assert_eq!(hit["title"]["en"], title.en, "{shows}");
        assert_eq!(hit["kind"], "concert");
        assert!(hit["sections"][0]["price"].as_i64().unwrap() > 0);
        let (_, movies) = get(&a, "/v1/shows?city=부산&kind=movie&limit=2").await;
        assert_eq!(movies["count"], 2);
        assert_eq!(movies["items"][0]["currency"], "KRW");
        assert_eq!(movies["items"][1]["kind"], "movie");
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn holds_take_seats_until_they_expire_and_quotes_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let date = day_str(&sb, 2);
        let t = train_with_seats(&sb, &date, 2).await;
        let id = t["id"].as_str().unwrap();
        let before = seats_of(&t, "second");

        let args = json!({"item_id": id, "seat_class": "second", "quantity": 2});
        let (s, q) = post(&sb, "/v1/orders/quote", args.clone()).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!(q["amount"], q["unit_price"].as_i64().unwrap() * 2);
        assert_eq!(q["currency"], "CNY");
        assert!(q["summary"].as_str().unwrap().starts_with("2 × second class, G"), "{q}");
        assert!(q["summary"].as_str().unwrap().contains("Shanghai Hongqiao"), "{q}");
        assert_eq!(seats_of(&train(&sb, id, &date).await, "second"), before, "a quote holds nothing");

        let (s, h) = post(&sb, "/v1/holds", json!({"item_id": id, "seat_class": "二等座", "quantity": 2, "passenger_names": ["Li Lei", "Han Meimei"]})).await;
        assert_eq!(s, 200, "{h}");
        assert_eq!(h["status"], "held");
        assert_eq!(seats_of(&train(&sb, id, &date).await, "second"), before - 2);

        // Somewhere a class is nearly or fully sold out: asking for more is refused.
        let (mut few, mut none) = (None, None);
        for route in ["from=Beijing&to=Shanghai", "from=Guangzhou&to=Shenzhen", "from=Hangzhou&to=Beijing"] {
            for plus in 1..6 {
                let (_, v) = get(&sb, &format!("/v1/trains?{route}&date={}&limit=20", day_str(&sb, plus))).await;
                for t in v["items"].as_array().unwrap() {
                    for s in t["seats"].as_array().unwrap() {
                        let left = s["seats_left"].as_i64().unwrap();
                        let pick = (t["id"].clone(), s["seat_class"].clone(), left);
                        if left == 0 {
                            none.get_or_insert(pick);
                        } else if left < 9 {
                            few.get_or_insert(pick);
                        }
                    }
                }
            }
        }
        let (item, class, left) = few.expect("a class with few seats left");
        let (s, e) = post(&sb, "/v1/orders/quote", json!({"item_id": item, "seat_class": class, "quantity": left + 1})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("not_enough_seats")), "{e}");
        let (item, class, _) = none.expect("a sold-out class");
        let (s, e) = post(&sb, "/v1/orders", json!({"item_id": item, "seat_class": class, "quantity": 1})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("sold_out")), "{e}");

        sb.clock.advance(Duration::from_secs(16 * 60));
        assert_eq!(seats_of(&train(&sb, id, &date).await, "second"), before, "the hold expired");
        let (s, e) = post(&sb, "/v1/orders", json!({"hold_id": h["hold_id"]})).await;
        assert_eq!(s, 409);
        assert_eq!(e["error"]["code"], "hold_expired");

        for (body, what) in [
            (json!({"item_id": id, "seat_class": "second", "quantity": 0}), "quantity"),
            (json!({"item_id": id, "seat_class": "second", "quantity": 10}), "quantity"),
            (json!({"item_id": id, "seat_class": "sleeper", "quantity": 1}), "second, first, business"),
            (json!({"item_id": "G1@2020-01-01", "seat_class": "second"}), "no train or show"),
        ] {
            let (s, e) = post(&sb, "/v1/orders/quote", body).await;
            assert!(s == 400 || s == 404, "{e}");
            assert!(e["error"]["message"].as_str().unwrap().contains(what), "{e}");
        }
        sb.stop().await;
    }

    #[tokio::test]
    async fn paid_orders_are_confirmed_and_cancellations_refund_by_time_left() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let date = day_str(&sb, 2);
        let t = train_with_seats(&sb, &date, 5).await;
        let id = t["id"].as_str().unwrap().to_string();
        let before = seats_of(&t, "second");
        let mut orders = Vec::new();
        for _ in 0..4 {
            let (s, o) = post(&sb, "/v1/orders", json!({"item_id": id, "seat_class": "second", "quantity": 1})).await;
            assert_eq!(s, 200, "{o}");
            assert_eq!(o["status"], "awaiting_payment");
            assert_eq!(o["payment"]["status"], "awaiting_payment");
            pay(&sb, &o, "alipay").await;
            let (_, o) = get(&sb, &format!("/v1/orders/{}", o["order_id"].as_str().unwrap())).await;
            assert_eq!(o["status"], "confirmed", "{o}");
            assert_eq!(o["payment"]["status"], "paid");
            let seat = o["tickets"][0]["seat"].as_str().unwrap();
            assert!(seat.starts_with("Car "), "{seat}");
            assert!(o["tickets"][0]["code"].as_str().unwrap().starts_with('E'));
            orders.push(o);
        }
        let seats: HashSet<&str> = orders.iter().map(|o| o["tickets"][0]["seat"].as_str().unwrap()).collect();
        assert_eq!(seats.len(), 4, "every ticket has its own seat");
        sb.clock.advance(Duration::from_secs(20 * 60));
        assert_eq!(seats_of(&train(&sb, &id, &date).await, "second"), before - 4, "paid seats stay taken");

        let amount = orders[0]["amount"].as_i64().unwrap();
        let cancel = |o: &Value| format!("/v1/orders/{}/cancel", o["order_id"].as_str().unwrap());
        let depart = orders[0]["starts_at"].as_str().unwrap().to_string();
        let depart_ms = {
            let (d, hm) = depart.split_once('T').unwrap();
            parse_date(d).unwrap() * DAY_MS + parse_hhmm("t", hm).unwrap() * MIN_MS
        };

        // More than 24 h ahead: everything back.
        let (s, q) = post(&sb, &format!("{}/quote", cancel(&orders[0])), json!({})).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!((q["amount"].as_i64(), q["refund"].as_i64()), (Some(0), Some(amount)));
        let (s, c) = post(&sb, &cancel(&orders[0]), json!({})).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(c["status"], "refunded");
        assert_eq!(c["refund"], amount);
        assert_eq!(c["payment"]["refunded"], amount);
        // Twice: the same answer, no second refund.
        let (s, again) = post(&sb, &cancel(&orders[0]), json!({})).await;
        assert_eq!(s, 200);
        assert_eq!(again["payment"]["refunded"], amount);
        assert_eq!(again["refund"], amount);
        let (s, e) = post(&sb, &format!("{}/quote", cancel(&orders[0])), json!({})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("already_cancelled")));
        assert_eq!(seats_of(&train(&sb, &id, &date).await, "second"), before - 3, "refunded seats come back");

        // 5 h before: 80 %.
        let now = sb.clock.now_ms();
        sb.clock.advance(Duration::from_millis((depart_ms - 5 * 3_600_000 - now) as u64));
        let (_, q) = post(&sb, &format!("{}/quote", cancel(&orders[1])), json!({})).await;
        assert_eq!(q["refund"], amount * 80 / 100, "{q}");
        assert_eq!(q["amount"], amount - amount * 80 / 100);
        let (_, c) = post(&sb, &cancel(&orders[1]), json!({})).await;
        assert_eq!(c["refund"], amount * 80 / 100, "{c}");
        assert_eq!(c["fee"], amount - amount * 80 / 100);

        // 1 h before: 50 %.
        sb.clock.advance(Duration::from_secs(4 * 3600));
        let (_, c) = post(&sb, &cancel(&orders[2]), json!({})).await;
        assert_eq!(c["refund"], amount * 50 / 100, "{c}");
        assert_eq!(c["payment"]["refunded"], amount * 50 / 100);

        // Departed: no cancellation.
        sb.clock.advance(Duration::from_secs(2 * 3600));
        let (s, e) = post(&sb, &cancel(&orders[3]), json!({})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("already_departed")), "{e}");
        sb.stop().await;
    }

    #[tokio::test]
    async fn unpaid_orders_cancel_for_free_or_expire() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let (_, shows) = get(&sb, "/v1/shows?city=Shanghai&kind=concert").await;
        let show = &shows["items"][0];
        let section = show["sections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["seats_left"].as_i64().unwrap() >= 2)
            .min_by_key(|s| s["price"].as_i64().unwrap())
            .unwrap()["section"]
            .as_str()
            .unwrap()
            .to_string();
        let args = json!({"item_id": show["id"], "seat_class": section, "quantity": 2});
        let (s, o) = post(&sb, "/v1/orders", args.clone()).await;
        assert_eq!(s, 200, "{o}");
        let oid = o["order_id"].as_str().unwrap();
        let (_, q) = post(&sb, &format!("/v1/orders/{oid}/cancel/quote"), json!({})).await;
        assert_eq!((q["amount"].as_i64(), q["refund"].as_i64()), (Some(0), Some(0)), "{q}");
        let (s, c) = post(&sb, &format!("/v1/orders/{oid}/cancel"), json!({})).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(c["status"], "cancelled");
        assert_eq!(c["payment"]["status"], "closed");

        // Paid after the hold lapsed, nobody having looked: the seats are
        // still free, so the order stands.
        let (_, late) = post(&sb, "/v1/orders", args.clone()).await;
        sb.clock.advance(Duration::from_secs(16 * 60));
        pay(&sb, &late, "alipay").await;
        let (_, late) = get(&sb, &format!("/v1/orders/{}", late["order_id"].as_str().unwrap())).await;
        assert_eq!(late["status"], "confirmed", "{late}");
        assert_eq!(late["tickets"].as_array().unwrap().len(), 2);
        assert!(late["tickets"][0]["code"].as_str().unwrap().starts_with('T'));

        let (_, o) = post(&sb, "/v1/orders", args).await;
        let oid = o["order_id"].as_str().unwrap();
        sb.clock.advance(Duration::from_secs(16 * 60));
        let (_, o) = get(&sb, &format!("/v1/orders/{oid}")).await;
        assert_eq!(o["status"], "expired", "{o}");
        let (s, e) = post(&sb, &format!("/v1/orders/{oid}/cancel"), json!({})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("order_expired")));
        sb.stop().await;
    }
    #[tokio::test]
    async fn confirmed_terms_must_match_at_execution() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let count = |table: &str| testkit::rows(dir.path(), Service::Tickets, table);
        let date = day_str(&sb, 2);
        let t = train_with_seats(&sb, &date, 2).await;
        let args = json!({"item_id": t["id"], "seat_class": "second", "quantity": 1});
        let (_, q) = post(&sb, "/v1/orders/quote", args.clone()).await;
        let amount = q["amount"].as_i64().unwrap();

        // Not the confirmed total: refused, no hold, no order.
        let (s, e) = post_confirmed(&sb, "/v1/orders", args.clone(), amount + 100, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert_eq!((count("holds"), count("orders")), (0, 0));
        let (s, o) = post_confirmed(&sb, "/v1/orders", args, amount, "CNY").await;
        assert_eq!((s, o["amount"].as_i64()), (200, Some(amount)), "{o}");
        pay(&sb, &o, "alipay").await;
        let oid = o["order_id"].as_str().unwrap();

        // Quoted free two days ahead; the user says yes five hours before departure.
        let (_, q) = post(&sb, &format!("/v1/orders/{oid}/cancel/quote"), json!({})).await;
        assert_eq!(q["amount"].as_i64(), Some(0), "{q}");
        let (d, hm) = o["starts_at"].as_str().unwrap().split_once('T').unwrap();
        let depart_ms = parse_date(d).unwrap() * DAY_MS + parse_hhmm("t", hm).unwrap() * MIN_MS;
        let now = sb.clock.now_ms();
        sb.clock.advance(Duration::from_millis((depart_ms - 5 * 3_600_000 - now) as u64));
        let fee = amount - amount * 80 / 100;
        let (s, e) = post_confirmed(&sb, &format!("/v1/orders/{oid}/cancel"), json!({}), 0, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        let want = format!("the cancellation fee is now {}, not the ¥0.00 you confirmed", fmt_money(fee, "CNY"));
        assert!(e["error"]["message"].as_str().unwrap().contains(&want), "{e}");
        let (_, v) = get(&sb, &format!("/v1/orders/{oid}")).await;
        assert_eq!((v["status"].as_str(), v["payment"]["refunded"].as_i64()), (Some("confirmed"), Some(0)), "{v}");
        let (s, c) = post_confirmed(&sb, &format!("/v1/orders/{oid}/cancel"), json!({}), fee, "CNY").await;
        assert_eq!((s, c["status"].as_str(), c["fee"].as_i64()), (200, Some("refunded"), Some(fee)), "{c}");
        sb.stop().await;
    }
}


/// Each venue's titles as feed items (see [`super::catalog`]): what a
/// person can book there, whatever the date.
pub(crate) fn catalog_items() -> Vec<super::catalog::CatalogItem> {
    use super::catalog::CatalogItem;
    let mut out = Vec::new();
    for v in VENUES {
        let Some(city) = cities::city_by_id(v.city) else { continue };
        let meals: Vec<String> = match v.kind {
            Kind::Movie => vec!["lunch".into(), "afternoon".into(), "dinner".into(), "late".into()],
            _ => vec!["dinner".into()],
        };
        for t in v.kind.titles() {
            let slug: String = t.en.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
            let slug = slug.split('-').filter(|s| !s.is_empty()).collect::<Vec<_>>().join("-");
            let kind = v.kind.as_str();
            let mut refs = serde_json::Map::new();
            refs.insert("kind".into(), kind.into());
            refs.insert("city".into(), city.name.en.into());
            refs.insert("title".into(), t.en.into());
            out.push(CatalogItem {
                id: format!("tickets:{kind}:{}:{slug}", v.id),
                app: "tickets".into(),
                kind: kind.into(),
                name: (*t).into(),
                text: format!("{} ({kind}) at {} in {}", t.en, v.name.en, city.name.en),
                tags: vec![kind.to_owned()],
                city: city.id.into(),
                lat: city.lat,
                lon: city.lon,
                price: None,
                currency: city.currency.into(),
                rating: None,
                meals: meals.clone(),
                parent: None,
                refs,
            });
        }
    }
    out
}
