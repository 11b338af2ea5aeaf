//! Flow tests for mobility (scripted generator, real sandbox services).
//!
//! The ride flows (`book_ride`, `ride_price`, `cancel_ride`) and the bike
//! flows (`find_bikes`, `unlock_bike` (near a place or by the code on the bike), `lock_bike`)
//! of `tools/ride.json` and `tools/bike.json`, against the sandbox's ride,
//! bike and payment services (clock pinned at 2026-12-08T12:00+08:00, the
//! `demo` wallet pays).

use super::flow_tests::*;
use super::*;

/// The card a call step showed for `tool`.
fn card_of(ev: &[AgentEvent], tool: &str) -> Option<present::Card> {
    ev.iter().find_map(|e| match e {
        AgentEvent::Card(c) if c.tool == tool => Some(c.clone()),
        _ => None,
    })
}

/// The orders confirmed by this input.
fn orders(ev: &[AgentEvent]) -> Vec<Value> {
    ev.iter()
        .filter_map(|e| match e {
            AgentEvent::Order { order, .. } => Some(order.clone()),
            _ => None,
        })
        .collect()
}

/// The price of the quote of `class` in a `ride_quote` card.
fn price_of(card: &present::Card, class: &str) -> i64 {
    let items = card.data["items"].as_array().unwrap_or_else(|| panic!("{:?}", card.data));
    let q = items.iter().find(|q| q["class"] == class).unwrap_or_else(|| panic!("no {class} in {:?}", card.data));
    q["price"].as_i64().unwrap()
}

#[tokio::test]
async fn a_ride_is_quoted_booked_and_paid_once() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w
        .say(
            "Book me an economy ride from People's Square to the Bund now.",
            Some("start book_ride\nset pickup People's Square\nset dropoff the Bund\nset vehicle_class economy"),
        )
        .await;
    let c = calls(&ev);
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(c[0], ("ride_quote".to_string(), json!({"pickup": "People's Square", "dropoff": "the Bund", "vehicle_class": "economy"})));
    assert_eq!(c[1].0, "ride_request");
    assert!(c[1].1["quote_id"].as_str().is_some_and(|q| q.starts_with("rq_")), "{c:?}");
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((conf.tool.as_str(), conf.currency.as_str()), ("ride_request", "CNY"));
    // The one quote asked for is taken without a question; the confirmation states the trip.
    assert_eq!(conf.amount, 2350, "{conf:?}");
    assert!(conf.summary.contains("Economy") && conf.summary.contains("The Bund"), "{conf:?}");
    assert!(!words(&ev).contains("Which car"), "{}", words(&ev));
    let ev = w.confirm(&conf.token).await;
    let p = payments(&ev);
    assert_eq!(p.len(), 1, "{ev:#?}");
    assert_eq!((p[0].status.as_str(), p[0].amount, p[0].currency.as_str()), ("paid", conf.amount, "CNY"));
    let o = orders(&ev);
    assert_eq!(o.len(), 1, "{ev:#?}");
    assert_eq!(o[0]["class"], "economy");
    assert!(o[0]["ride_id"].as_str().is_some_and(|r| r.starts_with("ride_")), "{o:?}");
    // Confirming again moves nothing.
    let ev = w.confirm(&conf.token).await;
    assert!(payments(&ev).is_empty(), "{ev:#?}");
    assert_eq!(w.wallet().await, start - conf.amount);
    assert!(w.agent().pending("s").await.is_none());
}

#[tokio::test]
async fn the_destination_is_asked_then_the_car_is_picked_by_name_without_the_model() {
    let w = World::new().await;
    let ev = w.say("Book me a ride.", Some("start book_ride")).await;
    assert!(calls(&ev).is_empty(), "{ev:#?}");
    assert!(words(&ev).contains("Where would you like to go"), "{}", words(&ev));
    // No pickup: the service assumes the current location; every class is quoted.
    let ev = w.say("Pudong Airport", Some("set dropoff Pudong Airport")).await;
    assert_eq!(calls(&ev), vec![("ride_quote".to_string(), json!({"dropoff": "Pudong Airport"}))]);
    let quotes = card_of(&ev, "ride_quote").unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(quotes.options.len(), 4, "{quotes:?}");
    assert!(confirmation(&ev).is_none());
    assert!(words(&ev).contains("Which car"), "{}", words(&ev));
    // "Comfort" names an option: no model call.
    let ev = w.say("Comfort", None).await;
    assert_eq!(calls(&ev).iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), vec!["ride_request"]);
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(conf.amount, price_of(&quotes, "comfort"));
}

