//! The shared-bike sandbox mini-program, so the assistant can find a bike,
//! unlock it by its code, and end the ride with a fee paid through the
//! merchant.
//!
//! Every city has seeded bikes parked around its known places, with codes
//! like `SH-0001` (Shanghai) or `SE-0012` (Seoul). Unlocking is deposit-free
//! and starts a ride session; locking ends it and charges per 15 minutes
//! started (¥1.50, or ₩1,000 in Korea), opening the payment through the
//! merchant. A bike in use cannot be unlocked again (409 `bike_in_use`).

use crate::world::cities::{self, City};
use super::common::{city_param, limit_param, param};
use super::core::{new_id, seeded_rng, ApiError, ApiResult};
use super::merchant::Payment;
use super::ride::{body, city_loc, default_loc, resolve_place};
use crate::world::money::display as money;
use super::terms::{check_terms, confirmed_terms};
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
use std::collections::HashMap;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bikes (
    code TEXT PRIMARY KEY,
    city TEXT NOT NULL,
    lat REAL NOT NULL,
    lon REAL NOT NULL,
    battery INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bike_rides (
    id TEXT PRIMARY KEY,
    bike_code TEXT NOT NULL REFERENCES bikes(code),
    city TEXT NOT NULL,
    currency TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    fee INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS bike_rides_one_open ON bike_rides(bike_code) WHERE ended_ms IS NULL;";

const BIKES_PER_CITY: usize = 40;
/// Billing unit.
const UNIT_MS: i64 = 15 * 60_000;

fn code_prefix(city: &str) -> &'static str {
    match city {
        "beijing" => "BJ",
        "shanghai" => "SH",
        "hangzhou" => "HZ",
        "shenzhen" => "SZ",
        "guangzhou" => "GZ",
        "seoul" => "SE",
        "busan" => "BS",
        _ => "XX",
    }
}

/// The fee per 15 minutes started, in minor units.
fn unit_fee(currency: &str) -> i64 {
    if currency == "KRW" {
        1000
    } else {
        150
    }
}

fn fee_for(duration_ms: i64, currency: &str) -> (i64, i64) {
    let units = ((duration_ms.max(0) + UNIT_MS - 1) / UNIT_MS).max(1);
    (units, units * unit_fee(currency))
}

fn fee_rules(currency: &str) -> String {
    format!(
        "{} per 15 minutes started, charged when you lock the bike",
        money(unit_fee(currency), currency)
    )
}

/// Parks the seeded bikes around each city's places (once; later starts
/// keep where they are).
fn seed_bikes(ctx: &ServiceCtx) -> ApiResult<()> {
    ctx.db.tx(|tx| {
        for c in cities::CITIES {
            let mut rng = seeded_rng(ctx.seed, &format!("bikes:{}", c.id));
            for n in 1..=BIKES_PER_CITY {
                let p = &c.places[(n - 1) % c.places.len()];
                let lat = p.lat + rng.random_range(-0.004..0.004);
                let lon = p.lon + rng.random_range(-0.004..0.004);
                let battery: i64 = rng.random_range(20..=100);
                tx.execute(
                    "INSERT OR IGNORE INTO bikes (code, city, lat, lon, battery) VALUES (?1, ?2, ?3, ?4, ?5)",
                    rusqlite::params![format!("{}-{n:04}", code_prefix(c.id)), c.id, lat, lon, battery],
                )?;
            }
        }
        Ok(())
    })
}

pub fn router(ctx: ServiceCtx) -> ApiResult<Router> {
    ctx.db.with(|c| Ok(c.execute_batch(SCHEMA)?))?;
    seed_bikes(&ctx)?;
    Ok(Router::new()
        .route("/v1/bikes", get(nearby))
        .route("/v1/unlock", post(unlock))
        .route("/v1/unlock/quote", post(unlock_quote))
        .route("/v1/rides/{bike_ride_id}", get(status))
        .route("/v1/rides/{bike_ride_id}/lock", post(lock))
        .route("/v1/rides/{bike_ride_id}/lock/quote", post(lock_quote))
        .with_state(ctx))
}

async fn nearby(State(ctx): State<ServiceCtx>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let city: Option<&'static City> = city_param(&q)?;
    let limit = limit_param(&q)?;
    let (near, assumed) = match (param(&q, "near"), city) {
        (Some(n), c) => (resolve_place(n, c.map(|c| c.id))?, false),
        (None, Some(c)) => (city_loc(c), false),
        (None, None) => (default_loc(), true),
    };
    let bikes: Vec<(String, f64, f64, i64)> = ctx.db.with(|c| {
        let mut st = c.prepare(
            "SELECT code, lat, lon, battery FROM bikes b WHERE city = ?1
             AND NOT EXISTS (SELECT 1 FROM bike_rides r WHERE r.bike_code = b.code AND r.ended_ms IS NULL)",
        )?;
        let rows = st
            .query_map([&near.city], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    })?;
    let mut items: Vec<(f64, Value)> = bikes
        .into_iter()
        .map(|(code, lat, lon, battery)| {
            let d = cities::distance_km(near.coords(), (lat, lon));
            let m = (d * 1000.0).round();
            let r5 = |x: f64| (x * 1e5).round() / 1e5;
            (d, json!({"id": code, "bike_code": code, "distance_m": m, "lat": r5(lat), "lon": r5(lon), "battery": battery}))
        })
        .collect();
    items.sort_by(|a, b| a.0.total_cmp(&b.0));
    let items: Vec<Value> = items.into_iter().take(limit).map(|(_, v)| v).collect();
    let currency = near.currency();
    let mut v = json!({
        "near": near.name,
        "near_assumed": assumed,
        "city": near.city,
        "fee_rules": fee_rules(currency),
        "currency": currency,
        "count": items.len(),
        "items": items,
    });
    if assumed {
        v["note"] = json!("no location given: assumed the current location, People's Square, Shanghai");
    }
    Ok(Json(v))
}

#[derive(Deserialize)]
struct UnlockReq {
    bike_code: Option<String>,
    #[serde(default)]
    city: Option<String>,
}

/// The bike a code names (case and spaces ignored), checked against the
/// city when one is given.
fn find_bike(ctx: &ServiceCtx, req: &UnlockReq) -> ApiResult<(String, &'static City)> {
    let raw = req
        .bike_code
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("bike_code is required: the code on the bike, e.g. SH-0001"))?;
    let mut code: String = raw
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_uppercase();
    if !code.contains('-') && code.len() > 2 {
        code.insert(2, '-');
    }
    let row: Option<String> = ctx.db.with(|c| {
        Ok(
            c.query_row("SELECT city FROM bikes WHERE code = ?1", [&code], |r| r.get(0))
                .optional()?,
        )
    })?;
    let city_id = row.ok_or_else(|| {
        ApiError::not_found(format!(
            "no bike with code '{raw}'; codes look like SH-0001 (Shanghai), BJ-0001 (Beijing) or SE-0001 (Seoul); use bike_find to list nearby bikes"
        ))
    })?;
    let city = cities::city_by_id(&city_id).ok_or_else(|| ApiError::internal("bike in an unknown city"))?;
    if let Some(q) = req.city.as_deref().filter(|s| !s.trim().is_empty()) {
        let asked = cities::city(q).ok_or_else(|| ApiError::bad_request(format!("unknown city '{q}'")))?;
        if asked.id != city.id {
            return Err(ApiError::bad_request(format!(
                "bike {code} is in {}, not {}; check the code on the bike",
                city.name.en, asked.name.en
            )));
        }
    }
    Ok((code, city))
}

fn open_ride_of(ctx: &ServiceCtx, code: &str) -> ApiResult<Option<String>> {
    ctx.db.with(|c| {
        Ok(c.query_row(
            "SELECT id FROM bike_rides WHERE bike_code = ?1 AND ended_ms IS NULL",
            [code],
            |r| r.get(0),
        )
        .optional()?)
    })
}

fn in_use(code: &str) -> ApiError {
    ApiError::conflict(
        "bike_in_use",
        format!("bike {code} is already unlocked; pick another bike (bike_find)"),
    )
}

async fn unlock_quote(State(ctx): State<ServiceCtx>, bytes: Bytes) -> ApiResult<Json<Value>> {
    let req: UnlockReq = body(&bytes)?;
    let (code, city) = find_bike(&ctx, &req)?;
    if open_ride_of(&ctx, &code)?.is_some() {
        return Err(in_use(&code));
    }
    let c = city.currency;
    Ok(Json(json!({
        "summary": format!("Unlock bike {code} in {}: {}, no deposit", city.name.en, fee_rules(c)),
        "amount": unit_fee(c),
        "currency": c,
    })))
}

async fn unlock(State(ctx): State<ServiceCtx>, headers: HeaderMap, bytes: Bytes) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    let req: UnlockReq = body(&bytes)?;
    let (code, city) = find_bike(&ctx, &req)?;
    let id = new_id("bkr");
    let now = ctx.clock.now_ms();
    ctx.db.tx(|tx| {
        let open: Option<String> = tx
            .query_row(
                "SELECT id FROM bike_rides WHERE bike_code = ?1 AND ended_ms IS NULL",
                [&code],
                |r| r.get(0),
            )
            .optional()?;
        if open.is_some() {
            return Err(in_use(&code));
        }
        // The quote's amount is the rate per 15 minutes started.
        check_terms(confirmed, "the fee per 15 minutes", unit_fee(city.currency), city.currency)?;
        tx.execute(
            "INSERT INTO bike_rides (id, bike_code, city, currency, started_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![id, code, city.id, city.currency, now],
        )?;
        Ok(())
    })?;
    let ride = load(&ctx, &id)?;
    Ok(Json(ride_json(&ctx, &ride, None)))
}

