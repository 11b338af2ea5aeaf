//! How results look: cards built from tool results, money, the agent's own
//! short sentences in English, Chinese and Korean, and the compact form of a
//! result that goes back into the model's context.

use crate::world::money::display as money;
use crate::prompt::Lang;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A structured result for a client to draw (train options, menus, quotes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Card {
    /// The manifest's card kind, e.g. `train_options`.
    pub kind: String,
    pub tool: String,
    pub app: String,
    /// The tool's answer, as the service gave it.
    pub data: Value,
    /// Choices a user can tap; each sends `reply` as their next message.
    pub options: Vec<CardOption>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CardOption {
    pub id: String,
    pub label: String,
    pub reply: String,
}

pub fn card(kind: &str, tool: &str, app: &str, data: &Value, lang: Lang) -> Card {
    let options = data["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|it| {
                    let id = it["id"].as_str()?.to_string();
                    let label = item_label(it, lang);
                    let reply = match lang {
                        Lang::Zh => format!("我选这个：{label}（{id}）"),
                        Lang::Ko => format!("이걸로 할게요: {label} ({id})"),
                        Lang::En => format!("I'll take this one: {label} ({id})"),
                    };
                    Some(CardOption { id, label, reply })
                })
                .collect()
        })
        .unwrap_or_default();
    Card {
        kind: kind.into(),
        tool: tool.into(),
        app: app.into(),
        data: data.clone(),
        options,
    }
}

