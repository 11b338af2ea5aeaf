//! The grocery-mart sandbox mini-program (`/mart`): fruit, vegetables,
//! dairy, snacks and drinks in every city, names in English, Chinese and
//! Korean, prices and starting stock seeded from the sandbox seed. An order
//! takes its items out of stock at once (409 `out_of_stock` when there are
//! not enough), is paid through the merchant account, and once paid moves
//! from packing to delivering to delivered within 30–45 minutes.

use crate::world::cities::{self, City, Names};
use super::core::{new_id, seeded_rng, ApiError, ApiResult};
use super::food::{check_address, clip, parse_body, payment_of, Params};
use crate::world::money::display as money;
use super::merchant::Payment;
use super::terms::{check_terms, confirmed_terms};
use super::ServiceCtx;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

macro_rules! p {
    ($slug:literal, $cat:literal, $en:literal, $zh:literal, $ko:literal, $unit:literal, $price:literal) => {
        ProductTpl {
            slug: $slug,
            category: $cat,
            name: Names { en: $en, zh: $zh, ko: $ko },
            unit: $unit,
            price: $price,
        }
    };
}

/// A product as every city stocks it; `price` in CNY fen.
struct ProductTpl {
    slug: &'static str,
    category: &'static str,
    name: Names,
    unit: &'static str,
    price: i64,
}

static PRODUCTS: &[ProductTpl] = &[
    p!("bananas", "fruit", "Bananas", "香蕉", "바나나", "1 kg", 990),
    p!("fuji-apples", "fruit", "Fuji Apples", "富士苹果", "부사 사과", "1 kg", 1590),
    p!("strawberries", "fruit", "Strawberries", "草莓", "딸기", "500 g", 3990),
    p!("grapes", "fruit", "Grapes", "葡萄", "포도", "500 g", 1990),
    p!("mandarins", "fruit", "Mandarins", "砂糖橘", "귤", "1 kg", 1290),
    p!("watermelon", "fruit", "Watermelon", "西瓜", "수박", "1 whole", 2990),
    p!("tomatoes", "vegetables", "Tomatoes", "西红柿", "토마토", "500 g", 690),
    p!("cucumbers", "vegetables", "Cucumbers", "黄瓜", "오이", "500 g", 490),
    p!("bok-choy", "vegetables", "Bok Choy", "上海青", "청경채", "500 g", 590),
    p!("potatoes", "vegetables", "Potatoes", "土豆", "감자", "1 kg", 590),
    p!("carrots", "vegetables", "Carrots", "胡萝卜", "당근", "500 g", 390),
    p!("napa-cabbage", "vegetables", "Napa Cabbage", "大白菜", "배추", "1 head", 890),
    p!("scallions", "vegetables", "Scallions", "小葱", "쪽파", "100 g", 290),
    p!("whole-milk", "dairy", "Whole Milk", "全脂牛奶", "우유", "1 L", 1590),
    p!("plain-yogurt", "dairy", "Plain Yogurt", "原味酸奶", "플레인 요거트", "4 × 100 g", 1290),
    p!("eggs", "dairy", "Eggs", "鸡蛋", "달걀", "10 pcs", 1590),
    p!("butter", "dairy", "Butter", "黄油", "버터", "200 g", 2590),
    p!("cheddar-slices", "dairy", "Cheddar Slices", "切达奶酪片", "체다 슬라이스 치즈", "10 slices", 2290),
    p!("potato-chips", "snacks", "Potato Chips", "薯片", "감자칩", "104 g", 890),
    p!("mixed-nuts", "snacks", "Mixed Nuts", "每日坚果", "믹스넛", "7 × 25 g", 4990),
    p!("dark-chocolate", "snacks", "Dark Chocolate", "黑巧克力", "다크 초콜릿", "100 g", 1290),
    p!("seaweed-snack", "snacks", "Seaweed Snack", "海苔", "김스낵", "10 × 4 g", 1590),
    p!("butter-cookies", "snacks", "Butter Cookies", "黄油曲奇", "버터 쿠키", "200 g", 1890),
    p!("instant-noodles", "snacks", "Instant Noodles", "方便面", "라면", "5 packs", 1590),
    p!("mineral-water", "drinks", "Mineral Water", "矿泉水", "생수", "6 × 550 ml", 1290),
    p!("cola", "drinks", "Cola", "可乐", "콜라", "6 × 330 ml", 1990),
    p!("orange-juice", "drinks", "Orange Juice", "橙汁", "오렌지 주스", "1 L", 1890),
    p!("green-tea", "drinks", "Green Tea", "绿茶", "녹차 음료", "500 ml", 390),
    p!("beer", "drinks", "Lager Beer", "啤酒", "맥주", "6 × 500 ml", 3590),
    p!("cold-brew-coffee", "drinks", "Cold Brew Coffee", "冷萃咖啡", "콜드브루 커피", "250 ml", 990),
];