#[tokio::test]
async fn a_declined_ride_can_change_class_and_only_the_new_quote_pays() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w
        .say("从静安寺打专车去上海虹桥站。", Some("start book_ride\nset pickup 静安寺\nset dropoff 上海虹桥站"))
        .await;
    // 专车 is premium, read by code from the words.
    assert_eq!(calls(&ev)[0].1["vehicle_class"], "premium", "{ev:#?}");
    let premium = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    let ev = w.say("不要", None).await;
    assert!(payments(&ev).is_empty());
    assert!(w.agent().pending("s").await.is_none());
    assert!(words(&ev).contains("没有付款"), "{}", words(&ev));
    // Both classes are named: the model's value is checked against the words.
    let ev = w.say("专车太贵了，还是换成快车吧。", Some("set vehicle_class economy")).await;
    let c = calls(&ev);
    assert_eq!(c[0].0, "ride_quote");
    assert_eq!(c[0].1["vehicle_class"], "economy");
    assert_eq!(c[0].1["pickup"], "静安寺");
    let economy = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(economy.amount < premium.amount, "{} vs {}", economy.amount, premium.amount);
    let ev = w.confirm(&premium.token).await;
    assert!(payments(&ev).is_empty(), "the declined quote paid: {ev:#?}");
    let ev = w.confirm(&economy.token).await;
    assert_eq!(payments(&ev).len(), 1, "{ev:#?}");
    assert_eq!(w.wallet().await, start - economy.amount);
}

#[tokio::test]
async fn a_korean_ride_reads_the_class_from_the_words_and_quotes_in_won() {
    let w = World::new().await;
    let ev = w
        .say("명동에서 강남역까지 일반 택시 불러 줘", Some("start book_ride\nset pickup 명동\nset dropoff 강남역"))
        .await;
    let c = calls(&ev);
    assert_eq!(c[0], ("ride_quote".to_string(), json!({"pickup": "명동", "dropoff": "강남역", "vehicle_class": "economy"})));
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((conf.tool.as_str(), conf.currency.as_str()), ("ride_request", "KRW"));
    assert!(conf.amount >= 10_000, "{conf:?}");
}

#[tokio::test]
async fn a_price_question_quotes_and_opens_no_confirmation() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w
        .say(
            "How much is a ride from People's Square to Pudong Airport?",
            Some("start ride_price\nset pickup People's Square\nset dropoff Pudong Airport"),
        )
        .await;
    assert_eq!(calls(&ev), vec![("ride_quote".to_string(), json!({"pickup": "People's Square", "dropoff": "Pudong Airport"}))]);
    let quotes = card_of(&ev, "ride_quote").unwrap_or_else(|| panic!("the prices were not shown: {ev:#?}"));
    assert_eq!(quotes.options.len(), 4);
    assert!(confirmation(&ev).is_none(), "{ev:#?}");
    assert!(w.agent().pending("s").await.is_none());
    assert!(!words(&ev).contains("Which car"), "{}", words(&ev));
    // The flow is over: thanks is small talk, no question comes back.
    let ev = w.say_all("OK, thanks.", &["chat", "You're welcome."]).await;
    assert!(calls(&ev).is_empty(), "{ev:#?}");
    assert!(confirmation(&ev).is_none());
    assert!(!words(&ev).contains("Where"), "{}", words(&ev));
    assert_eq!(w.wallet().await, start);
}

#[tokio::test]
async fn a_chinese_price_question_for_one_class_quotes_only_that_class() {
    let w = World::new().await;
    let ev = w
        .say("从静安寺打专车去上海虹桥站要多少钱？", Some("start ride_price\nset pickup 静安寺\nset dropoff 上海虹桥站"))
        .await;
    let c = calls(&ev);
    assert_eq!(c, vec![("ride_quote".to_string(), json!({"pickup": "静安寺", "dropoff": "上海虹桥站", "vehicle_class": "premium"}))]);
    assert_eq!(card_of(&ev, "ride_quote").map(|c| c.options.len()), Some(1));
    assert!(confirmation(&ev).is_none(), "{ev:#?}");
}