fn localized(v: &Value, lang: Lang) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get(lang.code())
            .or_else(|| o.get("en"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A one-line description of a listed item from its most telling fields.
pub fn item_label(it: &Value, lang: Lang) -> String {
    const FIELDS: [&str; 14] = [
        "name", "title", "train_no", "number", "vehicle_class", "class", "cuisine", "venue", "depart", "datetime",
        "time", "stylist", "rating", "eta_pickup_minutes",
    ];
    let currency = it["currency"].as_str().unwrap_or("CNY");
    let mut parts: Vec<String> = FIELDS
        .iter()
        .filter_map(|f| {
            let v = localized(&it[*f], lang)?;
            Some(match *f {
                "rating" => format!("★{v}"),
                "eta_pickup_minutes" => format!("{v} min"),
                _ => v,
            })
        })
        .take(4)
        .collect();
    for f in ["price", "amount", "total"] {
        if let Some(a) = it[f].as_i64() {
            parts.push(money(a, currency));
            break;
        }
    }
    if parts.is_empty() {
        parts.push(it["id"].as_str().unwrap_or("?").to_string());
    }
    parts.join(" · ")
}

/// A tool result shortened for the model's small context: long strings cut,
/// lists capped, payment payloads dropped.
pub fn compact(v: &Value) -> Value {
    fn walk(v: &Value, depth: usize) -> Value {
        match v {
            Value::String(s) if s.chars().count() > 160 => Value::String(s.chars().take(160).collect::<String>() + "…"),
            Value::Array(a) => Value::Array(a.iter().take(5).map(|x| walk(x, depth + 1)).collect()),
            Value::Object(o) => {
                let mut m = Map::new();
                for (k, x) in o {
                    if matches!(k.as_str(), "qr_payload" | "prepay_id" | "created_ms") {
                        continue;
                    }
                    // Names in three languages: the model needs one or two.
                    if let Value::Object(names) = x {
                        if names.contains_key("en") && names.contains_key("zh") && names.len() <= 3 {
                            let mut short = Map::new();
                            short.insert("en".into(), names["en"].clone());
                            short.insert("zh".into(), names["zh"].clone());
                            m.insert(k.clone(), Value::Object(short));
                            continue;
                        }
                    }
                    m.insert(k.clone(), walk(x, depth + 1));
                }
                Value::Object(m)
            }
            other => other.clone(),
        }
    }
    walk(v, 0)
}

/// The agent's own sentences.
pub enum Say<'a> {
    Declined,
    DeclinedUnpaid,
    TooManySteps,
    Stopped,
    TokenInvalid,
    PriceChanged { quoted: String, now: String },
    Paid { amount: String, summary: &'a str },
    PaymentFailed { reason: &'a str },
    Insufficient { reason: &'a str },
    NeedInfo { fields: &'a [String] },
    RetryConfirm { reason: &'a str },
    Done { summary: &'a str },
    /// A payment that came back unknown turned out to have gone through.
    SettledPaid { amount: String, summary: &'a str },
    /// A payment that came back unknown turned out not to have happened.
    SettledUnpaid { amount: String, summary: &'a str },
}

pub fn say(lang: Lang, what: Say) -> String {
    match (what, lang) {
        (Say::Declined, Lang::En) => "OK, I have not placed it. Nothing was paid.".into(),
        (Say::Declined, Lang::Zh) => "好的，没有下单，也没有付款。".into(),
        (Say::Declined, Lang::Ko) => "알겠습니다. 주문하지 않았고 결제도 없었습니다.".into(),
        (Say::DeclinedUnpaid, Lang::En) => "OK, I will not pay it. Nothing was charged; the unpaid order lapses 30 minutes after it was placed.".into(),
        (Say::DeclinedUnpaid, Lang::Zh) => "好的，不付款了。没有扣款；未支付的订单在下单 30 分钟后自动失效。".into(),
        (Say::DeclinedUnpaid, Lang::Ko) => "알겠습니다. 결제하지 않겠습니다. 결제된 금액은 없으며, 미결제 주문은 주문 후 30분이 지나면 만료됩니다.".into(),
        (Say::Stopped, Lang::En) => "Stopped. Nothing further was done.".into(),
        (Say::Stopped, Lang::Zh) => "已停止，没有再做任何操作。".into(),
        (Say::Stopped, Lang::Ko) => "중단했습니다. 더 이상 아무것도 하지 않았습니다.".into(),
        (Say::TooManySteps, Lang::En) => "I could not finish that in a few steps. Could you say it more simply?".into(),
        (Say::TooManySteps, Lang::Zh) => "这件事我没能在几步内完成，能换个更简单的说法吗？".into(),
        (Say::TooManySteps, Lang::Ko) => "몇 단계 안에 끝내지 못했습니다. 조금 더 간단히 말씀해 주시겠어요?".into(),
        (Say::TokenInvalid, Lang::En) => "That confirmation is no longer valid (it expired, was used, or was replaced), so I charged nothing for it now.".into(),
        (Say::TokenInvalid, Lang::Zh) => "这个确认已失效（过期、已使用或已被替换），所以这次没有为它扣款。".into(),
        (Say::TokenInvalid, Lang::Ko) => "이 확인은 더 이상 유효하지 않아(만료, 사용됨 또는 대체됨) 이번에는 결제하지 않았습니다.".into(),
        (Say::PriceChanged { quoted, now }, Lang::En) => format!("The price changed from {quoted} to {now}, so I did not pay. Ask again for a new quote."),
        (Say::PriceChanged { quoted, now }, Lang::Zh) => format!("价格从 {quoted} 变成了 {now}，所以没有付款。请重新询价。"),
        (Say::PriceChanged { quoted, now }, Lang::Ko) => format!("가격이 {quoted}에서 {now}(으)로 바뀌어 결제하지 않았습니다. 다시 견적을 받아 주세요."),
        (Say::Paid { amount, summary }, Lang::En) => format!("Paid {amount}: {summary}."),
        (Say::Paid { amount, summary }, Lang::Zh) => format!("已支付 {amount}：{summary}。"),
        (Say::Paid { amount, summary }, Lang::Ko) => format!("{amount} 결제 완료: {summary}."),
        (Say::PaymentFailed { reason }, Lang::En) => format!("The payment did not go through: {reason}. The order is kept unpaid; top up the wallet and confirm again, or share a friend-pay link."),
        (Say::PaymentFailed { reason }, Lang::Zh) => format!("付款没有成功：{reason}。订单保留为未支付；充值后可再次确认，或发送代付链接。"),
        (Say::PaymentFailed { reason }, Lang::Ko) => format!("결제가 되지 않았습니다: {reason}. 주문은 미결제로 남아 있습니다. 충전 후 다시 확인하거나 대신 결제 링크를 보내세요."),
        (Say::Insufficient { reason }, Lang::En) => format!("The payment did not go through: insufficient balance ({reason}). The order is kept unpaid; top up the wallet and confirm again, or share a friend-pay link."),
        (Say::Insufficient { reason }, Lang::Zh) => format!("付款没有成功：余额不足（{reason}）。订单保留为未支付；充值后可再次确认，或发送代付链接。"),
        (Say::Insufficient { reason }, Lang::Ko) => format!("결제가 되지 않았습니다: 잔액이 부족합니다({reason}). 주문은 미결제로 남아 있습니다. 충전 후 다시 확인하거나 대신 결제 링크를 보내세요."),
        (Say::NeedInfo { fields }, Lang::En) => format!("Before I go ahead, could you tell me the {}?", fields.join(", ")),
        (Say::NeedInfo { fields }, Lang::Zh) => format!("继续之前，请告诉我：{}。", fields.join("、")),
        (Say::NeedInfo { fields }, Lang::Ko) => format!("진행하기 전에 알려 주세요: {}.", fields.join(", ")),
        (Say::Done { summary }, Lang::En) => format!("Done: {summary}."),
        (Say::Done { summary }, Lang::Zh) => format!("已完成：{summary}。"),
        (Say::Done { summary }, Lang::Ko) => format!("완료: {summary}."),
        (Say::RetryConfirm { reason }, Lang::En) => format!("{reason} You can confirm again to retry; you will not be charged twice."),
        (Say::RetryConfirm { reason }, Lang::Zh) => format!("{reason} 可以再次确认重试，不会重复扣款。"),
        (Say::RetryConfirm { reason }, Lang::Ko) => format!("{reason} 다시 확인하면 재시도합니다. 중복 결제되지 않습니다."),
        (Say::SettledPaid { amount, summary }, Lang::En) => format!("Update: the earlier payment of {amount} for {summary} did go through. It is paid; do not order it again."),
        (Say::SettledPaid { amount, summary }, Lang::Zh) => format!("更新：之前 {amount} 的付款（{summary}）已经成功，订单已支付，请不要重复下单。"),
        (Say::SettledPaid { amount, summary }, Lang::Ko) => format!("알림: 앞서 {summary}에 대한 {amount} 결제가 완료되었습니다. 결제된 주문이니 다시 주문하지 마세요."),
        (Say::SettledUnpaid { amount, summary }, Lang::En) => format!("Update: the earlier payment of {amount} for {summary} did not go through, and nothing was charged; that order has lapsed."),
        (Say::SettledUnpaid { amount, summary }, Lang::Zh) => format!("更新：之前 {amount} 的付款（{summary}）没有成功，没有扣款，该订单已失效。"),
        (Say::SettledUnpaid { amount, summary }, Lang::Ko) => format!("알림: 앞서 {summary}에 대한 {amount} 결제는 이루어지지 않았고 청구된 금액도 없습니다. 그 주문은 만료되었습니다."),
    }
}

/// A parameter name as words: `pickup_time` → "pickup time".
pub fn field_words(name: &str) -> String {
    name.trim_end_matches("_id").replace('_', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cards() {
        let data = json!({"items": [
            {"id": "q_1", "vehicle_class": "economy", "price": 8650, "currency": "CNY", "eta_pickup_minutes": 4},
            {"id": "r_2", "name": {"en": "Spicy House", "zh": "辣府", "ko": "매운집"}, "rating": 4.7},
            {"no_id": true}
        ]});
        let c = card("ride_quotes", "ride_quote", "ride", &data, Lang::Zh);
        assert_eq!(c.options.len(), 2);
        assert_eq!(c.options[0].label, "economy · 4 min · ¥86.50");
        assert_eq!(c.options[1].label, "辣府 · ★4.7");
        assert!(c.options[1].reply.contains("r_2"));
    }

    #[test]
    fn compact_keeps_what_matters() {
        let v = json!({"qr_payload": "x", "items": [1, 2, 3, 4, 5, 6, 7], "name": {"en": "A", "zh": "甲", "ko": "가"}, "d": "x".repeat(400)});
        let c = compact(&v);
        assert!(c.get("qr_payload").is_none());
        assert_eq!(c["items"].as_array().unwrap().len(), 5);
        assert_eq!(c["name"], json!({"en": "A", "zh": "甲"}));
        assert!(c["d"].as_str().unwrap().chars().count() <= 161);
    }
}