const CATEGORIES: &[(&str, &[&str])] = &[
    ("fruit", &["fruits", "水果", "과일"]),
    ("vegetables", &["vegetable", "veg", "veggies", "蔬菜", "青菜", "채소", "야채"]),
    ("dairy", &["milk", "eggs", "奶制品", "乳制品", "蛋奶", "유제품"]),
    ("snacks", &["snack", "零食", "간식", "과자"]),
    ("drinks", &["drink", "beverages", "饮料", "饮品", "음료"]),
];

const STORE: Names = Names {
    en: "Fresh Mart",
    zh: "鲜品超市",
    ko: "프레시 마트",
};

/// Packing takes this long after payment, then the courier leaves.
const PACKING_MS: i64 = 10 * 60_000;

const ORDER_SHAPE: &str = r#"{"city": "Shanghai", "items": [{"product_id": "sh-bananas", "quantity": 1}], "address": "..."}"#;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mart_stock (
    product_id TEXT PRIMARY KEY,
    stock INTEGER NOT NULL CHECK (stock >= 0));
CREATE TABLE IF NOT EXISTS mart_orders (
    order_id TEXT PRIMARY KEY,
    city TEXT NOT NULL,
    items TEXT NOT NULL,
    subtotal INTEGER NOT NULL,
    delivery_fee INTEGER NOT NULL,
    total INTEGER NOT NULL,
    currency TEXT NOT NULL,
    address TEXT NOT NULL,
    eta_minutes INTEGER NOT NULL,
    status TEXT NOT NULL,            -- open | failed (open moves on with time once paid)
    created_ms INTEGER NOT NULL,
    paid_ms INTEGER)";

fn city_code(id: &str) -> &'static str {
    match id {
        "beijing" => "bj",
        "shanghai" => "sh",
        "hangzhou" => "hz",
        "shenzhen" => "sz",
        "guangzhou" => "gz",
        "seoul" => "se",
        _ => "bs",
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Product {
    pub id: String,
    #[serde(skip)]
    pub city: &'static City,
    pub name: Names,
    pub category: &'static str,
    pub unit: &'static str,
    pub price: i64,
    pub currency: &'static str,
    /// Stock when the sandbox was first created; the database has the current one.
    #[serde(skip)]
    pub initial_stock: i64,
}

/// Every city's products: the same seed gives the same prices and stock.
pub(crate) fn catalog(seed: u64) -> Vec<Product> {
    let mut out = Vec::new();
    for city in cities::CITIES {
        let mut rng = seeded_rng(seed, &format!("mart/{}", city.id));
        let sold_out = rng.random_range(0..PRODUCTS.len());
        for (i, t) in PRODUCTS.iter().enumerate() {
            let fen = t.price as f64 * rng.random_range(0.85..1.15);
            let price = if city.currency == "KRW" {
                ((fen * 1.9 / 100.0).round() as i64).max(1) * 100
            } else {
                ((fen / 10.0).round() as i64).max(1) * 10
            };
            let initial_stock = match (i == sold_out, rng.random_range(0..10)) {
                (true, _) => 0,
                (false, 0) => rng.random_range(1..=3),
                _ => rng.random_range(8..=60),
            };
            out.push(Product {
                id: format!("{}-{}", city_code(city.id), t.slug),
                city,
                name: t.name,
                category: t.category,
                unit: t.unit,
                price,
                currency: city.currency,
                initial_stock,
            });
        }
    }
    out
}

fn find_category(q: &str) -> Option<&'static str> {
    let q = cities::fold(q);
    CATEGORIES
        .iter()
        .find(|(c, aliases)| *c == q || aliases.iter().any(|a| cities::fold(a) == q))
        .map(|(c, _)| *c)
}

