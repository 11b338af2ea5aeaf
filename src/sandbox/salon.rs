//! The hair-salon sandbox mini-program, so the assistant can find a salon,
//! see which stylist is free when, and book (and cancel) an appointment paid
//! through the merchant.
//!
//! Salons, stylists and prices are generated from the seed (one salon near
//! each known place of a city, three stylists each at different levels), so
//! the same seed always gives the same catalog; only bookings live in the
//! database. Each stylist's day runs 10:00–20:00 in 30-minute slots, some
//! seeded busy; a service takes as many consecutive slots as it lasts. A
//! booking is paid in full upfront; cancelling is free more than 24 hours
//! before the appointment and costs half the price after that.

use crate::world::cities::{self, City, Names};
use super::common::{city_param, limit_param, param};
use crate::world::calendar::{date_text, parse_date_loose as parse_ymd, DateError};
use super::core::{new_id, seeded_rng, ApiError, ApiResult};
use super::merchant::Payment;
use super::terms::{check_terms, confirmed_terms};
use super::ride::{body, city_loc, default_loc, resolve_place, Text3};
use crate::world::money::display as money;
use super::ServiceCtx;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use rusqlite::OptionalExtension;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS salon_bookings (
    id TEXT PRIMARY KEY,
    salon_id TEXT NOT NULL,
    stylist_id TEXT NOT NULL,
    service TEXT NOT NULL,
    date TEXT NOT NULL,
    time TEXT NOT NULL,
    start_slot INTEGER NOT NULL,
    slots INTEGER NOT NULL,
    price INTEGER NOT NULL,
    currency TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    cancelled_ms INTEGER,
    cancel_fee INTEGER,
    refund INTEGER);
CREATE INDEX IF NOT EXISTS salon_bookings_day ON salon_bookings(stylist_id, date);";

const OPEN_MINUTE: i64 = 10 * 60;
const SLOT_MINUTES: i64 = 30;
/// 10:00 to 20:00 in 30-minute slots.
const SLOTS: i64 = 20;
const DAY_MS: i64 = 86_400_000;
const FREE_CANCEL_MS: i64 = DAY_MS;
const MAX_DAYS_AHEAD: i64 = 60;

struct Service {
    id: &'static str,
    name: Names,
    minutes: i64,
    /// Base price for a junior stylist: [CNY fen, KRW won].
    price: [i64; 2],
}

static SERVICES: &[Service] = &[
    Service {
        id: "haircut",
        name: Names {
            en: "Haircut",
            zh: "剪发",
            ko: "커트",
        },
        minutes: 60,
        price: [6800, 20000],
    },
    Service {
        id: "color",
        name: Names {
            en: "Hair colour",
            zh: "染发",
            ko: "염색",
        },
        minutes: 120,
        price: [32800, 80000],
    },
    Service {
        id: "perm",
        name: Names {
            en: "Perm",
            zh: "烫发",
            ko: "펌",
        },
        minutes: 150,
        price: [42800, 100000],
    },
    Service {
        id: "wash",
        name: Names {
            en: "Wash and blow-dry",
            zh: "洗吹",
            ko: "샴푸·드라이",
        },
        minutes: 30,
        price: [3800, 12000],
    },
];

fn service(id: &str) -> ApiResult<&'static Service> {
    let q = cities::fold(id);
    SERVICES
        .iter()
        .find(|s| s.id == q || s.name.all().iter().any(|n| cities::fold(n) == q))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown service '{id}'; choose one of: haircut, color, perm, wash"
            ))
        })
}

const BRANDS: &[(&str, &str, &str)] = &[
    ("Mirror Hair Studio", "镜面美发工作室", "미러 헤어 스튜디오"),
    ("Scissors & Co.", "剪刀与伙伴", "시저스 앤 코"),
    ("Blossom Salon", "花开沙龙", "블로썸 살롱"),
    ("Urban Cut", "都市剪艺", "어반 컷"),
    ("Silk Hair Lab", "丝绸发艺", "실크 헤어 랩"),
    ("Maison Coiffure", "法式造型屋", "메종 쿠아퓌르"),
    ("Cloud Nine Hair", "云端造型", "클라우드 나인 헤어"),
];

const STYLISTS_CN: &[(&str, &str, &str)] = &[
    ("Tony", "Tony老师", "토니"),
    ("Kevin", "Kevin老师", "케빈"),
    ("Amy", "Amy老师", "에이미"),
    ("Leo", "Leo老师", "레오"),
    ("Coco", "Coco老师", "코코"),
    ("Jason", "Jason老师", "제이슨"),
    ("Lily", "Lily老师", "릴리"),
];

