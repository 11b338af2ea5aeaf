//! The ride-hailing sandbox mini-program, so the assistant can quote, book,
//! follow and cancel a taxi ride end to end against a real HTTP service.
//!
//! `POST /v1/quotes` prices a trip per vehicle class (base + per km + per
//! minute, with a seeded traffic factor, so the same seed always gives the
//! same price); a quote is stored and valid for ten minutes. `POST /v1/rides`
//! turns a quote into a ride paid upfront through the merchant; the ride's
//! status is computed on read from the paid time against the sandbox clock
//! (finding_driver → driver_assigned → arriving → in_progress → completed).
//! Cancelling is free before a driver is assigned or within two minutes of
//! assignment, costs a small fee after that and is refused once the trip has
//! started.
//!
//! The place helpers here ([`resolve_place`], [`Loc`], [`money`], [`body`])
//! are shared with the bike and salon mini-programs.

use crate::world::money::display as money;
use crate::world::cities::{self, City, Names};
use super::core::{json_or_empty, new_id, seeded_rng, ApiError, ApiResult};
use super::merchant::Payment;
use super::terms::{check_terms, confirmed_terms};
use super::ServiceCtx;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use rusqlite::OptionalExtension;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ride_quotes (
    id TEXT PRIMARY KEY,
    class TEXT NOT NULL,
    price INTEGER NOT NULL,
    currency TEXT NOT NULL,
    distance_km REAL NOT NULL,
    trip_minutes INTEGER NOT NULL,
    eta_pickup_minutes INTEGER NOT NULL,
    pickup TEXT NOT NULL,            -- Loc as JSON
    dropoff TEXT NOT NULL,           -- Loc as JSON
    pickup_time TEXT,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rides (
    id TEXT PRIMARY KEY,
    quote_id TEXT NOT NULL UNIQUE REFERENCES ride_quotes(id),
    created_ms INTEGER NOT NULL,
    cancelled_ms INTEGER,
    cancel_fee INTEGER,
    refund INTEGER);";

/// How long a quote can be turned into a ride.
const QUOTE_VALID_MS: i64 = 10 * 60_000;
/// From payment to a driver accepting the ride.
const ASSIGN_AFTER_MS: i64 = 60_000;
/// The driver waits this long at the pickup before the trip starts.
const BOARDING_MS: i64 = 2 * 60_000;
/// Cancelling is free this long after a driver was assigned.
const FREE_CANCEL_MS: i64 = 2 * 60_000;
/// Rides longer than this are refused: take a train.
const MAX_RIDE_KM: f64 = 300.0;

// ---------------------------------------------------------------------------
// Shared helpers (also used by bike.rs and salon.rs)
// ---------------------------------------------------------------------------

/// Text in the three languages, owned (places given as coordinates have no
/// static name).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Text3 {
    pub en: String,
    pub zh: String,
    pub ko: String,
}

impl From<Names> for Text3 {
    fn from(n: Names) -> Self {
        Self {
            en: n.en.into(),
            zh: n.zh.into(),
            ko: n.ko.into(),
        }
    }
}

/// A resolved location: a named place, a city centre or raw coordinates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Loc {
    pub id: String,
    pub name: Text3,
    /// The city id (`shanghai`, `seoul`, …).
    pub city: String,
    pub lat: f64,
    pub lon: f64,
}

impl Loc {
    pub fn city(&self) -> &'static City {
        cities::city_by_id(&self.city).unwrap_or(&cities::CITIES[0])
    }
    pub fn currency(&self) -> &'static str {
        self.city().currency
    }
    pub fn coords(&self) -> (f64, f64) {
        (self.lat, self.lon)
    }
}

/// The assumed current location when the user gives none: People's Square,
/// Shanghai.
pub fn default_loc() -> Loc {
    match cities::place("sh-peoples-square", None).or_else(|| cities::place("People's Square", Some("shanghai"))) {
        Some((c, p)) => Loc {
            id: p.id.into(),
            name: p.name.into(),
            city: c.id.into(),
            lat: p.lat,
            lon: p.lon,
        },
        None => Loc {
            id: "sh-peoples-square".into(),
            name: Text3 {
                en: "People's Square".into(),
                zh: "人民广场".into(),
                ko: "인민광장".into(),
            },
            city: "shanghai".into(),
            lat: 31.2323,
            lon: 121.4758,
        },
    }
}

/// A city's centre as a location.
pub fn city_loc(c: &'static City) -> Loc {
    Loc {
        id: c.id.into(),
        name: c.name.into(),
        city: c.id.into(),
        lat: c.lat,
        lon: c.lon,
    }
}

fn parse_coords(q: &str) -> Option<(f64, f64)> {
    let (a, b) = q.split_once(',')?;
    let lat: f64 = a.trim().parse().ok()?;
    let lon: f64 = b.trim().parse().ok()?;
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
}

/// Resolves what a person typed: coordinates ("31.23,121.47"), a city name
/// (its centre) or a named place in English, Chinese or Korean, preferring
/// places in `near_city`. Unknown places get a 400 listing places the
/// sandbox knows in `near_city` (Shanghai when none).
pub fn resolve_place(query: &str, near_city: Option<&str>) -> ApiResult<Loc> {
    let q = query.trim();
    if let Some((lat, lon)) = parse_coords(q) {
        let c = cities::nearest_city(lat, lon);
        let label = format!("{lat:.4},{lon:.4}");
        return Ok(Loc {
            id: label.clone(),
            name: Text3 {
                en: label.clone(),
                zh: label.clone(),
                ko: label,
            },
            city: c.id.into(),
            lat,
            lon,
        });
    }
    if let Some(c) = cities::city(q) {
        return Ok(city_loc(c));
    }
    if let Some((c, p)) = cities::place(q, near_city) {
        return Ok(Loc {
            id: p.id.into(),
            name: p.name.into(),
            city: c.id.into(),
            lat: p.lat,
            lon: p.lon,
        });
    }
    let c = near_city.and_then(cities::city).unwrap_or(&cities::CITIES[1]);
    let known: Vec<&str> = c.places.iter().map(|p| p.name.en).collect();
    Err(ApiError::bad_request(format!(
        "unknown place '{q}'; known places in {} include: {}; a city name or coordinates like \"31.23,121.47\" also work",
        c.name.en,
        known.join(", ")
    )))
}