fn delivery_fee(subtotal: i64, currency: &str) -> i64 {
    // Free over ¥59 / ₩30,000.
    match currency {
        "KRW" if subtotal >= 30_000 => 0,
        "KRW" => 3_000,
        _ if subtotal >= 5_900 => 0,
        _ => 400,
    }
}

/// 30 minutes plus 3 for every product line, at most 45.
fn eta_minutes(lines: usize) -> i64 {
    (30 + 3 * lines as i64).min(45)
}

struct Mart {
    ctx: ServiceCtx,
    products: Vec<Product>,
}

type St = State<Arc<Mart>>;

pub fn router(ctx: ServiceCtx) -> ApiResult<Router> {
    let products = catalog(ctx.seed);
    ctx.db.tx(|tx| {
        tx.execute_batch(SCHEMA)?;
        let mut st = tx.prepare("INSERT OR IGNORE INTO mart_stock (product_id, stock) VALUES (?1, ?2)")?;
        for p in &products {
            st.execute(rusqlite::params![p.id, p.initial_stock])?;
        }
        Ok(())
    })?;
    let mart = Arc::new(Mart { ctx, products });
    Ok(Router::new()
        .route("/v1/products", get(search))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/quote", post(quote_order))
        .route("/v1/orders/{order_id}", get(get_order))
        .with_state(mart))
}

fn resolve_city(q: Option<&str>) -> ApiResult<&'static City> {
    let names = || cities::CITIES.iter().map(|c| c.name.en).collect::<Vec<_>>().join(", ");
    let q = q.ok_or_else(|| ApiError::bad_request(format!("`city` is required; one of: {}", names())))?;
    cities::city(q)
        .or_else(|| cities::place(q, None).map(|(c, _)| c))
        .ok_or_else(|| ApiError::bad_request(format!("unknown city '{}'; known cities: {}", clip(q), names())))
}

impl Mart {
    fn stock(&self, ids: &[&str]) -> ApiResult<HashMap<String, i64>> {
        self.ctx.db.with(|c| {
            let mut st = c.prepare("SELECT stock FROM mart_stock WHERE product_id = ?1")?;
            let mut out = HashMap::new();
            for id in ids {
                let n: Option<i64> = st.query_row([id], |r| r.get(0)).optional()?;
                out.insert(id.to_string(), n.unwrap_or(0));
            }
            Ok(out)
        })
    }

    fn product(&self, city: &City, id: &str) -> ApiResult<&Product> {
        let want = id.trim();
        if let Some(p) = self.products.iter().find(|p| p.id.eq_ignore_ascii_case(want)) {
            if p.city.id != city.id {
                return Err(ApiError::bad_request(format!(
                    "product {} is sold in {}, not {}; an order ships from one city's store",
                    p.id, p.city.name.en, city.name.en
                )));
            }
            return Ok(p);
        }
        let some: Vec<String> = self
            .products
            .iter()
            .filter(|p| p.city.id == city.id)
            .step_by(6)
            .take(5)
            .map(|p| format!("{} ({})", p.id, p.name.en))
            .collect();
        Err(ApiError::bad_request(format!(
            "unknown product id '{}' in {}; ids look like: {} — find them with mart_search_products",
            clip(want),
            city.name.en,
            some.join(", ")
        )))
    }
}