struct BikeRide {
    id: String,
    bike_code: String,
    city: String,
    currency: String,
    started_ms: i64,
    ended_ms: Option<i64>,
    fee: Option<i64>,
}

fn load(ctx: &ServiceCtx, id: &str) -> ApiResult<BikeRide> {
    ctx.db
        .with(|c| {
            Ok(c.query_row(
                "SELECT id, bike_code, city, currency, started_ms, ended_ms, fee FROM bike_rides WHERE id = ?1",
                [id],
                |r| {
                    Ok(BikeRide {
                        id: r.get(0)?,
                        bike_code: r.get(1)?,
                        city: r.get(2)?,
                        currency: r.get(3)?,
                        started_ms: r.get(4)?,
                        ended_ms: r.get(5)?,
                        fee: r.get(6)?,
                    })
                },
            )
            .optional()?)
        })?
        .ok_or_else(|| ApiError::not_found(format!("no bike ride {id}")))
}

fn ride_json(ctx: &ServiceCtx, r: &BikeRide, payment: Option<&Payment>) -> Value {
    let end = r.ended_ms.unwrap_or_else(|| ctx.clock.now_ms());
    let (_, fee_so_far) = fee_for(end - r.started_ms, &r.currency);
    let status = match (r.ended_ms, payment.map(|p| p.status.as_str())) {
        (None, _) => "riding",
        (Some(_), Some("paid" | "refunded")) => "paid",
        (Some(_), Some("closed")) => "closed",
        (Some(_), _) => "awaiting_payment",
    };
    let mut v = json!({
        "bike_ride_id": r.id,
        "bike_code": r.bike_code,
        "city": r.city,
        "status": status,
        "started_ms": r.started_ms,
        "minutes": (end - r.started_ms).max(0) / 60_000,
        "fee": r.fee.unwrap_or(fee_so_far),
        "currency": r.currency,
        "fee_rules": fee_rules(&r.currency),
    });
    if let Some(e) = r.ended_ms {
        v["ended_ms"] = json!(e);
        v["payment"] = json!(payment);
    }
    if status == "riding" {
        v["next"] = json!("lock the bike with bike_lock when the ride is over");
    }
    v
}