/// Parses a JSON request body (empty means `{}`) into `T`, with a 400 the
/// caller can act on.
pub fn body<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let v = json_or_empty(bytes)?;
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

// ---------------------------------------------------------------------------
// Vehicle classes and pricing
// ---------------------------------------------------------------------------

struct Class {
    id: &'static str,
    name: Names,
    /// Base fare, per km and per minute: [CNY fen, KRW won].
    base: [i64; 2],
    per_km: [i64; 2],
    per_min: [i64; 2],
    /// Extra minutes for a driver of this class to reach the pickup.
    eta_extra: u32,
    /// Car models: [China, Korea].
    cars: [&'static [&'static str]; 2],
}

static CLASSES: &[Class] = &[
    Class {
        id: "economy",
        name: Names {
            en: "Economy",
            zh: "快车",
            ko: "일반",
        },
        base: [1400, 4800],
        per_km: [250, 1000],
        per_min: [50, 200],
        eta_extra: 0,
        cars: [
            &["Volkswagen Lavida", "BYD Qin Plus", "Toyota Corolla"],
            &["Hyundai Avante", "Kia K5"],
        ],
    },
    Class {
        id: "comfort",
        name: Names {
            en: "Comfort",
            zh: "优享",
            ko: "컴포트",
        },
        base: [1800, 6000],
        per_km: [320, 1300],
        per_min: [70, 250],
        eta_extra: 1,
        cars: [
            &["Toyota Camry", "Honda Accord", "BYD Han"],
            &["Hyundai Sonata", "Kia K8"],
        ],
    },
    Class {
        id: "premium",
        name: Names {
            en: "Premium",
            zh: "专车",
            ko: "프리미엄",
        },
        base: [2800, 9000],
        per_km: [500, 2000],
        per_min: [100, 400],
        eta_extra: 3,
        cars: [
            &["Mercedes-Benz E-Class", "BMW 5 Series", "Audi A6L"],
            &["Genesis G80", "Mercedes-Benz E-Class"],
        ],
    },
    Class {
        id: "xl",
        name: Names {
            en: "XL (6 seats)",
            zh: "六座商务",
            ko: "대형 (6인승)",
        },
        base: [2200, 7500],
        per_km: [400, 1600],
        per_min: [80, 300],
        eta_extra: 2,
        cars: [&["Buick GL8", "Toyota Sienna"], &["Kia Carnival", "Hyundai Staria"]],
    },
];

fn class(id: &str) -> ApiResult<&'static Class> {
    CLASSES
        .iter()
        .find(|c| c.id == id.trim().to_lowercase())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown vehicle_class '{id}'; choose one of: economy, comfort, premium, xl"
            ))
        })
}

fn currency_index(currency: &str) -> usize {
    usize::from(currency == "KRW")
}

/// Rush hours (7–9, 17–19) when the pickup time names one, e.g. "08:30",
/// "tomorrow 8am", "18:00".
fn rush_hour(pickup_time: Option<&str>) -> bool {
    let Some(t) = pickup_time else { return false };
    let t = t.to_lowercase();
    let digits: String = t
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty() && s.len() <= 2)
        .unwrap_or("")
        .into();
    let Ok(mut h) = digits.parse::<u32>() else { return false };
    if (t.contains("pm") || t.contains("下午") || t.contains("晚上") || t.contains("오후")) && h < 12 {
        h += 12;
    }
    (7..9).contains(&h) || (17..19).contains(&h)
}

/// One class's quote for a route; deterministic for a seed.
struct Priced {
    class: &'static Class,
    price: i64,
    distance_km: f64,
    trip_minutes: i64,
    eta_pickup_minutes: i64,
}

fn price_route(seed: u64, pickup: &Loc, dropoff: &Loc, pickup_time: Option<&str>, c: &'static Class) -> Priced {
    let straight = cities::distance_km(pickup.coords(), dropoff.coords());
    let distance_km = ((straight * 1.35).max(1.0) * 10.0).round() / 10.0;
    let mut traffic = seeded_rng(seed, &format!("ride-traffic:{}:{}", pickup.id, dropoff.id)).random_range(1.0..1.4);
    if rush_hour(pickup_time) {
        traffic *= 1.25;
    }
    // Longer trips use faster roads.
    let speed_kmh = 22.0 + distance_km.min(40.0) * 0.6;
    let trip_minutes = ((distance_km / speed_kmh * 60.0 * traffic).ceil() as i64).max(3);
    let eta_pickup_minutes =
        seeded_rng(seed, &format!("ride-eta:{}:{}", pickup.id, c.id)).random_range(2..=7) + i64::from(c.eta_extra);
    let k = currency_index(pickup.currency());
    let raw = c.base[k] as f64 + c.per_km[k] as f64 * distance_km + (c.per_min[k] * trip_minutes) as f64;
    let step = if k == 1 { 100.0 } else { 10.0 };
    Priced {
        class: c,
        price: ((raw / step).round() * step) as i64,
        distance_km,
        trip_minutes,
        eta_pickup_minutes,
    }
}

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Quote {
    id: String,
    class: String,
    price: i64,
    currency: String,
    distance_km: f64,
    trip_minutes: i64,
    eta_pickup_minutes: i64,
    pickup: Loc,
    dropoff: Loc,
    pickup_time: Option<String>,
    expires_ms: i64,
}