/// `GET /v1/products?city=&q=&category=&limit=`
async fn search(State(s): St, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let p = Params::new(q, &["city", "q", "category", "limit"])?;
    let city = resolve_city(p.text("city"))?;
    let limit = p.limit()?;
    let category = match p.text("category") {
        None => None,
        Some(c) => Some(find_category(c).ok_or_else(|| {
            let known: Vec<&str> = CATEGORIES.iter().map(|(c, _)| *c).collect();
            ApiError::bad_request(format!("unknown category '{}'; categories: {}", clip(c), known.join(", ")))
        })?),
    };
    let text = p.text("q").map(cities::fold).filter(|t| !t.is_empty());
    let mut hits: Vec<(u32, &Product)> = s
        .products
        .iter()
        .filter(|p| p.city.id == city.id && category.is_none_or(|c| p.category == c))
        .filter_map(|p| {
            let Some(t) = &text else { return Some((0, p)) };
            let names: Vec<String> = p.name.all().iter().map(|n| cities::fold(n)).collect();
            let score = if names.contains(t) {
                3
            } else if names.iter().any(|n| n.contains(t.as_str()) || (n.chars().count() >= 2 && t.contains(n.as_str()))) {
                2
            } else if find_category(t) == Some(p.category) || cities::fold(p.slug()).contains(t.as_str()) {
                1
            } else {
                0
            };
            (score > 0).then_some((score, p))
        })
        .collect();
    let ids: Vec<&str> = hits.iter().map(|(_, p)| p.id.as_str()).collect();
    let stock = s.stock(&ids)?;
    let left = |p: &Product| stock.get(&p.id).copied().unwrap_or(0);
    hits.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then((left(b.1) > 0).cmp(&(left(a.1) > 0)))
            .then(a.1.id.cmp(&b.1.id))
    });
    let matched = hits.len();
    let items: Vec<Value> = hits
        .iter()
        .take(limit)
        .map(|(_, p)| {
            let mut v = json!(p);
            v["stock"] = json!(left(p));
            v["in_stock"] = json!(left(p) > 0);
            v
        })
        .collect();
    let mut out = json!({
        "items": items,
        "count": items.len(),
        "matched": matched,
        "city": {"id": city.id, "name": city.name},
        "store": STORE,
    });
    if matched == 0 {
        let known: Vec<&str> = CATEGORIES.iter().map(|(c, _)| *c).collect();
        out["hint"] = json!(format!("nothing matched; try another word or a category ({})", known.join(", ")));
    }
    Ok(Json(out))
}