const STYLISTS_KR: &[(&str, &str, &str)] = &[
    ("Ji-woo", "智宇", "지우"),
    ("Min-seo", "敏书", "민서"),
    ("Seo-yeon", "瑞妍", "서연"),
    ("Hyun-woo", "贤宇", "현우"),
    ("Ha-eun", "夏恩", "하은"),
    ("Do-yun", "道允", "도윤"),
    ("Yu-na", "有娜", "유나"),
];

/// Levels and their price multipliers (percent).
const LEVELS: &[(&str, &str, &str, &str, i64)] = &[
    ("director", "Director", "总监", "원장", 200),
    ("senior", "Senior stylist", "资深发型师", "실장", 150),
    ("stylist", "Stylist", "发型师", "디자이너", 100),
];

struct Stylist {
    id: String,
    name: Text3,
    level: usize,
    /// Price per service id, minor units.
    prices: Vec<(&'static str, i64)>,
}

impl Stylist {
    fn price(&self, service: &str) -> i64 {
        self.prices
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, p)| *p)
            .unwrap_or(0)
    }
    fn json(&self) -> Value {
        let (level, en, zh, ko, _) = LEVELS[self.level];
        json!({"stylist_id": self.id, "name": self.name, "level": level, "level_name": {"en": en, "zh": zh, "ko": ko}})
    }
}

struct Salon {
    id: String,
    name: Text3,
    area: Text3,
    city: &'static City,
    lat: f64,
    lon: f64,
    rating: f64,
    stylists: Vec<Stylist>,
}

impl Salon {
    fn stylist(&self, id: &str) -> ApiResult<&Stylist> {
        self.stylists.iter().find(|s| s.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.stylists.iter().map(|s| s.id.as_str()).collect();
            ApiError::not_found(format!(
                "no stylist {id} at {}; its stylists are: {}",
                self.id,
                ids.join(", ")
            ))
        })
    }
}

/// One salon near each known place of every city; deterministic for a seed.
fn catalog(seed: u64) -> Vec<Salon> {
    let mut out = Vec::new();
    for c in cities::CITIES {
        let korea = c.currency == "KRW";
        let k = usize::from(korea);
        let mut rng = seeded_rng(seed, &format!("salons:{}", c.id));
        let brand0 = rng.random_range(0..BRANDS.len());
        for (i, p) in c.places.iter().enumerate() {
            let (en, zh, ko) = BRANDS[(brand0 + i) % BRANDS.len()];
            let id = format!("{}-salon-{}", c.id, i + 1);
            let factor = rng.random_range(80..=140i64);
            let names = if korea { STYLISTS_KR } else { STYLISTS_CN };
            let first = rng.random_range(0..names.len());
            let stylists = (0..3)
                .map(|j| {
                    let (sen, szh, sko) = names[(first + j * 2) % names.len()];
                    let level = j;
                    let mult = LEVELS[level].4;
                    let step = if korea { 1000 } else { 100 };
                    let prices = SERVICES
                        .iter()
                        .map(|s| (s.id, (s.price[k] * factor * mult / 10_000 + step / 2) / step * step))
                        .collect();
                    Stylist {
                        id: format!("{id}-s{}", j + 1),
                        name: Text3 {
                            en: sen.into(),
                            zh: szh.into(),
                            ko: sko.into(),
                        },
                        level,
                        prices,
                    }
                })
                .collect();
            out.push(Salon {
                id,
                name: Text3 {
                    en: format!("{en} · {}", p.name.en),
                    zh: format!("{zh}（{}店）", p.name.zh),
                    ko: format!("{ko} {}점", p.name.ko),
                },
                area: p.name.into(),
                city: c,
                lat: p.lat + rng.random_range(-0.003..0.003),
                lon: p.lon + rng.random_range(-0.003..0.003),
                rating: f64::from(rng.random_range(40..=50u32)) / 10.0,
                stylists,
            });
        }
    }
    out
}

#[derive(Clone)]
struct App {
    ctx: ServiceCtx,
    salons: Arc<Vec<Salon>>,
}

impl App {
    fn salon(&self, id: &str) -> ApiResult<&Salon> {
        self.salons
            .iter()
            .find(|s| s.id == id.trim())
            .ok_or_else(|| ApiError::not_found(format!("no salon {id}; find one with salon_search")))
    }
}

// ---------------------------------------------------------------------------
// Dates and slots
// ---------------------------------------------------------------------------