impl Quote {
    fn class_name(&self) -> &'static str {
        class(&self.class).map(|c| c.name.en).unwrap_or("Ride")
    }
    fn summary(&self) -> String {
        format!(
            "{} ride {} → {}, about {} min",
            self.class_name(),
            self.pickup.name.en,
            self.dropoff.name.en,
            self.trip_minutes
        )
    }
}

const QUOTE_COLS: &str = "q.id, q.class, q.price, q.currency, q.distance_km, q.trip_minutes, q.eta_pickup_minutes,
     q.pickup, q.dropoff, q.pickup_time, q.expires_ms";

fn quote_from_row(r: &rusqlite::Row) -> rusqlite::Result<Quote> {
    let loc = |i: usize| -> rusqlite::Result<Loc> {
        let s: String = r.get(i)?;
        serde_json::from_str(&s)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
    };
    Ok(Quote {
        id: r.get(0)?,
        class: r.get(1)?,
        price: r.get(2)?,
        currency: r.get(3)?,
        distance_km: r.get(4)?,
        trip_minutes: r.get(5)?,
        eta_pickup_minutes: r.get(6)?,
        pickup: loc(7)?,
        dropoff: loc(8)?,
        pickup_time: r.get(9)?,
        expires_ms: r.get(10)?,
    })
}

fn load_quote(ctx: &ServiceCtx, id: &str) -> ApiResult<Quote> {
    ctx.db
        .with(|c| {
            Ok(c.query_row(
                &format!("SELECT {QUOTE_COLS} FROM ride_quotes q WHERE q.id = ?1"),
                [id],
                quote_from_row,
            )
            .optional()?)
        })?
        .ok_or_else(|| ApiError::not_found(format!("no ride quote {id}; get a fresh one with ride_quote")))
}

/// A quote still usable at `now`, or 409 `quote_expired`.
fn live_quote(ctx: &ServiceCtx, id: &str) -> ApiResult<Quote> {
    let q = load_quote(ctx, id)?;
    if ctx.clock.now_ms() > q.expires_ms {
        return Err(ApiError::conflict(
            "quote_expired",
            format!("quote {id} expired (quotes are valid 10 minutes); get a fresh one with ride_quote"),
        ));
    }
    Ok(q)
}

#[derive(Debug, Clone)]
struct Ride {
    id: String,
    quote: Quote,
    created_ms: i64,
    cancelled_ms: Option<i64>,
    cancel_fee: Option<i64>,
    refund: Option<i64>,
}

fn load_ride(ctx: &ServiceCtx, id: &str) -> ApiResult<Ride> {
    ctx.db
        .with(|c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {QUOTE_COLS}, r.id, r.created_ms, r.cancelled_ms, r.cancel_fee, r.refund
                     FROM rides r JOIN ride_quotes q ON q.id = r.quote_id WHERE r.id = ?1"
                ),
                [id],
                |r| {
                    Ok(Ride {
                        quote: quote_from_row(r)?,
                        id: r.get(11)?,
                        created_ms: r.get(12)?,
                        cancelled_ms: r.get(13)?,
                        cancel_fee: r.get(14)?,
                        refund: r.get(15)?,
                    })
                },
            )
            .optional()?)
        })?
        .ok_or_else(|| ApiError::not_found(format!("no ride {id}")))
}

// ---------------------------------------------------------------------------
// Status over time
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingPayment,
    FindingDriver,
    DriverAssigned,
    Arriving,
    InProgress,
    Completed,
    Cancelled,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitingPayment => "awaiting_payment",
            Phase::FindingDriver => "finding_driver",
            Phase::DriverAssigned => "driver_assigned",
            Phase::Arriving => "arriving",
            Phase::InProgress => "in_progress",
            Phase::Completed => "completed",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// When each step happens, counted from the payment.
struct Timeline {
    assigned_ms: i64,
    arriving_ms: i64,
    started_ms: i64,
    completed_ms: i64,
}

fn timeline(q: &Quote, paid_ms: i64) -> Timeline {
    let assigned_ms = paid_ms + ASSIGN_AFTER_MS;
    // The driver is "arriving" for the last minute of the drive to the pickup.
    let at_pickup_ms = assigned_ms + q.eta_pickup_minutes * 60_000;
    let arriving_ms = at_pickup_ms - 60_000;
    let started_ms = at_pickup_ms + BOARDING_MS;
    Timeline {
        assigned_ms,
        arriving_ms,
        started_ms,
        completed_ms: started_ms + q.trip_minutes * 60_000,
    }
}

/// When the ride was paid; a trade that reports no time counts from the
/// ride's creation.
fn paid_at(p: Option<&Payment>, fallback_ms: i64) -> Option<i64> {
    let p = p?;
    (p.status == "paid" || p.status == "refunded").then(|| p.paid_ms.unwrap_or(fallback_ms))
}

fn phase(ride: &Ride, payment: Option<&Payment>, now: i64) -> (Phase, Option<Timeline>) {
    if ride.cancelled_ms.is_some() || payment.is_some_and(|p| p.status == "closed") {
        return (Phase::Cancelled, None);
    }
    let Some(paid_ms) = paid_at(payment, ride.created_ms) else {
        return (Phase::AwaitingPayment, None);
    };
    let t = timeline(&ride.quote, paid_ms);
    let p = if now >= t.completed_ms {
        Phase::Completed
    } else if now >= t.started_ms {
        Phase::InProgress
    } else if now >= t.arriving_ms {
        Phase::Arriving
    } else if now >= t.assigned_ms {
        Phase::DriverAssigned
    } else {
        Phase::FindingDriver
    };
    (p, Some(t))
}