async fn status(State(ctx): State<ServiceCtx>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let r = load(&ctx, &id)?;
    let payment = if ctx.merchant().payment_local(&id)?.is_some() {
        Some(ctx.merchant().payment(&id).await?)
    } else {
        None
    };
    Ok(Json(ride_json(&ctx, &r, payment.as_ref())))
}

/// What locking now would charge: the fee of a ride still going, computed
/// at the clock's now, or the fee recorded when it was locked.
fn lock_terms(r: &BikeRide, now: i64) -> (i64, i64) {
    let end = r.ended_ms.unwrap_or(now);
    let (_, fee_now) = fee_for(end - r.started_ms, &r.currency);
    (r.fee.unwrap_or(fee_now), (end - r.started_ms).max(0) / 60_000)
}

/// `POST /v1/rides/{bike_ride_id}/lock/quote`: the fee locking now would
/// charge; no side effects.
async fn lock_quote(State(ctx): State<ServiceCtx>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let r = load(&ctx, &id)?;
    let (fee, minutes) = lock_terms(&r, ctx.clock.now_ms());
    let summary = match r.ended_ms {
        None => format!(
            "End your bike ride {} after {minutes} min: {}",
            r.bike_code,
            money(fee, &r.currency)
        ),
        Some(_) => format!(
            "Your bike ride {} already ended after {minutes} min: {} to pay",
            r.bike_code,
            money(fee, &r.currency)
        ),
    };
    Ok(Json(json!({
        "summary": summary,
        "amount": fee,
        "currency": r.currency,
        "bike_ride_id": r.id,
        "minutes": minutes,
    })))
}