/// A `YYYY-MM-DD` date as a day number, checked to be today or later and
/// within two months.
fn parse_date(s: &str, now_ms: i64) -> ApiResult<i64> {
    let today = now_ms.div_euclid(DAY_MS);
    let bad = || {
        ApiError::bad_request(format!(
            "date '{s}' must be YYYY-MM-DD, e.g. {} (today)",
            date_text(today)
        ))
    };
    let day = parse_ymd(s).map_err(|e| match e {
        DateError::Malformed => bad(),
        DateError::NoSuchDay => ApiError::bad_request(format!("date '{s}' does not exist; check the day of the month")),
    })?;
    if day < today {
        return Err(ApiError::bad_request(format!(
            "{s} is in the past; today is {}",
            date_text(today)
        )));
    }
    if day > today + MAX_DAYS_AHEAD {
        return Err(ApiError::bad_request(format!(
            "{s} is too far ahead; bookings open {MAX_DAYS_AHEAD} days in advance"
        )));
    }
    Ok(day)
}

fn slot_time(slot: i64) -> String {
    let m = OPEN_MINUTE + slot * SLOT_MINUTES;
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn parse_time(s: &str) -> ApiResult<i64> {
    let bad = || {
        ApiError::bad_request(format!(
            "time '{s}' must be HH:MM on the half hour between 10:00 and 19:30"
        ))
    };
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    let minute = h * 60 + m;
    if m % SLOT_MINUTES != 0 || !(OPEN_MINUTE..OPEN_MINUTE + SLOTS * SLOT_MINUTES).contains(&minute) {
        return Err(bad());
    }
    Ok((minute - OPEN_MINUTE) / SLOT_MINUTES)
}

fn slot_start_ms(day: i64, slot: i64) -> i64 {
    day * DAY_MS + (OPEN_MINUTE + slot * SLOT_MINUTES) * 60_000
}

fn slots_for(s: &Service) -> i64 {
    (s.minutes + SLOT_MINUTES - 1) / SLOT_MINUTES
}

/// The stylist's seeded busy slots that day (other customers).
fn seeded_busy(seed: u64, stylist_id: &str, day: i64) -> HashSet<i64> {
    let mut rng = seeded_rng(seed, &format!("salon-busy:{stylist_id}:{day}"));
    (0..SLOTS).filter(|_| rng.random_bool(0.35)).collect()
}

/// Slots taken by bookings made here, not cancelled.
fn booked(conn: &rusqlite::Connection, stylist_id: &str, day: i64) -> ApiResult<HashSet<i64>> {
    let mut st = conn.prepare(
        "SELECT start_slot, slots FROM salon_bookings WHERE stylist_id = ?1 AND date = ?2 AND cancelled_ms IS NULL",
    )?;
    let rows: Vec<(i64, i64)> = st
        .query_map(rusqlite::params![stylist_id, date_text(day)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows.into_iter().flat_map(|(a, n)| a..a + n).collect())
}

/// Start slots where the whole service fits, not yet begun.
fn free_starts(taken: &HashSet<i64>, need: i64, day: i64, now_ms: i64) -> Vec<i64> {
    (0..=SLOTS - need)
        .filter(|&s| (s..s + need).all(|x| !taken.contains(&x)) && slot_start_ms(day, s) > now_ms)
        .collect()
}

fn taken(app: &App, conn: &rusqlite::Connection, stylist_id: &str, day: i64) -> ApiResult<HashSet<i64>> {
    let mut t = seeded_busy(app.ctx.seed, stylist_id, day);
    t.extend(booked(conn, stylist_id, day)?);
    Ok(t)
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

pub fn router(ctx: ServiceCtx) -> ApiResult<Router> {
    ctx.db.with(|c| Ok(c.execute_batch(SCHEMA)?))?;
    let app = App {
        salons: Arc::new(catalog(ctx.seed)),
        ctx,
    };
    Ok(Router::new()
        .route("/v1/salons", get(search))
        .route("/v1/salons/{salon_id}/slots", get(slots))
        .route("/v1/bookings", post(book))
        .route("/v1/bookings/quote", post(book_quote))
        .route("/v1/bookings/{booking_id}", get(get_booking))
        .route("/v1/bookings/{booking_id}/cancel", post(cancel))
        .route("/v1/bookings/{booking_id}/cancel/quote", post(cancel_quote))
        .with_state(app))
}

async fn search(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let city = city_param(&q)?;
    let svc = service(param(&q, "service").unwrap_or("haircut"))?;
    let limit = limit_param(&q)?;
    let (near, assumed) = match (param(&q, "near"), city) {
        (Some(n), c) => (resolve_place(n, c.map(|c| c.id))?, false),
        (None, Some(c)) => (city_loc(c), false),
        (None, None) => (default_loc(), true),
    };
    let mut found: Vec<(f64, &Salon)> = app
        .salons
        .iter()
        .filter(|s| s.city.id == near.city)
        .map(|s| (cities::distance_km(near.coords(), (s.lat, s.lon)), s))
        .collect();
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    let items: Vec<Value> = found
        .into_iter()
        .take(limit)
        .map(|(d, s)| {
            let from = s.stylists.iter().map(|st| st.price(svc.id)).min().unwrap_or(0);
            json!({
                "id": s.id,
                "name": s.name,
                "area": s.area,
                "distance_km": (d * 10.0).round() / 10.0,
                "rating": s.rating,
                "service": svc.id,
                "price_from": from,
                "currency": s.city.currency,
                "stylists": s.stylists.len(),
            })
        })
        .collect();
    let mut v = json!({
        "near": near.name,
        "near_assumed": assumed,
        "city": near.city,
        "service": svc.id,
        "count": items.len(),
        "items": items,
    });
    if assumed {
        v["note"] = json!("no city or place given: assumed the current location, People's Square, Shanghai");
    }
    Ok(Json(v))
}

async fn slots(
    State(app): State<App>,
    Path(salon_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let salon = app.salon(&salon_id)?;
    let now = app.ctx.clock.now_ms();
    let day = match param(&q, "date") {
        Some(d) => parse_date(d, now)?,
        None => now.div_euclid(DAY_MS),
    };
    let svc = service(param(&q, "service").unwrap_or("haircut"))?;
    let stylists: Vec<&Stylist> = match param(&q, "stylist_id") {
        Some(id) => vec![salon.stylist(id)?],
        None => salon.stylists.iter().collect(),
    };
    let need = slots_for(svc);
    let items: Vec<Value> = app.ctx.db.with(|c| {
        stylists
            .iter()
            .map(|st| {
                let t = taken(&app, c, &st.id, day)?;
                let free: Vec<String> = free_starts(&t, need, day, now).into_iter().map(slot_time).collect();
                let mut v = st.json();
                v["price"] = json!(st.price(svc.id));
                v["free_times"] = json!(free);
                Ok(v)
            })
            .collect()
    })?;
    Ok(Json(json!({
        "salon_id": salon.id,
        "salon": salon.name,
        "date": date_text(day),
        "service": svc.id,
        "service_name": svc.name,
        "duration_minutes": svc.minutes,
        "currency": salon.city.currency,
        "count": items.len(),
        "items": items,
    })))
}

#[derive(Deserialize)]
struct BookReq {
    salon_id: Option<String>,
    stylist_id: Option<String>,
    service: Option<String>,
    date: Option<String>,
    time: Option<String>,
}

/// A checked booking request.
struct Plan<'a> {
    salon: &'a Salon,
    stylist: &'a Stylist,
    service: &'static Service,
    day: i64,
    slot: i64,
    price: i64,
}

impl Plan<'_> {
    fn summary(&self) -> String {
        format!(
            "{} with {} ({}) at {}, {} {}–{}; full price {} paid now",
            self.service.name.en,
            self.stylist.name.en,
            LEVELS[self.stylist.level].1,
            self.salon.name.en,
            date_text(self.day),
            slot_time(self.slot),
            {
                let end = OPEN_MINUTE + self.slot * SLOT_MINUTES + self.service.minutes;
                format!("{:02}:{:02}", end / 60, end % 60)
            },
            money(self.price, self.salon.city.currency)
        )
    }
}

fn plan<'a>(app: &'a App, r: &BookReq) -> ApiResult<Plan<'a>> {
    let need = |v: &Option<String>, what: &str| -> ApiResult<String> {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::bad_request(format!("{what} is required (see salon_slots)")))
    };
    let salon = app.salon(&need(&r.salon_id, "salon_id")?)?;
    let stylist = salon.stylist(&need(&r.stylist_id, "stylist_id")?)?;
    let service = service(&need(&r.service, "service")?)?;
    let now = app.ctx.clock.now_ms();
    let day = parse_date(&need(&r.date, "date")?, now)?;
    let slot = parse_time(&need(&r.time, "time")?)?;
    if slot + slots_for(service) > SLOTS {
        return Err(ApiError::bad_request(format!(
            "a {} takes {} minutes and the salon closes at 20:00; pick an earlier time",
            service.name.en, service.minutes
        )));
    }
    if slot_start_ms(day, slot) <= now {
        return Err(ApiError::bad_request(format!(
            "{} {} has already passed",
            date_text(day),
            slot_time(slot)
        )));
    }
    Ok(Plan {
        salon,
        stylist,
        service,
        day,
        slot,
        price: stylist.price(service.id),
    })
}