impl Product {
    fn slug(&self) -> &str {
        self.id.split_once('-').map_or(self.id.as_str(), |(_, s)| s)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineReq {
    product_id: String,
    quantity: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderReq {
    city: String,
    items: Vec<LineReq>,
    address: String,
}

#[derive(Serialize)]
struct Line {
    product_id: String,
    name: Names,
    unit: &'static str,
    quantity: i64,
    unit_price: i64,
    amount: i64,
}

struct Basket {
    city: &'static City,
    lines: Vec<Line>,
    subtotal: i64,
    delivery_fee: i64,
    total: i64,
    address: String,
}

impl Basket {
    fn item_text(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("{} ×{}", l.name.en, l.quantity))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn summary(&self) -> String {
        format!(
            "{} from {} ({}), deliver to {}",
            self.item_text(),
            STORE.en,
            self.city.name.en,
            self.address
        )
    }
}

fn out_of_stock(name: &str, id: &str, left: i64, want: i64) -> ApiError {
    let what = if left == 0 {
        format!("{name} ({id}) is sold out")
    } else {
        format!("only {left} of {name} ({id}) left, {want} asked")
    };
    ApiError::conflict(
        "out_of_stock",
        format!("{what}; lower the quantity or pick another product (mart_search_products)"),
    )
}

impl Mart {
    /// Prices an order and checks it against the stock now.
    fn basket(&self, req: &OrderReq) -> ApiResult<Basket> {
        let city = resolve_city(Some(&req.city))?;
        let address = check_address(&req.address)?;
        if req.items.is_empty() {
            return Err(ApiError::bad_request(
                "`items` is empty; add at least one {\"product_id\", \"quantity\"} from mart_search_products",
            ));
        }
        if req.items.len() > 30 {
            return Err(ApiError::bad_request("at most 30 different products per order"));
        }
        let mut lines: Vec<Line> = Vec::new();
        for it in &req.items {
            if !(1..=50).contains(&it.quantity) {
                return Err(ApiError::bad_request(format!(
                    "quantity for {} must be from 1 to 50, not {}",
                    clip(&it.product_id),
                    it.quantity
                )));
            }
            let p = self.product(city, &it.product_id)?;
            if let Some(l) = lines.iter_mut().find(|l| l.product_id == p.id) {
                l.quantity += it.quantity;
                l.amount = l.unit_price * l.quantity;
                continue;
            }
            lines.push(Line {
                product_id: p.id.clone(),
                name: p.name,
                unit: p.unit,
                quantity: it.quantity,
                unit_price: p.price,
                amount: p.price * it.quantity,
            });
        }
        let ids: Vec<&str> = lines.iter().map(|l| l.product_id.as_str()).collect();
        let stock = self.stock(&ids)?;
        for l in &lines {
            let left = stock.get(&l.product_id).copied().unwrap_or(0);
            if left < l.quantity {
                return Err(out_of_stock(l.name.en, &l.product_id, left, l.quantity));
            }
        }
        let subtotal: i64 = lines.iter().map(|l| l.amount).sum();
        let fee = delivery_fee(subtotal, city.currency);
        Ok(Basket {
            city,
            lines,
            subtotal,
            delivery_fee: fee,
            total: subtotal + fee,
            address,
        })
    }
}

/// `POST /v1/orders/quote`: what `POST /v1/orders` would charge; no side effects.
async fn quote_order(State(s): St, body: Bytes) -> ApiResult<Json<Value>> {
    let req: OrderReq = parse_body(&body, ORDER_SHAPE)?;
    let b = s.basket(&req)?;
    Ok(Json(json!({
        "summary": b.summary(),
        "amount": b.total,
        "currency": b.city.currency,
        "items": b.lines,
        "subtotal": b.subtotal,
        "delivery_fee": b.delivery_fee,
        "eta_minutes": eta_minutes(b.lines.len()),
        "address": b.address,
    })))
}

struct OrderRow {
    order_id: String,
    city: String,
    items: Value,
    subtotal: i64,
    delivery_fee: i64,
    total: i64,
    currency: String,
    address: String,
    eta_minutes: i64,
    status: String,
    created_ms: i64,
    paid_ms: Option<i64>,
}

impl Mart {
    fn load(&self, order_id: &str) -> ApiResult<OrderRow> {
        let row = self.ctx.db.with(|c| {
            Ok(c.query_row(
                "SELECT order_id, city, items, subtotal, delivery_fee, total, currency, address, eta_minutes,
                        status, created_ms, paid_ms
                 FROM mart_orders WHERE order_id = ?1",
                [order_id.trim()],
                |r| {
                    let items: String = r.get(2)?;
                    Ok(OrderRow {
                        order_id: r.get(0)?,
                        city: r.get(1)?,
                        items: serde_json::from_str(&items).unwrap_or(Value::Null),
                        subtotal: r.get(3)?,
                        delivery_fee: r.get(4)?,
                        total: r.get(5)?,
                        currency: r.get(6)?,
                        address: r.get(7)?,
                        eta_minutes: r.get(8)?,
                        status: r.get(9)?,
                        created_ms: r.get(10)?,
                        paid_ms: r.get(11)?,
                    })
                },
            )
            .optional()?)
        })?;
        row.ok_or_else(|| {
            ApiError::not_found(format!("no order '{}'; use the order_id that mart_order returned", clip(order_id)))
        })
    }

    fn view(&self, row: &OrderRow, payment: Option<&Payment>, now: i64) -> Value {
        let status = match (row.status.as_str(), row.paid_ms) {
            ("failed", _) => "failed",
            _ if payment.is_some_and(|p| p.status == "closed") => "cancelled",
            (_, None) => "awaiting_payment",
            (_, Some(paid)) if now - paid < PACKING_MS => "packing",
            (_, Some(paid)) if now - paid < row.eta_minutes * 60_000 => "delivering",
            _ => "delivered",
        };
        let eta = row
            .paid_ms
            .filter(|_| status != "failed")
            .map(|p| p + row.eta_minutes * 60_000);
        let city = cities::city_by_id(&row.city);
        json!({
            "order_id": row.order_id,
            "status": status,
            "store": STORE,
            "city": {"id": row.city, "name": city.map(|c| c.name)},
            "items": row.items,
            "subtotal": row.subtotal,
            "delivery_fee": row.delivery_fee,
            "total": row.total,
            "amount": row.total,
            "currency": row.currency,
            "address": row.address,
            "eta_minutes": row.eta_minutes,
            "eta": eta,
            "minutes_left": eta.map(|e| ((e - now).max(0) + 59_999) / 60_000),
            "created_ms": row.created_ms,
            "payment": payment,
        })
    }
}

/// `POST /v1/orders`: takes the items out of stock and opens the payment.
async fn create_order(State(s): St, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Value>> {
    let confirmed = confirmed_terms(&headers)?;
    let req: OrderReq = parse_body(&body, ORDER_SHAPE)?;
    let b = s.basket(&req)?;
    let now = s.ctx.clock.now_ms();
    let order_id = new_id("mo");
    let items = serde_json::to_string(&b.lines).map_err(|e| ApiError::internal(format!("items: {e}")))?;
    let eta = eta_minutes(b.lines.len());
    // Stock is checked again inside the transaction: another order may have taken it meanwhile.
    s.ctx.db.tx(|tx| {
        check_terms(confirmed, "the total", b.total, b.city.currency)?;
        for l in &b.lines {
            let n = tx.execute(
                "UPDATE mart_stock SET stock = stock - ?2 WHERE product_id = ?1 AND stock >= ?2",
                rusqlite::params![l.product_id, l.quantity],
            )?;
            if n == 0 {
                let left: i64 = tx
                    .query_row("SELECT stock FROM mart_stock WHERE product_id = ?1", [&l.product_id], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                return Err(out_of_stock(l.name.en, &l.product_id, left, l.quantity));
            }
        }
        tx.execute(
            "INSERT INTO mart_orders (order_id, city, items, subtotal, delivery_fee, total, currency, address,
                                      eta_minutes, status, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'open', ?10)",
            rusqlite::params![
                order_id,
                b.city.id,
                items,
                b.subtotal,
                b.delivery_fee,
                b.total,
                b.city.currency,
                b.address,
                eta,
                now
            ],
        )?;
        Ok(())
    })?;
    let description = format!("{} {}: {}", STORE.en, b.city.name.en, b.item_text());
    let payment = match s
        .ctx
        .merchant()
        .open_payment(&order_id, b.total, b.city.currency, &description)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            // Never payable: put the stock back and keep the row, marked failed.
            let _ = s.ctx.db.tx(|tx| {
                for l in &b.lines {
                    tx.execute(
                        "UPDATE mart_stock SET stock = stock + ?2 WHERE product_id = ?1",
                        rusqlite::params![l.product_id, l.quantity],
                    )?;
                }
                tx.execute("UPDATE mart_orders SET status = 'failed' WHERE order_id = ?1", [&order_id])?;
                Ok(())
            });
            return Err(e);
        }
    };
    let row = s.load(&order_id)?;
    Ok(Json(s.view(&row, Some(&payment), now)))
}

/// `GET /v1/orders/{order_id}`
async fn get_order(State(s): St, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let mut row = s.load(&id)?;
    let payment = payment_of(s.ctx.merchant(), &row.order_id).await?;
    let now = s.ctx.clock.now_ms();
    if row.status == "open" && row.paid_ms.is_none() {
        if let Some(p) = payment.as_ref().filter(|p| p.status == "paid") {
            let paid = p.paid_ms.unwrap_or(now).min(now);
            s.ctx.db.with(|c| {
                c.execute(
                    "UPDATE mart_orders SET paid_ms = ?2 WHERE order_id = ?1 AND paid_ms IS NULL",
                    rusqlite::params![row.order_id, paid],
                )?;
                Ok(())
            })?;
            row.paid_ms = Some(paid);
        }
    }
    let mut v = s.view(&row, payment.as_ref(), now);
    if v["status"] == "awaiting_payment" {
        v["note"] = json!(format!("waiting for payment of {}", money(row.total, &row.currency)));
    }
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testkit::{get, pay, post, post_confirmed, rows, sandbox, tool};
    use crate::sandbox::{Sandbox, Service};
    use std::time::Duration;

    async fn stock_of(mart: &str, city: &str, q: &str, id: &str) -> i64 {
        let (_, v) = get(format!("{mart}/v1/products?city={city}&q={q}&limit=20")).await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {v}"))["stock"]
            .as_i64()
            .unwrap()
    }

    #[test]
    fn catalog_is_deterministic() {
        let key = |c: &[Product]| c.iter().map(|p| (p.id.clone(), p.price, p.initial_stock)).collect::<Vec<_>>();
        let a = catalog(42);
        assert_eq!(key(&a), key(&catalog(42)));
        assert_ne!(key(&a), key(&catalog(7)));
        assert_eq!(a.len(), cities::CITIES.len() * PRODUCTS.len());
        for c in cities::CITIES {
            let here: Vec<&Product> = a.iter().filter(|p| p.city.id == c.id).collect();
            assert_eq!(here.iter().filter(|p| p.initial_stock == 0).count(), 1, "one sold-out product per city");
            assert!(here.iter().all(|p| p.currency == c.currency && p.price > 0));
        }
        assert_eq!(eta_minutes(1), 33);
        assert_eq!(eta_minutes(9), 45);
    }

    #[tokio::test]
    async fn search_order_pay_and_deliver() {
        let (_dir, sb) = sandbox().await;
        let mart = sb.url(Service::Mart);

        let (s, v) = get(format!("{mart}/v1/products?city=上海&q=milk")).await;
        assert_eq!(s, 200, "{v}");
        tool("mart_search_products").validate_result(&v).unwrap();
        assert_eq!(v["items"][0]["id"], "sh-whole-milk");
        assert_eq!(v["items"][0]["currency"], "CNY");
        let (_, v) = get(format!("{mart}/v1/products?city=Seoul&category=과일")).await;
        let items = v["items"].as_array().unwrap();
        assert!(items.len() == 5 && items.iter().all(|p| p["category"] == "fruit" && p["currency"] == "KRW"), "{v}");
        let (_, v) = get(format!("{mart}/v1/products?city=Shanghai&q=香蕉")).await;
        assert_eq!(v["items"][0]["id"], "sh-bananas");
        assert_eq!(get(format!("{mart}/v1/products?q=milk")).await.0, 400);
        assert_eq!(get(format!("{mart}/v1/products?city=Shanghai&category=toys")).await.0, 400);

        let before = stock_of(&mart, "Shanghai", "bananas", "sh-bananas").await;
        assert!(before >= 2, "seed 42 stocks bananas in Shanghai");
        let args = json!({"city": "Shanghai", "items": [{"product_id": "sh-bananas", "quantity": 2}], "address": "Room 3, 10 Fuzhou Road"});
        tool("mart_order").validate(args.as_object().unwrap()).unwrap();
        let (s, q) = post(format!("{mart}/v1/orders/quote"), args.clone()).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!(q["summary"], "Bananas ×2 from Fresh Mart (Shanghai), deliver to Room 3, 10 Fuzhou Road");
        assert_eq!(stock_of(&mart, "Shanghai", "bananas", "sh-bananas").await, before, "a quote holds nothing");

        let (s, o) = post(format!("{mart}/v1/orders"), args).await;
        assert_eq!(s, 200, "{o}");
        tool("mart_order").validate_result(&o).unwrap();
        assert_eq!((o["status"].as_str(), o["amount"].as_i64()), (Some("awaiting_payment"), q["amount"].as_i64()));
        assert_eq!(stock_of(&mart, "Shanghai", "bananas", "sh-bananas").await, before - 2);
        let id = o["order_id"].as_str().unwrap();
        let status = async || {
            let (s, v) = get(format!("{mart}/v1/orders/{id}")).await;
            assert_eq!(s, 200, "{v}");
            tool("mart_order_status").validate_result(&v).unwrap();
            v["status"].as_str().unwrap().to_string()
        };
        sb.clock.advance(Duration::from_secs(20 * 60));
        assert_eq!(status().await, "awaiting_payment", "unpaid orders never move on");

        pay(&sb, &o, "wechat").await;
        assert_eq!(status().await, "packing");
        sb.clock.advance(Duration::from_secs(11 * 60));
        assert_eq!(status().await, "delivering");
        sb.clock.advance(Duration::from_secs(25 * 60));
        assert_eq!(status().await, "delivered");
        assert_eq!(get(format!("{mart}/v1/orders/mo_nope")).await.0, 404);
        sb.stop().await;
    }

    #[tokio::test]
    async fn out_of_stock_is_refused() {
        let (dir, sb) = sandbox().await;
        let mart = sb.url(Service::Mart);
        let products = catalog(crate::sandbox::testkit::config(std::path::Path::new("unused")).seed);
        let sold_out = products.iter().find(|p| p.city.id == "shanghai" && p.initial_stock == 0).unwrap();
        let plenty = products.iter().find(|p| p.city.id == "shanghai" && p.initial_stock >= 8).unwrap();
        let order = |id: &str, n: i64| json!({"city": "Shanghai", "items": [{"product_id": id, "quantity": n}], "address": "1 Test Road"});

        let (s, e) = post(format!("{mart}/v1/orders"), order(&sold_out.id, 1)).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("out_of_stock")), "{e}");
        let (_, v) = get(format!("{mart}/v1/products?city=Shanghai&q={}", sold_out.name.en)).await;
        assert_eq!((v["items"][0]["stock"].as_i64(), v["items"][0]["in_stock"].as_bool()), (Some(0), Some(false)));

        let n = plenty.initial_stock;
        let (s, e) = post(format!("{mart}/v1/orders/quote"), order(&plenty.id, n + 1)).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("out_of_stock")), "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(&format!("only {n}")), "{e}");
        // Take all but one, then two more is too many, one is fine.
        let (s, o) = post(format!("{mart}/v1/orders"), order(&plenty.id, n - 1)).await;
        assert_eq!(s, 200, "{o}");
        assert_eq!(post(format!("{mart}/v1/orders"), order(&plenty.id, 2)).await.0, 409);
        assert_eq!(post(format!("{mart}/v1/orders"), order(&plenty.id, 1)).await.0, 200);
        assert_eq!(post(format!("{mart}/v1/orders"), order(&plenty.id, 1)).await.0, 409);
        let db = Sandbox::open_db(dir.path(), Service::Mart).unwrap();
        let left: i64 = db
            .query_row("SELECT stock FROM mart_stock WHERE product_id = ?1", [&plenty.id], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);