/// Ends the ride (once) and opens its payment; locking again answers the
/// ended ride. With confirmed terms, a fee that grew since the quote is a
/// 409 `terms_changed` and the ride goes on.
async fn lock(State(ctx): State<ServiceCtx>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    load(&ctx, &id)?;
    let now = ctx.clock.now_ms();
    ctx.db.tx(|tx| {
        let (started, ended, fee, currency): (i64, Option<i64>, Option<i64>, String) = tx.query_row(
            "SELECT started_ms, ended_ms, fee, currency FROM bike_rides WHERE id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        match (ended, fee) {
            (Some(_), Some(fee)) => check_terms(confirmed, "the ride's fee", fee, &currency),
            _ => {
                let (_, fee) = fee_for(now - started, &currency);
                check_terms(confirmed, "the ride's fee", fee, &currency)?;
                tx.execute(
                    "UPDATE bike_rides SET ended_ms = ?2, fee = ?3 WHERE id = ?1 AND ended_ms IS NULL",
                    rusqlite::params![id, now, fee],
                )?;
                Ok(())
            }
        }
    })?;
    let r = load(&ctx, &id)?;
    let m = ctx.merchant();
    let payment = match m.payment_local(&id)? {
        Some(_) => m.payment(&id).await?,
        None => {
            let fee = r.fee.unwrap_or(0);
            let minutes = r.ended_ms.unwrap_or(now).saturating_sub(r.started_ms) / 60_000;
            let desc = format!("Bike {} ride, {minutes} min: {}", r.bike_code, money(fee, &r.currency));
            m.open_payment(&id, fee, &r.currency, &desc).await?
        }
    };
    Ok(Json(ride_json(&ctx, &r, Some(&payment))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testkit::{check, get, pay, post, post_confirmed, rows, sandbox};
    use crate::sandbox::Service;
    use std::time::Duration;

    #[test]
    fn fees_count_every_started_quarter_hour() {
        assert_eq!(fee_for(0, "CNY"), (1, 150));
        assert_eq!(fee_for(15 * 60_000, "CNY"), (1, 150));
        assert_eq!(fee_for(15 * 60_000 + 1, "CNY"), (2, 300));
        assert_eq!(fee_for(40 * 60_000, "KRW"), (3, 3000));
    }

    #[tokio::test]
    async fn find_unlock_ride_lock_and_pay() {
        let (_dir, sb) = sandbox().await;
        let bike = sb.url(Service::Bike);

        let (s, found) = get(format!("{bike}/v1/bikes?near=外滩&limit=3")).await;
        assert_eq!(s, 200);
        assert_eq!(found["count"], 3);
        check("bike_find", &found);
        assert_eq!(found["near"]["en"], "The Bund");
        let code = found["items"][0]["bike_code"].as_str().unwrap().to_string();
        assert!(code.starts_with("SH-"), "{code}");
        assert!(found["items"][0]["distance_m"].as_f64().unwrap() < 1000.0);

        let (s, q) = post(format!("{bike}/v1/unlock/quote"), json!({"bike_code": code})).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!((q["amount"].as_i64(), q["currency"].as_str()), (Some(150), Some("CNY")));
        let (s, u) = post(
            format!("{bike}/v1/unlock"),
            json!({"bike_code": code.to_lowercase(), "city": "上海"}),
        )
        .await;
        assert_eq!(s, 200, "{u}");
        assert_eq!(u["status"], "riding");
        check("bike_unlock", &u);
        let id = u["bike_ride_id"].as_str().unwrap().to_string();

        // The bike is taken now, and no longer listed.
        let (s, e) = post(format!("{bike}/v1/unlock"), json!({"bike_code": code})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("bike_in_use")));
        let (s, _) = post(format!("{bike}/v1/unlock/quote"), json!({"bike_code": code})).await;
        assert_eq!(s, 409);
        let again: Value = get(format!("{bike}/v1/bikes?near=外滩&limit=20")).await.1;
        assert!(again["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["bike_code"] != json!(code)));
        let (s, _) = post(format!("{bike}/v1/unlock"), json!({"bike_code": "SH-9999"})).await;
        assert_eq!(s, 404);
        let (s, _) = post(
            format!("{bike}/v1/unlock"),
            json!({"bike_code": code, "city": "Seoul"}),
        )
        .await;
        assert_eq!(s, 400);

        // 31 minutes: three quarter-hours started.
        sb.clock.advance(Duration::from_secs(31 * 60));
        let st: Value = get(format!("{bike}/v1/rides/{id}")).await.1;
        assert_eq!((st["status"].as_str(), st["fee"].as_i64()), (Some("riding"), Some(450)));
        let (s, l) = post(format!("{bike}/v1/rides/{id}/lock"), json!({})).await;
        assert_eq!(s, 200, "{l}");
        assert_eq!(l["status"], "awaiting_payment");
        check("bike_lock", &l);
        assert_eq!(
            (l["fee"].as_i64(), l["payment"]["amount"].as_i64()),
            (Some(450), Some(450))
        );
        // Locking again changes nothing, even later.
        sb.clock.advance(Duration::from_secs(20 * 60));
        let (s, l2) = post(format!("{bike}/v1/rides/{id}/lock"), json!({})).await;
        assert_eq!((s, l2["fee"].as_i64()), (200, Some(450)));

        pay(&sb, &l, "alipay").await;
        let st: Value = get(format!("{bike}/v1/rides/{id}")).await.1;
        assert_eq!(st["status"], "paid", "{st}");
        check("bike_ride_status", &st);
        // The bike can be unlocked again.
        let (s, _) = post(format!("{bike}/v1/unlock"), json!({"bike_code": code})).await;
        assert_eq!(s, 200);
        sb.stop().await;
    }

    #[tokio::test]
    async fn korean_bikes_are_charged_in_won() {
        let (_dir, sb) = sandbox().await;
        let bike = sb.url(Service::Bike);
        let found: Value = get(format!("{bike}/v1/bikes?city=서울")).await.1;
        assert_eq!(found["currency"], "KRW");
        let code = found["items"][0]["bike_code"].as_str().unwrap();
        assert!(code.starts_with("SE-"));
        let (_, u) = post(format!("{bike}/v1/unlock"), json!({"bike_code": code})).await;
        let id = u["bike_ride_id"].as_str().unwrap();
        sb.clock.advance(Duration::from_secs(10 * 60));
        let (s, l) = post(format!("{bike}/v1/rides/{id}/lock"), json!({})).await;
        assert_eq!(s, 200, "{l}");
        assert_eq!((l["fee"].as_i64(), l["currency"].as_str()), (Some(1000), Some("KRW")));
        sb.stop().await;
    }
    #[tokio::test]
    async fn confirmed_terms_must_match_at_execution() {
        let (dir, sb) = sandbox().await;
        let bike = sb.url(Service::Bike);
        let rides = || rows(dir.path(), Service::Bike, "bike_rides");
        let code = json!({"bike_code": "SH-0001"});

        // Unlock: the confirmed rate must be the rate.
        let (s, e) = post_confirmed(format!("{bike}/v1/unlock"), code.clone(), 100, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert_eq!(rides(), 0);
        let (s, u) = post_confirmed(format!("{bike}/v1/unlock"), code, 150, "CNY").await;
        assert_eq!(s, 200, "{u}");
        let id = u["bike_ride_id"].as_str().unwrap();

        // Lock quote at 31 min: three quarter-hours, nothing changes.
        sb.clock.advance(Duration::from_secs(31 * 60));
        let (s, q) = post(format!("{bike}/v1/rides/{id}/lock/quote"), json!({})).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!(q["summary"], "End your bike ride SH-0001 after 31 min: ¥4.50");
        assert_eq!((q["amount"].as_i64(), q["currency"].as_str()), (Some(450), Some("CNY")));
        let (_, st) = post(format!("{bike}/v1/rides/{id}/lock/quote"), json!({})).await;
        assert_eq!(st["amount"], 450);
        let status: Value = get(format!("{bike}/v1/rides/{id}")).await.1;
        assert_eq!(status["status"], "riding", "a quote locks nothing");

        // The user answers after the next quarter-hour started: refused, still riding.
        sb.clock.advance(Duration::from_secs(15 * 60));
        let (s, e) = post_confirmed(format!("{bike}/v1/rides/{id}/lock"), json!({}), 450, "CNY").await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("¥6.00, not the ¥4.50 you confirmed"), "{e}");
        let status: Value = get(format!("{bike}/v1/rides/{id}")).await.1;
        assert_eq!(status["status"], "riding", "{status}");
        assert!(status.get("payment").is_none(), "{status}");

        // Re-quoted and confirmed: locked, the payment opened at that fee.
        let (_, q) = post(format!("{bike}/v1/rides/{id}/lock/quote"), json!({})).await;
        assert_eq!(q["amount"], 600, "{q}");
        let (s, l) = post_confirmed(format!("{bike}/v1/rides/{id}/lock"), json!({}), 600, "CNY").await;
        assert_eq!(s, 200, "{l}");
        check("bike_lock", &l);
        assert_eq!((l["fee"].as_i64(), l["payment"]["amount"].as_i64()), (Some(600), Some(600)));
        // Once locked the quote and the lock keep the recorded fee.
        sb.clock.advance(Duration::from_secs(30 * 60));
        let (_, q) = post(format!("{bike}/v1/rides/{id}/lock/quote"), json!({})).await;
        assert_eq!(q["amount"], 600, "{q}");
        let (s, l) = post_confirmed(format!("{bike}/v1/rides/{id}/lock"), json!({}), 600, "CNY").await;
        assert_eq!((s, l["fee"].as_i64()), (200, Some(600)), "{l}");
        let (s, _) = post(format!("{bike}/v1/rides/bkr_nope/lock/quote"), json!({})).await;
        assert_eq!(s, 404);
        sb.stop().await;
    }
}