#[tokio::test]
async fn a_price_question_inside_a_food_order_ends_and_the_order_resumes() {
    let w = World::new().await;
    let ev = w
        .say("Find me xiaolongbao delivery near Hongqiao Railway Station", Some("start order_food\nset place Hongqiao Railway Station\nset dish xiaolongbao"))
        .await;
    assert!(words(&ev).contains("Which restaurant"), "{}", words(&ev));
    let ev = w
        .say(
            "Wait, before that: how much is a taxi from Hongqiao Railway Station to People's Square right now?",
            Some("start ride_price\nset pickup Hongqiao Railway Station\nset dropoff People's Square"),
        )
        .await;
    let c = calls(&ev);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0].0, "ride_quote");
    assert_eq!((c[0].1["pickup"].as_str(), c[0].1["dropoff"].as_str()), (Some("Hongqiao Railway Station"), Some("People's Square")));
    assert!(confirmation(&ev).is_none(), "{ev:#?}");
    // The price is an answer: the food order is back, at its question.
    assert!(words(&ev).contains("Back to"), "{}", words(&ev));
    assert!(words(&ev).contains("Which restaurant"), "{}", words(&ev));
    let ev = w
        .say("Two portions from Nanxiang, delivered to 88 Shenhong Road.", Some("set restaurant Nanxiang\nset quantity 2\nset address 88 Shenhong Road"))
        .await;
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((conf.tool.as_str(), conf.amount), ("food_order", 38 * 2 * 100 + 600));
}

#[tokio::test]
async fn a_booked_ride_is_cancelled_and_refunded() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w
        .say(
            "Get me an economy car from Hongqiao Railway Station to the Bund.",
            Some("start book_ride\nset pickup Hongqiao Railway Station\nset dropoff the Bund\nset vehicle_class economy"),
        )
        .await;
    let booked = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    let ev = w.confirm(&booked.token).await;
    assert_eq!(payments(&ev).len(), 1, "{ev:#?}");
    let ride_id = orders(&ev)[0]["ride_id"].as_str().unwrap().to_owned();
    assert_eq!(w.wallet().await, start - booked.amount);
    // The only ride of this conversation is the one cancelled, without asking which.
    let ev = w.say("Cancel my ride.", Some("start cancel_ride")).await;
    assert_eq!(calls(&ev), vec![("ride_cancel".to_string(), json!({"ride_id": ride_id}))]);
    let cancel = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(cancel.tool, "ride_cancel");
    // No driver yet (the clock stands still): free, the whole fare comes back.
    assert_eq!(cancel.amount, 0, "{cancel:?}");
    let ev = w.confirm(&cancel.token).await;
    assert!(payments(&ev).is_empty(), "a cancellation paid: {ev:#?}");
    let o = orders(&ev);
    assert_eq!(o.len(), 1, "{ev:#?}");
    assert_eq!((o[0]["ride_id"].as_str(), o[0]["status"].as_str()), (Some(ride_id.as_str()), Some("cancelled")));
    assert_eq!(w.wallet().await, start);
    assert!(w.agent().pending("s").await.is_none());
}