/// The driver and car, seeded by the ride id.
fn driver(seed: u64, ride: &Ride) -> Value {
    const CN: &[(&str, &str, &str)] = &[
        ("Wang Wei", "王伟", "왕웨이"),
        ("Li Na", "李娜", "리나"),
        ("Zhang Lei", "张磊", "장레이"),
        ("Liu Yang", "刘洋", "류양"),
        ("Chen Jie", "陈杰", "천제"),
        ("Zhao Min", "赵敏", "자오민"),
    ];
    const KR: &[(&str, &str, &str)] = &[
        ("Kim Min-jun", "金敏俊", "김민준"),
        ("Lee Seo-yeon", "李瑞妍", "이서연"),
        ("Park Ji-hoon", "朴智勋", "박지훈"),
        ("Choi Yu-na", "崔有娜", "최유나"),
        ("Jung Hyun-woo", "郑贤宇", "정현우"),
    ];
    let mut rng = seeded_rng(seed, &format!("ride-driver:{}", ride.id));
    let korea = ride.quote.currency == "KRW";
    let names = if korea { KR } else { CN };
    let (en, zh, ko) = names[rng.random_range(0..names.len())];
    let cls = class(&ride.quote.class).unwrap_or(&CLASSES[0]);
    let cars = cls.cars[usize::from(korea)];
    let car = cars[rng.random_range(0..cars.len())];
    let plate = if korea {
        const HANGUL: &[&str] = &["가", "나", "다", "라", "마", "바", "사", "아", "자"];
        format!(
            "{}{} {}",
            rng.random_range(10..99),
            HANGUL[rng.random_range(0..HANGUL.len())],
            rng.random_range(1000..9999)
        )
    } else {
        let prefix = match ride.quote.pickup.city.as_str() {
            "beijing" => "京B",
            "hangzhou" => "浙A",
            "shenzhen" => "粤B",
            "guangzhou" => "粤A",
            _ => "沪A",
        };
        let letter = (b'A' + rng.random_range(0..26u8)) as char;
        format!("{prefix}·{letter}{}", rng.random_range(10000..99999))
    };
    let rating = f64::from(rng.random_range(46..=50u32)) / 10.0;
    json!({"name": {"en": en, "zh": zh, "ko": ko}, "plate": plate, "car": car, "rating": rating})
}

fn ride_json(ctx: &ServiceCtx, ride: &Ride, payment: Option<&Payment>) -> Value {
    let now = ctx.clock.now_ms();
    let q = &ride.quote;
    let (ph, t) = phase(ride, payment, now);
    let mut v = json!({
        "ride_id": ride.id,
        "status": ph.name(),
        "summary": q.summary(),
        "class": q.class,
        "pickup": q.pickup.name,
        "dropoff": q.dropoff.name,
        "price": q.price,
        "currency": q.currency,
        "distance_km": q.distance_km,
        "trip_minutes": q.trip_minutes,
        "created_ms": ride.created_ms,
        "payment": payment,
    });
    if let Some(t) = &t {
        let mins = |ms: i64| ((ms - now).max(0) + 59_999) / 60_000;
        match ph {
            Phase::FindingDriver => v["driver_eta_minutes"] = json!(mins(t.assigned_ms) + q.eta_pickup_minutes),
            Phase::DriverAssigned | Phase::Arriving => {
                v["driver_eta_minutes"] = json!(mins(t.arriving_ms + 60_000));
            }
            Phase::InProgress => v["arrival_minutes"] = json!(mins(t.completed_ms)),
            Phase::Completed => v["completed_ms"] = json!(t.completed_ms),
            _ => {}
        }
        if ph != Phase::FindingDriver {
            v["driver"] = driver(ctx.seed, ride);
        }
    }
    if let Some(t) = &q.pickup_time {
        v["pickup_time"] = json!(t);
    }
    if let Some(ms) = ride.cancelled_ms {
        v["cancelled_ms"] = json!(ms);
        v["cancel_fee"] = json!(ride.cancel_fee.unwrap_or(0));
        v["refund"] = json!(ride.refund.unwrap_or(0));
    }
    if ph == Phase::AwaitingPayment {
        v["next"] = json!("pay the payment to dispatch a driver");
    }
    v
}

async fn payment_of(ctx: &ServiceCtx, ride_id: &str) -> ApiResult<Option<Payment>> {
    if ctx.merchant().payment_local(ride_id)?.is_none() {
        return Ok(None);
    }
    ctx.merchant().payment(ride_id).await.map(Some)
}