/// 409 `slot_taken` unless the whole service fits in free slots.
fn check_free(app: &App, conn: &rusqlite::Connection, p: &Plan) -> ApiResult<()> {
    let t = taken(app, conn, &p.stylist.id, p.day)?;
    let need = slots_for(p.service);
    if (p.slot..p.slot + need).any(|s| t.contains(&s)) {
        let free: Vec<String> = free_starts(&t, need, p.day, app.ctx.clock.now_ms())
            .into_iter()
            .map(slot_time)
            .collect();
        let alt = if free.is_empty() {
            "no other time fits that day; try another stylist or date".to_string()
        } else {
            format!("free times that day: {}", free.join(", "))
        };
        return Err(ApiError::conflict(
            "slot_taken",
            format!(
                "{} is not free at {} on {}; {alt}",
                p.stylist.name.en,
                slot_time(p.slot),
                date_text(p.day)
            ),
        ));
    }
    Ok(())
}

async fn book_quote(State(app): State<App>, bytes: Bytes) -> ApiResult<Json<Value>> {
    let r: BookReq = body(&bytes)?;
    let p = plan(&app, &r)?;
    app.ctx.db.with(|c| check_free(&app, c, &p))?;
    Ok(Json(json!({
        "summary": p.summary(),
        "amount": p.price,
        "currency": p.salon.city.currency,
    })))
}