#[tokio::test]
async fn a_bike_is_found_unlocked_and_locked_and_only_the_lock_pays() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w.say("Unlock a bike near People's Square", Some("start unlock_bike\nset near People's Square")).await;
    assert_eq!(calls(&ev), vec![("bike_find".to_string(), json!({"near": "People's Square"}))]);
    let bikes = card_of(&ev, "bike_find").unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(bikes.options.len() >= 2, "{bikes:?}");
    assert!(confirmation(&ev).is_none());
    assert!(words(&ev).contains("Which bike"), "{}", words(&ev));
    let first = bikes.data["items"][0]["bike_code"].as_str().unwrap().to_owned();
    // "1" picks the nearest: no model call.
    let ev = w.say("1", None).await;
    assert_eq!(calls(&ev), vec![("bike_unlock".to_string(), json!({"bike_code": first}))]);
    let unlock = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((unlock.amount, unlock.currency.as_str()), (150, "CNY"));
    let ev = w.confirm(&unlock.token).await;
    assert!(payments(&ev).is_empty(), "unlocking paid: {ev:#?}");
    let o = orders(&ev);
    assert_eq!((o[0]["bike_code"].as_str(), o[0]["status"].as_str()), (Some(first.as_str()), Some("riding")), "{o:?}");
    let ride_id = o[0]["bike_ride_id"].as_str().unwrap().to_owned();
    assert!(words(&ev).contains(&first), "{}", words(&ev));
    assert_eq!(w.wallet().await, start);
    // The bike of this conversation is locked without asking which.
    let ev = w.say("I'm done riding. Lock the bike and pay.", Some("start lock_bike")).await;
    assert_eq!(calls(&ev), vec![("bike_lock".to_string(), json!({"bike_ride_id": ride_id}))]);
    let lock = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((lock.tool.as_str(), lock.amount, lock.currency.as_str()), ("bike_lock", 150, "CNY"));
    let ev = w.confirm(&lock.token).await;
    let p = payments(&ev);
    assert_eq!(p.len(), 1, "{ev:#?}");
    assert_eq!((p[0].status.as_str(), p[0].amount), ("paid", 150));
    assert_eq!(w.wallet().await, start - 150);
}

#[tokio::test]
async fn a_bike_is_unlocked_by_its_code() {
    let w = World::new().await;
    let ev = w.say("帮我开锁这辆共享单车，车身编号SH-0022。", Some("start unlock_bike\nset bike_code SH-0022")).await;
    assert_eq!(calls(&ev), vec![("bike_unlock".to_string(), json!({"bike_code": "SH-0022"}))]);
    let c = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((c.tool.as_str(), c.amount, c.currency.as_str()), ("bike_unlock", 150, "CNY"));
    // Asked when missing; the bare answer is the code.
    let w = World::new().await;
    let ev = w.say("Unlock a bike for me by its code", Some("start unlock_bike")).await;
    assert!(words(&ev).contains("code on the bike"), "{}", words(&ev));
    let ev = w.say("SE-0008", Some("set bike_code SE-0008")).await;
    let c = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((c.amount, c.currency.as_str()), (1000, "KRW"));
}

#[tokio::test]
async fn a_bike_question_shows_bikes_and_unlocks_nothing() {
    let w = World::new().await;
    let ev = w.say("강남역 근처에 공유 자전거 있어?", Some("start find_bikes\nset near 강남역")).await;
    assert_eq!(calls(&ev), vec![("bike_find".to_string(), json!({"near": "강남역"}))]);
    let bikes = card_of(&ev, "bike_find").unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(bikes.data["items"][0]["bike_code"].as_str().is_some_and(|c| c.starts_with("SE-")), "{bikes:?}");
    assert!(confirmation(&ev).is_none());
    assert!(w.agent().pending("s").await.is_none());
}

#[tokio::test]
async fn a_changed_destination_is_quoted_again_and_the_class_named_is_booked() {
    let w = World::new().await;
    let ev = w
        .say("Get me a car from People's Square to Pudong Airport.", Some("start book_ride\nset pickup People's Square\nset dropoff Pudong Airport"))
        .await;
    assert_eq!(calls(&ev)[0].1["dropoff"], "Pudong Airport");
    assert!(confirmation(&ev).is_none());
    assert!(words(&ev).contains("Which car"), "{}", words(&ev));
    // The model gives only the new destination; "Economy" names the class
    // among the new quotes (the old quotes' ids are dropped).
    let ev = w
        .say("Wait, change of plans: take me to Hongqiao Railway Station instead. Economy is fine.", Some("set dropoff Hongqiao Railway Station"))
        .await;
    let c = calls(&ev);
    assert_eq!(c.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), vec!["ride_quote", "ride_request"], "{c:?}");
    assert_eq!(c[0].1["dropoff"], "Hongqiao Railway Station");
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(conf.summary.starts_with("Economy") && conf.summary.contains("Hongqiao"), "{conf:?}");
    assert!((7500..=10500).contains(&conf.amount), "{conf:?}");
}