/// The fee and refund a cancellation would have now, or why it cannot.
fn cancel_terms(ride: &Ride, payment: Option<&Payment>, now: i64) -> ApiResult<(i64, i64)> {
    let (ph, t) = phase(ride, payment, now);
    let q = &ride.quote;
    let fee_rate = if q.currency == "KRW" { 3000 } else { 500 };
    match ph {
        Phase::Cancelled => Err(ApiError::conflict(
            "already_cancelled",
            format!("ride {} is already cancelled", ride.id),
        )),
        Phase::InProgress => Err(ApiError::conflict(
            "ride_in_progress",
            format!("ride {} has started; it can no longer be cancelled", ride.id),
        )),
        Phase::Completed => Err(ApiError::conflict(
            "ride_completed",
            format!("ride {} is already completed", ride.id),
        )),
        Phase::AwaitingPayment => Ok((0, 0)),
        Phase::FindingDriver => Ok((0, q.price)),
        Phase::DriverAssigned | Phase::Arriving => {
            let assigned = t.map(|t| t.assigned_ms).unwrap_or(now);
            let fee = if now - assigned <= FREE_CANCEL_MS {
                0
            } else {
                fee_rate.min(q.price)
            };
            Ok((fee, q.price - fee))
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

pub fn router(ctx: ServiceCtx) -> ApiResult<Router> {
    ctx.db.with(|c| Ok(c.execute_batch(SCHEMA)?))?;
    Ok(Router::new()
        .route("/v1/quotes", post(quotes))
        .route("/v1/rides", post(request))
        .route("/v1/rides/quote", post(request_quote))
        .route("/v1/rides/{ride_id}", get(status))
        .route("/v1/rides/{ride_id}/cancel", post(cancel))
        .route("/v1/rides/{ride_id}/cancel/quote", post(cancel_quote))
        .with_state(ctx))
}

#[derive(Deserialize)]
struct QuoteReq {
    #[serde(default)]
    pickup: Option<String>,
    dropoff: Option<String>,
    #[serde(default)]
    vehicle_class: Option<String>,
    #[serde(default)]
    pickup_time: Option<String>,
}

async fn quotes(State(ctx): State<ServiceCtx>, bytes: Bytes) -> ApiResult<Json<Value>> {
    let req: QuoteReq = body(&bytes)?;
    let dropoff_q = req
        .dropoff
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("dropoff is required: where should the ride go?"))?;
    let pickup_given = req.pickup.as_deref().filter(|s| !s.trim().is_empty());
    let (pickup, assumed) = match pickup_given {
        Some(p) => (resolve_place(p, None)?, false),
        None => (default_loc(), true),
    };
    let dropoff = resolve_place(dropoff_q, Some(&pickup.city))?;
    let straight = cities::distance_km(pickup.coords(), dropoff.coords());
    if straight > MAX_RIDE_KM {
        return Err(ApiError::bad_request(format!(
            "{} → {} is about {:.0} km: too far for a ride; try tickets_search_trains",
            pickup.name.en, dropoff.name.en, straight
        )));
    }
    if straight < 0.2 {
        return Err(ApiError::bad_request(format!(
            "pickup and drop-off are the same place ({}); give a different dropoff",
            dropoff.name.en
        )));
    }
    let classes: Vec<&'static Class> = match req.vehicle_class.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(c) => vec![class(c)?],
        None => CLASSES.iter().collect(),
    };
    let currency = pickup.currency();
    let now = ctx.clock.now_ms();
    let pickup_time = req.pickup_time.filter(|s| !s.trim().is_empty());
    let priced: Vec<(String, Priced)> = classes
        .into_iter()
        .map(|c| {
            (
                new_id("rq"),
                price_route(ctx.seed, &pickup, &dropoff, pickup_time.as_deref(), c),
            )
        })
        .collect();
    let (pj, dj) = (
        serde_json::to_string(&pickup).map_err(|e| ApiError::internal(e.to_string()))?,
        serde_json::to_string(&dropoff).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    ctx.db.tx(|tx| {
        for (id, p) in &priced {
            tx.execute(
                "INSERT INTO ride_quotes (id, class, price, currency, distance_km, trip_minutes, eta_pickup_minutes,
                   pickup, dropoff, pickup_time, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                rusqlite::params![
                    id,
                    p.class.id,
                    p.price,
                    currency,
                    p.distance_km,
                    p.trip_minutes,
                    p.eta_pickup_minutes,
                    pj,
                    dj,
                    pickup_time,
                    now,
                    now + QUOTE_VALID_MS
                ],
            )?;
        }
        Ok(())
    })?;
    let items: Vec<Value> = priced
        .iter()
        .map(|(id, p)| {
            json!({
                "id": id,
                "class": p.class.id,
                "class_name": p.class.name,
                "price": p.price,
                "currency": currency,
                "eta_pickup_minutes": p.eta_pickup_minutes,
                "trip_minutes": p.trip_minutes,
                "distance_km": p.distance_km,
                "pickup": pickup.name,
                "dropoff": dropoff.name,
            })
        })
        .collect();
    let mut v = json!({
        "pickup": pickup.name,
        "dropoff": dropoff.name,
        "pickup_assumed": assumed,
        "count": items.len(),
        "items": items,
        "valid_minutes": QUOTE_VALID_MS / 60_000,
    });
    if assumed {
        v["note"] = json!("no pickup given: assumed the current location, People's Square, Shanghai");
    }
    if let Some(t) = pickup_time {
        v["pickup_time"] = json!(t);
    }
    Ok(Json(v))
}

#[derive(Deserialize)]
struct QuoteRef {
    quote_id: Option<String>,
}

fn quote_id(r: QuoteRef) -> ApiResult<String> {
    r.quote_id
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("quote_id is required: the id of a quote from ride_quote"))
}

async fn request_quote(State(ctx): State<ServiceCtx>, bytes: Bytes) -> ApiResult<Json<Value>> {
    let id = quote_id(body(&bytes)?)?;
    let q = live_quote(&ctx, &id)?;
    Ok(Json(json!({
        "summary": q.summary(),
        "amount": q.price,
        "currency": q.currency,
        "quote_id": q.id,
        "payment": "paid upfront at the quoted price",
    })))
}

async fn request(State(ctx): State<ServiceCtx>, headers: HeaderMap, bytes: Bytes) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    let id = quote_id(body(&bytes)?)?;
    // One ride per quote: asking again answers the ride already requested.
    let existing: Option<String> = ctx.db.with(|c| {
        Ok(
            c.query_row("SELECT id FROM rides WHERE quote_id = ?1", [&id], |r| r.get(0))
                .optional()?,
        )
    })?;
    let ride_id = match existing {
        Some(r) => {
            let q = load_ride(&ctx, &r)?.quote;
            check_terms(confirmed, "the fare", q.price, &q.currency)?;
            r
        }
        None => {
            let q = live_quote(&ctx, &id)?;
            check_terms(confirmed, "the fare", q.price, &q.currency)?;
            let ride_id = new_id("ride");
            let now = ctx.clock.now_ms();
            let inserted = ctx.db.with(|c| {
                Ok(c.execute(
                    "INSERT OR IGNORE INTO rides (id, quote_id, created_ms) VALUES (?1, ?2, ?3)",
                    rusqlite::params![ride_id, id, now],
                )?)
            })?;
            if inserted == 1 {
                ride_id
            } else {
                ctx.db
                    .with(|c| Ok(c.query_row("SELECT id FROM rides WHERE quote_id = ?1", [&id], |r| r.get(0))?))?
            }
        }
    };
    let ride = load_ride(&ctx, &ride_id)?;
    let payment = match payment_of(&ctx, &ride_id).await? {
        Some(p) => p,
        None if ride.cancelled_ms.is_none() => {
            let q = &ride.quote;
            ctx.merchant()
                .open_payment(&ride_id, q.price, &q.currency, &q.summary())
                .await?
        }
        None => {
            return Err(ApiError::conflict(
                "already_cancelled",
                format!("ride {ride_id} was cancelled"),
            ))
        }
    };
    Ok(Json(ride_json(&ctx, &ride, Some(&payment))))
}