async fn book(State(app): State<App>, headers: HeaderMap, bytes: Bytes) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    let r: BookReq = body(&bytes)?;
    let p = plan(&app, &r)?;
    let id = new_id("bkg");
    let now = app.ctx.clock.now_ms();
    let currency = p.salon.city.currency;
    app.ctx.db.tx(|tx| {
        check_free(&app, tx, &p)?;
        check_terms(confirmed, "the price", p.price, currency)?;
        tx.execute(
            "INSERT INTO salon_bookings (id, salon_id, stylist_id, service, date, time, start_slot, slots, price,
               currency, start_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            rusqlite::params![
                id,
                p.salon.id,
                p.stylist.id,
                p.service.id,
                date_text(p.day),
                slot_time(p.slot),
                p.slot,
                slots_for(p.service),
                p.price,
                currency,
                slot_start_ms(p.day, p.slot),
                now
            ],
        )?;
        Ok(())
    })?;
    let payment = match app
        .ctx
        .merchant()
        .open_payment(&id, p.price, currency, &p.summary())
        .await
    {
        Ok(pay) => pay,
        Err(e) => {
            // Without a payment the slot must not stay held.
            app.ctx.db.with(|c| {
                c.execute(
                    "UPDATE salon_bookings SET cancelled_ms = ?2, cancel_fee = 0, refund = 0 WHERE id = ?1",
                    rusqlite::params![id, now],
                )?;
                Ok(())
            })?;
            return Err(e);
        }
    };
    let b = load(&app, &id)?;
    Ok(Json(booking_json(&app, &b, Some(&payment))))
}

struct Booking {
    id: String,
    salon_id: String,
    stylist_id: String,
    service: String,
    date: String,
    time: String,
    slots: i64,
    price: i64,
    currency: String,
    start_ms: i64,
    cancelled_ms: Option<i64>,
    cancel_fee: Option<i64>,
    refund: Option<i64>,
}

fn load(app: &App, id: &str) -> ApiResult<Booking> {
    app.ctx
        .db
        .with(|c| {
            Ok(c.query_row(
                "SELECT id, salon_id, stylist_id, service, date, time, slots, price, currency, start_ms,
                        cancelled_ms, cancel_fee, refund
                 FROM salon_bookings WHERE id = ?1",
                [id],
                |r| {
                    Ok(Booking {
                        id: r.get(0)?,
                        salon_id: r.get(1)?,
                        stylist_id: r.get(2)?,
                        service: r.get(3)?,
                        date: r.get(4)?,
                        time: r.get(5)?,
                        slots: r.get(6)?,
                        price: r.get(7)?,
                        currency: r.get(8)?,
                        start_ms: r.get(9)?,
                        cancelled_ms: r.get(10)?,
                        cancel_fee: r.get(11)?,
                        refund: r.get(12)?,
                    })
                },
            )
            .optional()?)
        })?
        .ok_or_else(|| ApiError::not_found(format!("no booking {id}")))
}

fn is_paid(p: Option<&Payment>) -> bool {
    p.is_some_and(|p| p.status == "paid" || p.status == "refunded")
}

fn booking_status(b: &Booking, payment: Option<&Payment>, now: i64) -> &'static str {
    if b.cancelled_ms.is_some() || payment.is_some_and(|p| p.status == "closed") {
        "cancelled"
    } else if !is_paid(payment) {
        "awaiting_payment"
    } else if now < b.start_ms {
        "confirmed"
    } else if now < b.start_ms + b.slots * SLOT_MINUTES * 60_000 {
        "in_service"
    } else {
        "completed"
    }
}