#[tokio::test]
async fn an_unknown_destination_is_asked_again_without_a_call() {
    let w = World::new().await;
    let ev = w
        .say("Get me a car from People's Square to Moonlight Harbor Mall.", Some("start book_ride\nset pickup People's Square\nset dropoff Moonlight Harbor Mall"))
        .await;
    assert!(calls(&ev).is_empty(), "{ev:#?}");
    assert!(words(&ev).contains("Moonlight Harbor Mall"), "{}", words(&ev));
    assert!(words(&ev).contains("Where would you like to go"), "{}", words(&ev));
    let ev = w.say("Sorry, I meant the Bund. Economy is fine.", Some("set dropoff the Bund\nset vehicle_class economy")).await;
    assert_eq!(calls(&ev)[0], ("ride_quote".to_string(), json!({"pickup": "People's Square", "dropoff": "the Bund", "vehicle_class": "economy"})));
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(conf.amount, 2350);
}

#[tokio::test]
async fn two_tasks_in_one_message_the_ride_first_then_the_food_order_resumes() {
    let w = World::new().await;
    let start = w.wallet().await;
    // Six commands at most: the ride is started last, so it runs first and
    // code reads its class ("economy") from the words.
    let ev = w
        .say(
            "Two things: book me an economy ride from People's Square to the Bund now, and order one kung pao chicken from Shu Feng Sichuan Kitchen delivered to 200 Renmin Road.",
            Some("start order_food\nset dish kung pao chicken\nset address 200 Renmin Road\nstart book_ride\nset pickup People's Square\nset dropoff the Bund"),
        )
        .await;
    assert_eq!(calls(&ev)[0], ("ride_quote".to_string(), json!({"pickup": "People's Square", "dropoff": "the Bund", "vehicle_class": "economy"})));
    let ride = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((ride.tool.as_str(), ride.amount), ("ride_request", 2350));
    // Confirmed and paid, the food order goes on without being asked to
    // (the message named a restaurant, but no area to search near).
    let ev = w.confirm(&ride.token).await;
    assert_eq!(payments(&ev).len(), 1, "{ev:#?}");
    assert!(words(&ev).contains("Where should it be delivered"), "{}", words(&ev));
    assert_eq!(w.wallet().await, start - 2350);
}

// Behaviour public dialogues need: slots carried from an answered question,
// and orders of this conversation used up by the action taken on them.

/// ride-bund-hongqiao-zh, ride-myeongdong-gangnam-ko, payments-krw-ride-ko:
/// the trip of a finished price question is the trip booked next.
#[tokio::test]
async fn a_booking_after_a_price_question_keeps_the_trip() {
    let w = World::new().await;
    let ev = w.say("从外滩打车去虹桥火车站要多少钱？", Some("start ride_price\nset pickup 外滩\nset dropoff 虹桥火车站")).await;
    assert!(confirmation(&ev).is_none());
    let ev = w.say("叫一辆快车。", Some("start book_ride\nset vehicle_class economy")).await;
    let c = confirmation(&ev).unwrap_or_else(|| panic!("{}", words(&ev)));
    assert_eq!((c.tool.as_str(), c.currency.as_str()), ("ride_request", "CNY"));
}

/// bike-sim-unlock-lock-ko after a second bike: @orders lists each bike
/// ride once per confirmed step (unlocked, then locked and paid).
#[tokio::test]
async fn the_second_bike_is_locked_without_asking_which() {
    let w = World::new().await;
    for code in ["SH-0008", "SH-0009"] {
        let ev = w.say(&format!("Unlock bike {code}"), Some(&format!("start unlock_bike\nset bike_code {code}"))).await;
        let c = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
        w.confirm(&c.token).await;
        let ev = w.say("Lock the bike", Some("start lock_bike")).await;
        let c = confirmation(&ev).unwrap_or_else(|| panic!("{code}: {}", words(&ev)));
        w.confirm(&c.token).await;
    }
}

/// clarify-style: "cancel my ride" with no ride booked in this conversation.
#[tokio::test]
async fn cancelling_without_a_ride_ends_the_flow() {
    let w = World::new().await;
    let ev = w.say("Cancel my ride.", Some("start cancel_ride")).await;
    assert!(confirmation(&ev).is_none());
    // The next request is not answered with "nothing found" again.
    let ev = w.say("How much is a ride to the Bund?", Some("start ride_price\nset dropoff the Bund")).await;
    assert_eq!(calls(&ev).len(), 1, "{ev:#?}");
    assert!(!words(&ev).contains("found nothing"), "{}", words(&ev));
}