async fn status(State(ctx): State<ServiceCtx>, Path(ride_id): Path<String>) -> ApiResult<Json<Value>> {
    let ride = load_ride(&ctx, &ride_id)?;
    let payment = payment_of(&ctx, &ride_id).await?;
    Ok(Json(ride_json(&ctx, &ride, payment.as_ref())))
}

async fn cancel_quote(State(ctx): State<ServiceCtx>, Path(ride_id): Path<String>) -> ApiResult<Json<Value>> {
    let ride = load_ride(&ctx, &ride_id)?;
    let payment = payment_of(&ctx, &ride_id).await?;
    let (fee, refund) = cancel_terms(&ride, payment.as_ref(), ctx.clock.now_ms())?;
    let c = &ride.quote.currency;
    let terms = if fee == 0 {
        "free".to_string()
    } else {
        format!("cancellation fee {}", money(fee, c))
    };
    Ok(Json(json!({
        "summary": format!("Cancel the {}: {terms}, {} refunded", ride.quote.summary(), money(refund, c)),
        "amount": fee,
        "currency": c,
        "refund": refund,
    })))
}

async fn cancel(
    State(ctx): State<ServiceCtx>,
    Path(ride_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    let ride = load_ride(&ctx, &ride_id)?;
    let payment = payment_of(&ctx, &ride_id).await?;
    let (fee, refund) = cancel_terms(&ride, payment.as_ref(), ctx.clock.now_ms())?;
    // Before the refund or the close: a refused cancel changes nothing.
    check_terms(confirmed, "the cancellation fee", fee, &ride.quote.currency)?;
    let m = ctx.merchant();
    let paid = paid_at(payment.as_ref(), ride.created_ms).is_some();
    if paid && refund > 0 {
        m.refund(&ride_id, refund, "cancel").await?;
    } else if payment.is_some() && !paid {
        m.close(&ride_id).await?;
    }
    let now = ctx.clock.now_ms();
    ctx.db.with(|c| {
        c.execute(
            "UPDATE rides SET cancelled_ms = ?2, cancel_fee = ?3, refund = ?4 WHERE id = ?1 AND cancelled_ms IS NULL",
            rusqlite::params![ride_id, now, fee, refund],
        )?;
        Ok(())
    })?;
    let ride = load_ride(&ctx, &ride_id)?;
    let payment = m.payment_local(&ride_id)?;
    Ok(Json(ride_json(&ctx, &ride, payment.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testkit::{check, get, pay, post, post_confirmed, rows, sandbox_in};
    use crate::sandbox::{Sandbox, Service};
    use std::time::Duration;

    fn prices(v: &Value) -> Vec<(String, i64, i64, i64)> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["class"].as_str().unwrap().to_string(),
                    i["price"].as_i64().unwrap(),
                    i["trip_minutes"].as_i64().unwrap(),
                    i["eta_pickup_minutes"].as_i64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn rush_hours_are_recognised() {
        assert!(rush_hour(Some("08:30")));
        assert!(rush_hour(Some("tomorrow 6pm")));
        assert!(!rush_hour(Some("14:00")));
        assert!(!rush_hour(None));
    }

    #[tokio::test]
    async fn quotes_are_deterministic_and_accept_three_languages() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (sandbox_in(d1.path(), 7).await, sandbox_in(d2.path(), 7).await);
        let body = json!({"pickup": "People's Square", "dropoff": "Pudong International Airport"});
        let (s, qa) = post(format!("{}/v1/quotes", a.url(Service::Ride)), body.clone()).await;
        assert_eq!(s, 200, "{qa}");
        let (_, qb) = post(format!("{}/v1/quotes", b.url(Service::Ride)), body).await;
        assert_eq!(qa["count"], 4);
        check("ride_quote", &qa);
        assert_eq!(qa["pickup_assumed"], false);
        assert_eq!(prices(&qa), prices(&qb));
        let first = &qa["items"][0];
        assert_eq!(first["currency"], "CNY");
        assert_eq!(first["dropoff"]["zh"], "浦东国际机场");
        assert!(first["id"].as_str().unwrap().starts_with("rq_"));
        assert!(first["distance_km"].as_f64().unwrap() > 30.0);
        // Same trip in Chinese and Korean names, with the class asked for.
        let (_, zh) = post(
            format!("{}/v1/quotes", a.url(Service::Ride)),
            json!({"pickup": "人民广场", "dropoff": "浦东机场", "vehicle_class": "economy"}),
        )
        .await;
        let (_, ko) = post(
            format!("{}/v1/quotes", a.url(Service::Ride)),
            json!({"pickup": "인민광장", "dropoff": "푸둥 국제공항", "vehicle_class": "economy"}),
        )
        .await;
        assert_eq!(zh["count"], 1);
        assert_eq!(prices(&zh), prices(&ko));
        assert_eq!(prices(&zh)[0], prices(&qa)[0]);
        // Korea is priced in won; no pickup means People's Square (assumed).
        let (_, kr) = post(
            format!("{}/v1/quotes", a.url(Service::Ride)),
            json!({"pickup": "서울역", "dropoff": "강남역"}),
        )
        .await;
        assert_eq!(kr["items"][0]["currency"], "KRW");
        assert_eq!(kr["items"][0]["price"].as_i64().unwrap() % 100, 0);
        let (_, assumed) = post(
            format!("{}/v1/quotes", a.url(Service::Ride)),
            json!({"dropoff": "The Bund"}),
        )
        .await;
        assert_eq!(assumed["pickup_assumed"], true);
        assert_eq!(assumed["pickup"]["en"], "People's Square");
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn bad_places_are_refused_with_a_way_forward() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let url = format!("{}/v1/quotes", sb.url(Service::Ride));
        let (s, e) = post(url.clone(),
            json!({"pickup": "The Bund", "dropoff": "Tiananmen Square"}),
        )
        .await;
        assert_eq!(s, 400);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("tickets_search_trains"),
            "{e}"
        );
        let (s, e) = post(url.clone(), json!({"dropoff": "Atlantis"})).await;
        assert_eq!(s, 400);
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("Atlantis") && msg.contains("People's Square"), "{msg}");
        let (s, _) = post(url.clone(), json!({"dropoff": "PVG", "vehicle_class": "rocket"})).await;
        assert_eq!(s, 400);
        let (s, _) = post(url, json!({"pickup": "PVG"})).await;
        assert_eq!(s, 400);
        // Coordinates work too, and Shanghai → Hangzhou is close enough.
        let (s, v) = post(
            format!("{}/v1/quotes", sb.url(Service::Ride)),
            json!({"pickup": "31.23,121.47", "dropoff": "West Lake"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        sb.stop().await;
    }

    #[tokio::test]
    async fn quotes_expire_after_ten_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let ride = sb.url(Service::Ride);
        let (_, q) = post(
            format!("{ride}/v1/quotes"),
            json!({"dropoff": "PVG", "vehicle_class": "comfort"}),
        )
        .await;
        let id = q["items"][0]["id"].clone();
        let (s, pre) = post(format!("{ride}/v1/rides/quote"), json!({"quote_id": id})).await;
        assert_eq!(s, 200, "{pre}");
        assert_eq!(pre["amount"], q["items"][0]["price"]);
        let summary = pre["summary"].as_str().unwrap();
        assert!(
            summary.starts_with("Comfort ride People's Square → Pudong International Airport, about"),
            "{summary}"
        );
        sb.clock.advance(Duration::from_secs(11 * 60));
        let (s, e) = post(format!("{ride}/v1/rides/quote"), json!({"quote_id": id})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("quote_expired")));
        let (s, e) = post(format!("{ride}/v1/rides"), json!({"quote_id": id})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("quote_expired")));
        let (s, _) = post(format!("{ride}/v1/rides/quote"), json!({"quote_id": "rq_nope"})).await;
        assert_eq!(s, 404);
        sb.stop().await;
    }

    async fn new_ride(sb: &Sandbox, body: Value) -> Value {
        let ride = sb.url(Service::Ride);
        let (_, q) = post(format!("{ride}/v1/quotes"), body).await;
        let (s, r) = post(
            format!("{ride}/v1/rides"),
            json!({"quote_id": q["items"][0]["id"]}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["status"], "awaiting_payment");
        check("ride_request", &r);
        r
    }

    async fn ride_status(sb: &Sandbox, id: &str) -> Value {
        let (s, v) = get(format!("{}/v1/rides/{id}", sb.url(Service::Ride))).await;
        assert_eq!(s, 200, "{v}");
        check("ride_status", &v);
        v
    }

    #[tokio::test]
    async fn a_paid_ride_advances_to_completed_and_an_unpaid_one_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let unpaid = new_ride(&sb, json!({"dropoff": "The Bund"})).await;
        let r = new_ride(&sb, json!({"pickup": "Jing'an Temple", "dropoff": "Lujiazui"})).await;
        let id = r["ride_id"].as_str().unwrap().to_string();
        assert_eq!(r["payment"]["amount"], r["price"]);
        pay(&sb, &r, "alipay").await;
        let v = ride_status(&sb, &id).await;
        assert_eq!(v["status"], "finding_driver");
        assert_eq!(v["payment"]["status"], "paid");
        let mut seen = vec![];
        for _ in 0..40 {
            sb.clock.advance(Duration::from_secs(60));
            let v = ride_status(&sb, &id).await;
            let s = v["status"].as_str().unwrap().to_string();
            if s == "driver_assigned" {
                assert!(v["driver"]["plate"].as_str().unwrap().starts_with("沪A"), "{v}");
                assert!(v["driver"]["name"]["zh"].is_string());
            }
            if seen.last() != Some(&s) {
                seen.push(s);
            }
        }
        assert_eq!(seen, ["driver_assigned", "arriving", "in_progress", "completed"]);
        // The unpaid ride never started, and lapsed when its trade closed
        // unpaid (30 minutes after it was opened).
        let u = ride_status(&sb, unpaid["ride_id"].as_str().unwrap()).await;
        assert_eq!(u["status"], "cancelled", "{u}");
        assert!(u.get("driver").is_none());
        sb.stop().await;
    }

    #[tokio::test]
    async fn cancelling_is_free_early_costs_a_fee_later_and_is_refused_once_started() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let ride_url = sb.url(Service::Ride);
        let body =
            json!({"pickup": "The Bund", "dropoff": "Hongqiao International Airport", "vehicle_class": "economy"});

        // Free right after payment (no driver yet): full refund.
        let r = new_ride(&sb, body.clone()).await;
        let id = r["ride_id"].as_str().unwrap();
        let price = r["price"].as_i64().unwrap();
        pay(&sb, &r, "alipay").await;
        let (s, q) = post(format!("{ride_url}/v1/rides/{id}/cancel/quote"), json!({})).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!((q["amount"].as_i64(), q["refund"].as_i64()), (Some(0), Some(price)));
        let (s, c) = post(format!("{ride_url}/v1/rides/{id}/cancel"), json!({})).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(c["status"], "cancelled");
        check("ride_cancel", &c);
        assert_eq!(c["payment"]["refunded"].as_i64(), Some(price));
        let (s, e) = post(format!("{ride_url}/v1/rides/{id}/cancel"), json!({})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("already_cancelled")));

        // Five minutes after assignment: ¥5 fee, the rest refunded.
        let r = new_ride(&sb, body.clone()).await;
        let id = r["ride_id"].as_str().unwrap();
        pay(&sb, &r, "alipay").await;
        sb.clock.advance(Duration::from_secs(60 + 2 * 60 + 30));
        let v = ride_status(&sb, id).await;
        assert!(
            matches!(v["status"].as_str(), Some("driver_assigned" | "arriving")),
            "{v}"
        );
        let (_, q) = post(format!("{ride_url}/v1/rides/{id}/cancel/quote"), json!({})).await;
        assert_eq!(
            (q["amount"].as_i64(), q["refund"].as_i64()),
            (Some(500), Some(price - 500)),
            "{q}"
        );
        let (s, c) = post(format!("{ride_url}/v1/rides/{id}/cancel"), json!({})).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(
            (c["cancel_fee"].as_i64(), c["refund"].as_i64()),
            (Some(500), Some(price - 500))
        );
        assert_eq!(c["payment"]["refunded"].as_i64(), Some(price - 500));

        // Once the trip is under way: refused.
        let r = new_ride(&sb, body).await;
        let id = r["ride_id"].as_str().unwrap();
        pay(&sb, &r, "alipay").await;
        sb.clock.advance(Duration::from_secs(20 * 60));
        let v = ride_status(&sb, id).await;
        assert_eq!(v["status"], "in_progress", "{v}");
        let (s, e) = post(format!("{ride_url}/v1/rides/{id}/cancel"), json!({})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("ride_in_progress")));

        // An unpaid ride cancels for free and its trade is closed.
        let r = new_ride(&sb, json!({"dropoff": "The Bund"})).await;
        let id = r["ride_id"].as_str().unwrap();
        let (_, q) = post(format!("{ride_url}/v1/rides/{id}/cancel/quote"), json!({})).await;
        assert_eq!((q["amount"].as_i64(), q["refund"].as_i64()), (Some(0), Some(0)));
        let (s, c) = post(format!("{ride_url}/v1/rides/{id}/cancel"), json!({})).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(c["status"], "cancelled");
        sb.stop().await;
    }
    #[tokio::test]
    async fn confirmed_terms_must_match_at_execution() {
        let dir = tempfile::tempdir().unwrap();
        let sb = sandbox_in(dir.path(), 42).await;
        let ride_url = sb.url(Service::Ride);
        let rides = || rows(dir.path(), Service::Ride, "rides");
        let body = json!({"pickup": "The Bund", "dropoff": "Hongqiao International Airport", "vehicle_class": "economy"});
        let (_, qs) = post(format!("{ride_url}/v1/quotes"), body).await;
        let quote = json!({"quote_id": qs["items"][0]["id"]});
        let (_, q) = post(format!("{ride_url}/v1/rides/quote"), quote.clone()).await;
        let price = q["amount"].as_i64().unwrap();

        // A fare other than the quoted one: refused, no ride.
        let (s, e) = post_confirmed(format!("{ride_url}/v1/rides"), quote.clone(), price - 100, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert!(e["error"]["message"].as_str().unwrap().starts_with("the fare is now ¥"), "{e}");
        assert_eq!(rides(), 0);
        let (s, r) = post_confirmed(format!("{ride_url}/v1/rides"), quote, price, "CNY").await;
        assert_eq!((s, r["payment"]["amount"].as_i64()), (200, Some(price)), "{r}");
        let id = r["ride_id"].as_str().unwrap();
        pay(&sb, &r, "alipay").await;

        // Quoted free before a driver; a fee applies by the time of the yes.
        let (_, q) = post(format!("{ride_url}/v1/rides/{id}/cancel/quote"), json!({})).await;
        assert_eq!(q["amount"].as_i64(), Some(0), "{q}");
        sb.clock.advance(Duration::from_secs(60 + 2 * 60 + 30));
        let (s, e) = post_confirmed(format!("{ride_url}/v1/rides/{id}/cancel"), json!({}), 0, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("¥5.00, not the ¥0.00 you confirmed"), "{e}");
        let v = ride_status(&sb, id).await;
        assert!(matches!(v["status"].as_str(), Some("driver_assigned" | "arriving")), "{v}");
        assert_eq!(v["payment"]["refunded"].as_i64().unwrap_or(0), 0, "{v}");
        let (s, c) = post_confirmed(format!("{ride_url}/v1/rides/{id}/cancel"), json!({}), 500, "CNY").await;
        assert_eq!((s, c["status"].as_str(), c["cancel_fee"].as_i64()), (200, Some("cancelled"), Some(500)), "{c}");
        sb.stop().await;
    }
}