fn booking_json(app: &App, b: &Booking, payment: Option<&Payment>) -> Value {
    let salon = app.salon(&b.salon_id).ok();
    let stylist = salon.and_then(|s| s.stylist(&b.stylist_id).ok());
    let mut v = json!({
        "booking_id": b.id,
        "status": booking_status(b, payment, app.ctx.clock.now_ms()),
        "salon_id": b.salon_id,
        "salon": salon.map(|s| &s.name),
        "stylist_id": b.stylist_id,
        "stylist": stylist.map(|s| &s.name),
        "service": b.service,
        "date": b.date,
        "time": b.time,
        "duration_minutes": b.slots * SLOT_MINUTES,
        "price": b.price,
        "currency": b.currency,
        "payment": payment,
    });
    if let Some(ms) = b.cancelled_ms {
        v["cancelled_ms"] = json!(ms);
        v["cancel_fee"] = json!(b.cancel_fee.unwrap_or(0));
        v["refund"] = json!(b.refund.unwrap_or(0));
    }
    v
}

async fn payment_of(app: &App, id: &str) -> ApiResult<Option<Payment>> {
    let m = app.ctx.merchant();
    if m.payment_local(id)?.is_none() {
        return Ok(None);
    }
    m.payment(id).await.map(Some)
}

async fn get_booking(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let b = load(&app, &id)?;
    let p = payment_of(&app, &id).await?;
    Ok(Json(booking_json(&app, &b, p.as_ref())))
}

/// Fee and refund of cancelling now, or why it cannot be done.
fn cancel_terms(b: &Booking, payment: Option<&Payment>, now: i64) -> ApiResult<(i64, i64)> {
    match booking_status(b, payment, now) {
        "cancelled" => Err(ApiError::conflict(
            "already_cancelled",
            format!("booking {} is already cancelled", b.id),
        )),
        "in_service" | "completed" => Err(ApiError::conflict(
            "appointment_started",
            format!(
                "the appointment of booking {} has already started; it can no longer be cancelled",
                b.id
            ),
        )),
        "awaiting_payment" => Ok((0, 0)),
        _ => {
            let fee = if b.start_ms - now > FREE_CANCEL_MS {
                0
            } else {
                b.price / 2
            };
            Ok((fee, b.price - fee))
        }
    }
}

async fn cancel_quote(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let b = load(&app, &id)?;
    let p = payment_of(&app, &id).await?;
    let (fee, refund) = cancel_terms(&b, p.as_ref(), app.ctx.clock.now_ms())?;
    let terms = if fee == 0 {
        "free".to_string()
    } else {
        format!(
            "fee {} (half the price, less than 24 h before)",
            money(fee, &b.currency)
        )
    };
    Ok(Json(json!({
        "summary": format!(
            "Cancel the {} on {} at {}: {terms}, {} refunded",
            b.service, b.date, b.time, money(refund, &b.currency)
        ),
        "amount": fee,
        "currency": b.currency,
        "refund": refund,
    })))
}