        // Actionable validation.
        let (s, e) = post(format!("{mart}/v1/orders/quote"), order("sh-unicorn-steak", 1)).await;
        assert!(s == 400 && e["error"]["message"].as_str().unwrap().contains("sh-"), "{e}");
        let (s, e) = post(format!("{mart}/v1/orders/quote"), order("se-bananas", 1)).await;
        assert!(s == 400 && e["error"]["message"].as_str().unwrap().contains("Seoul"), "{e}");
        let (s, _) = post(format!("{mart}/v1/orders/quote"), json!({"city": "Shanghai", "items": [{"product_id": plenty.id, "quantity": 1}], "address": ""})).await;
        assert_eq!(s, 400);
        sb.stop().await;
    }
    #[tokio::test]
    async fn confirmed_terms_must_match_at_execution() {
        let (dir, sb) = sandbox().await;
        let mart = sb.url(Service::Mart);
        let orders = || rows(dir.path(), Service::Mart, "mart_orders");
        let confirmed = async |amount: i64, currency: &str, body: &Value| {
            post_confirmed(format!("{mart}/v1/orders"), body.clone(), amount, currency).await
        };
        let args = json!({"city": "Seoul", "items": [{"product_id": "se-bananas", "quantity": 2}], "address": "12 Sejong-daero"});
        let (s, q) = post(format!("{mart}/v1/orders/quote"), args.clone()).await;
        assert_eq!((s, q["currency"].as_str()), (200, Some("KRW")), "{q}");
        let total = q["amount"].as_i64().unwrap();
        let before = stock_of(&mart, "Seoul", "bananas", "se-bananas").await;

        // Not the confirmed total (or currency): refused, no order, stock untouched.
        let (s, e) = confirmed(total - 500, "KRW", &args).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(&format!("not the {} you confirmed", money(total - 500, "KRW"))), "{e}");
        let (s, e) = confirmed(total, "CNY", &args).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("terms_changed")), "{e}");
        assert_eq!(orders(), 0);
        assert_eq!(stock_of(&mart, "Seoul", "bananas", "se-bananas").await, before);

        let (s, o) = confirmed(total, "KRW", &args).await;
        assert_eq!((s, o["amount"].as_i64()), (200, Some(total)), "{o}");
        assert_eq!(stock_of(&mart, "Seoul", "bananas", "se-bananas").await, before - 2);
        sb.stop().await;
    }
}