async fn cancel(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    let b = load(&app, &id)?;
    let p = payment_of(&app, &id).await?;
    let (fee, refund) = cancel_terms(&b, p.as_ref(), app.ctx.clock.now_ms())?;
    // Before the refund or the close: a refused cancel changes nothing.
    check_terms(confirmed, "the cancellation fee", fee, &b.currency)?;
    let m = app.ctx.merchant();
    if is_paid(p.as_ref()) {
        if refund > 0 {
            m.refund(&id, refund, "cancel").await?;
        }
    } else if p.is_some() {
        m.close(&id).await?;
    }
    let now = app.ctx.clock.now_ms();
    app.ctx.db.with(|c| {
        c.execute(
            "UPDATE salon_bookings SET cancelled_ms = ?2, cancel_fee = ?3, refund = ?4 WHERE id = ?1 AND cancelled_ms IS NULL",
            rusqlite::params![id, now, fee, refund],
        )?;
        Ok(())
    })?;
    let b = load(&app, &id)?;
    let p = m.payment_local(&id)?;
    Ok(Json(booking_json(&app, &b, p.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testkit::{check, get, pay, post, post_confirmed, rows, sandbox};
    use crate::sandbox::{Sandbox, Service as Svc};
    use std::time::Duration;

    fn day_after(sb: &Sandbox, days: i64) -> String {
        date_text(sb.clock.now_ms().div_euclid(DAY_MS) + days)
    }

    #[test]
    fn dates_round_trip_and_the_catalog_is_seeded() {
        let day = parse_ymd("2025-03-10").unwrap();
        let now = day * DAY_MS + 3_600_000;
        assert!(parse_date("2025-02-30", now).unwrap_err().message.contains("does not exist"));
        assert_eq!(parse_date("2025-3-10", now).unwrap(), day);
        assert!(parse_date("25-03-10", now).unwrap_err().message.contains("YYYY-MM-DD"));
        assert!(parse_date("2025-03-09", now).unwrap_err().message.contains("past"));
        assert_eq!(parse_date("2025-03-10", now).unwrap(), day);
        assert_eq!(parse_time("10:00").unwrap(), 0);
        assert_eq!(parse_time("19:30").unwrap(), 19);
        assert!(parse_time("20:00").is_err() && parse_time("10:15").is_err());
        let (a, b) = (catalog(5), catalog(5));
        let prices = |c: &[Salon]| -> Vec<i64> {
            c.iter()
                .flat_map(|s| s.stylists.iter().map(|st| st.price("haircut")))
                .collect()
        };
        assert_eq!(prices(&a), prices(&b));
        assert_eq!(
            a.iter().map(|s| s.name.zh.clone()).collect::<Vec<_>>(),
            b.iter().map(|s| s.name.zh.clone()).collect::<Vec<_>>()
        );
        assert_eq!(seeded_busy(5, "x", 1), seeded_busy(5, "x", 1));
    }

    #[tokio::test]
    async fn search_slots_book_pay_double_booking_and_cancel() {
        let (_dir, sb) = sandbox().await;
        let url = sb.url(Svc::Salon);

        let (s, found) = get(format!("{url}/v1/salons?city=上海&near=The%20Bund&service=perm")).await;
        assert_eq!(s, 200, "{found}");
        assert_eq!(found["items"][0]["area"]["en"], "The Bund");
        assert_eq!(found["items"][0]["currency"], "CNY");
        check("salon_search", &found);
        let salon = found["items"][0]["id"].as_str().unwrap().to_string();
        let (s, found_ko) = get(format!("{url}/v1/salons?city=서울")).await;
        assert_eq!(s, 200);
        assert_eq!(found_ko["items"][0]["currency"], "KRW");

        let date = day_after(&sb, 3);
        let (s, slots) = get(format!("{url}/v1/salons/{salon}/slots?date={date}&service=haircut"),
        )
        .await;
        assert_eq!(s, 200, "{slots}");
        assert_eq!(slots["count"], 3);
        check("salon_slots", &slots);
        let st = slots["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| !s["free_times"].as_array().unwrap().is_empty())
            .expect("some stylist is free")
            .clone();
        let stylist = st["stylist_id"].as_str().unwrap();
        let time = st["free_times"][0].as_str().unwrap();
        let req = json!({"salon_id": salon, "stylist_id": stylist, "service": "haircut", "date": date, "time": time});

        let (s, q) = post(format!("{url}/v1/bookings/quote"), req.clone()).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!(q["amount"], st["price"]);
        assert!(q["summary"].as_str().unwrap().contains("full price"), "{q}");
        let (s, b) = post(format!("{url}/v1/bookings"), req.clone()).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["status"], "awaiting_payment");
        check("salon_book", &b);
        let id = b["booking_id"].as_str().unwrap().to_string();

        // The slot is taken now: booking or quoting it again is refused.
        let (s, e) = post(format!("{url}/v1/bookings"), req.clone()).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("slot_taken")), "{e}");
        let (s, _) = post(format!("{url}/v1/bookings/quote"), req.clone()).await;
        assert_eq!(s, 409);
        let (_, slots) = get(format!("{url}/v1/salons/{salon}/slots?date={date}&stylist_id={stylist}"),
        )
        .await;
        assert!(!slots["items"][0]["free_times"]
            .as_array()
            .unwrap()
            .contains(&json!(time)));

        pay(&sb, &b, "alipay").await;
        let (_, b) = get(format!("{url}/v1/bookings/{id}")).await;
        assert_eq!(b["status"], "confirmed", "{b}");

        // Three days ahead: free to cancel, full refund; the slot frees up.
        let price = b["price"].as_i64().unwrap();
        let (_, cq) = post(format!("{url}/v1/bookings/{id}/cancel/quote"), json!({})).await;
        assert_eq!(
            (cq["amount"].as_i64(), cq["refund"].as_i64()),
            (Some(0), Some(price)),
            "{cq}"
        );
        let (s, c) = post(format!("{url}/v1/bookings/{id}/cancel"), json!({})).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(c["status"], "cancelled");
        check("salon_cancel", &c);
        assert_eq!(c["payment"]["refunded"].as_i64(), Some(price));
        let (s, _) = post(format!("{url}/v1/bookings/quote"), req.clone()).await;
        assert_eq!(s, 200);

        // Booked again and cancelled within 24 hours: half the price.
        let (_, b) = post(format!("{url}/v1/bookings"), req).await;
        let id = b["booking_id"].as_str().unwrap();
        pay(&sb, &b, "alipay").await;
        // Twelve hours before the appointment.
        let start = slot_start_ms(parse_date(&date, sb.clock.now_ms()).unwrap(), parse_time(time).unwrap());
        let until = start - sb.clock.now_ms() - 12 * 3_600_000;
        sb.clock.advance(Duration::from_millis(until as u64));
        let (_, cq) = post(format!("{url}/v1/bookings/{id}/cancel/quote"), json!({})).await;
        assert_eq!(
            (cq["amount"].as_i64(), cq["refund"].as_i64()),
            (Some(price / 2), Some(price - price / 2)),
            "{cq}"
        );
        let (s, c) = post(format!("{url}/v1/bookings/{id}/cancel"), json!({})).await;
        assert_eq!(s, 200, "{c}");
        assert_eq!(c["refund"].as_i64(), Some(price - price / 2));
        let (s, e) = post(format!("{url}/v1/bookings/{id}/cancel"), json!({})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("already_cancelled")));

        // Bad input gets a 400 that says what to do.
        let (s, e) = get(format!("{url}/v1/salons/{salon}/slots?date=2001-01-01")).await;
        assert_eq!(s, 400);
        assert!(e["error"]["message"].as_str().unwrap().contains("today is"));
        let (s, _) = get(format!("{url}/v1/salons/nowhere/slots")).await;
        assert_eq!(s, 404);
        let (s, _) = post(
            format!("{url}/v1/bookings/quote"),
            json!({"salon_id": salon, "stylist_id": stylist, "service": "perm", "date": date, "time": "19:00"}),
        )
        .await;
        assert_eq!(s, 400);
        sb.stop().await;
    }
    #[tokio::test]
    async fn confirmed_terms_must_match_at_execution() {
        let (dir, sb) = sandbox().await;
        let url = sb.url(Svc::Salon);
        let bookings = || rows(dir.path(), Svc::Salon, "salon_bookings");
        let (_, found) = get(format!("{url}/v1/salons?city=Shanghai&service=haircut")).await;
        let salon = found["items"][0]["id"].as_str().unwrap().to_string();
        let date = day_after(&sb, 2);
        let (_, slots) = get(format!("{url}/v1/salons/{salon}/slots?date={date}&service=haircut")).await;
        let st = slots["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| !s["free_times"].as_array().unwrap().is_empty())
            .expect("some stylist is free")
            .clone();
        let time = st["free_times"][0].as_str().unwrap();
        let req = json!({"salon_id": salon, "stylist_id": st["stylist_id"], "service": "haircut", "date": date, "time": time});
        let (_, q) = post(format!("{url}/v1/bookings/quote"), req.clone()).await;
        let price = q["amount"].as_i64().unwrap();

        // Not the confirmed price: refused, nothing booked.
        let (s, e) = post_confirmed(format!("{url}/v1/bookings"), req.clone(), price + 1000, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert_eq!(bookings(), 0);
        let (s, b) = post_confirmed(format!("{url}/v1/bookings"), req, price, "CNY").await;
        assert_eq!((s, b["price"].as_i64()), (200, Some(price)), "{b}");
        let id = b["booking_id"].as_str().unwrap();
        pay(&sb, &b, "alipay").await;

        // Quoted free two days ahead; confirmed twelve hours before the appointment.
        let (_, cq) = post(format!("{url}/v1/bookings/{id}/cancel/quote"), json!({})).await;
        assert_eq!(cq["amount"].as_i64(), Some(0), "{cq}");
        let start = slot_start_ms(parse_date(&date, sb.clock.now_ms()).unwrap(), parse_time(time).unwrap());
        sb.clock.advance(Duration::from_millis((start - sb.clock.now_ms() - 12 * 3_600_000) as u64));
        let (s, e) = post_confirmed(format!("{url}/v1/bookings/{id}/cancel"), json!({}), 0, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("not the ¥0.00 you confirmed"), "{e}");
        let (_, v) = get(format!("{url}/v1/bookings/{id}")).await;
        assert_eq!((v["status"].as_str(), v["payment"]["refunded"].as_i64()), (Some("confirmed"), Some(0)), "{v}");
        let (s, c) = post_confirmed(format!("{url}/v1/bookings/{id}/cancel"), json!({}), price / 2, "CNY").await;
        assert_eq!((s, c["status"].as_str()), (200, Some("cancelled")), "{c}");
        assert_eq!(c["payment"]["refunded"].as_i64(), Some(price - price / 2));
        sb.stop().await;
    }
}

