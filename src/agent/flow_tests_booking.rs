//! Flow tests for booking (scripted generator, real sandbox services):
//! trains and shows (`tools/tickets.json`), salons (`tools/salon.json`) and
//! groceries (`tools/mart.json`). The sandbox clock is pinned at
//! 2026-12-08 12:00 +08:00, a Tuesday; the `demo` wallet pays.

use super::flow_tests::*;
use super::*;

/// The cards of a turn, by tool.
fn card<'a>(ev: &'a [AgentEvent], tool: &str) -> Option<&'a present::Card> {
    ev.iter().find_map(|e| match e {
        AgentEvent::Card(c) if c.tool == tool => Some(c),
        _ => None,
    })
}

fn tools_called(ev: &[AgentEvent]) -> Vec<String> {
    calls(ev).into_iter().map(|(t, _)| t).collect()
}

#[tokio::test]
async fn a_train_is_searched_chosen_booked_and_paid_once() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w.say("Find trains from Shanghai to Hangzhou tomorrow.", Some("start book_train\nset from Shanghai\nset to Hangzhou")).await;
    assert_eq!(calls(&ev), vec![("tickets_search_trains".to_string(), json!({"from": "Shanghai", "to": "Hangzhou", "date": "2026-12-09"}))]);
    let c = card(&ev, "tickets_search_trains").unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(c.options.iter().any(|o| o.label.contains("G6975") && o.label.contains("10:20")), "{:?}", c.options);
    assert!(words(&ev).contains("Which train"), "{}", words(&ev));
    assert!(confirmation(&ev).is_none());
    // The train by its number, the class and the count in one message.
    let ev = w
        .say("The 10:20 one, G6975. Two second-class tickets, please.", Some("set train G6975\nset seat_class second\nset quantity 2"))
        .await;
    assert_eq!(calls(&ev), vec![("tickets_book".to_string(), json!({"item_id": "G6975@2026-12-09", "seat_class": "second", "quantity": 2}))]);
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((q.tool.as_str(), q.amount, q.currency.as_str()), ("tickets_book", 2 * 7300, "CNY"));
    let ev = w.confirm(&q.token).await;
    let p = payments(&ev);
    assert_eq!(p.len(), 1, "{ev:#?}");
    assert_eq!((p[0].status.as_str(), p[0].amount), ("paid", 14600));
    assert!(w.confirm(&q.token).await.iter().all(|e| !matches!(e, AgentEvent::Payment(_))), "paid twice");
    assert_eq!(w.wallet().await, start - 14600);
}

#[tokio::test]
async fn a_seat_class_and_a_quantity_corrected_before_confirming_give_new_amounts() {
    let w = World::new().await;
    let start = w.wallet().await;
    // Date and class are read by code from the words; the train by its number.
    let ev = w.say("帮我订一张明天上海到杭州的G6975，一等座。", Some("start book_train\nset from 上海\nset to 杭州")).await;
    assert_eq!(tools_called(&ev), vec!["tickets_search_trains", "tickets_book"]);
    assert_eq!(calls(&ev)[0].1["date"], "2026-12-09");
    let first = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(first.amount, 11700);
    let ev = w.say("哦不对，还是二等座吧，便宜点。", Some("set seat_class second")).await;
    assert_eq!(tools_called(&ev), vec!["tickets_book"], "the search is not repeated");
    let second = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(second.amount, 7300);
    let ev = w.say("改成两张。", Some("set quantity 2")).await;
    let third = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(calls(&ev)[0].1, json!({"item_id": "G6975@2026-12-09", "seat_class": "second", "quantity": 2}));
    assert_eq!(third.amount, 14600);
    for old in [&first, &second] {
        assert!(payments(&w.confirm(&old.token).await).is_empty(), "a replaced confirmation paid");
    }
    let p = payments(&w.confirm(&third.token).await);
    assert_eq!(p.iter().map(|p| (p.status.as_str(), p.amount)).collect::<Vec<_>>(), vec![("paid", 14600)]);
    assert_eq!(w.wallet().await, start - 14600);
}

#[tokio::test]
async fn a_sold_out_class_is_told_with_the_other_trains_and_another_is_booked() {
    let w = World::new().await;
    // G6127's first class is sold out tomorrow (0 left).
    let ev = w.say("Book me one first-class seat on G6127 from Shanghai to Hangzhou tomorrow.", Some("start book_train\nset from Shanghai\nset to Hangzhou")).await;
    assert!(confirmation(&ev).is_none(), "{ev:#?}");
    assert!(words(&ev).contains("sold out"), "{}", words(&ev));
    let c = card(&ev, "tickets_search_trains").unwrap_or_else(|| panic!("the other trains are shown: {ev:#?}"));
    assert!(c.options.iter().any(|o| o.label.contains("G2966")), "{:?}", c.options);
    let ev = w.say("Then first class on G2966 instead.", Some("set train G2966\nset seat_class first")).await;
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(calls(&ev).last().unwrap().1, json!({"item_id": "G2966@2026-12-09", "seat_class": "first", "quantity": 1}));
    assert_eq!(q.amount, 11700);
}

#[tokio::test]
async fn a_korean_ktx_booking_uses_the_korean_classes() {
    let w = World::new().await;
    let ev = w.say("12월 10일에 서울에서 부산 가는 KTX 알아봐 줘.", Some("start book_train\nset from 서울\nset to 부산\nset date 12월 10일")).await;
    assert_eq!(calls(&ev).first().map(|c| c.1.clone()), Some(json!({"from": "서울", "to": "부산", "date": "2026-12-10"})), "{}", words(&ev));
    assert!(words(&ev).contains("어느 열차"), "{}", words(&ev));
    let data = &card(&ev, "tickets_search_trains").unwrap_or_else(|| panic!("{ev:#?}")).data;
    let train = &data["items"][1];
    let no = train["train_no"].as_str().unwrap().to_string();
    let price = train["seats"].as_array().unwrap().iter().find(|s| s["seat_class"] == "standard").unwrap()["price"].as_i64().unwrap();
    let ev = w.say(&format!("{no}, 일반실로 1장 예매해 줘."), Some(&format!("set train {no}\nset seat_class standard\nset quantity 1"))).await;
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((q.amount, q.currency.as_str()), (price, "KRW"));
    let p = payments(&w.confirm(&q.token).await);
    assert_eq!(p.iter().map(|p| (p.status.as_str(), p.amount)).collect::<Vec<_>>(), vec![("paid", price)]);
}

#[tokio::test]
async fn a_paid_train_ticket_is_cancelled_with_a_full_refund() {
    let w = World::new().await;
    let start = w.wallet().await;
    // The day after tomorrow: more than 24 hours ahead, so all comes back.
    let ev = w.say("订后天上海到杭州的G6975二等座一张。", Some("start book_train\nset from 上海\nset to 杭州\nset quantity 1")).await;
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(calls(&ev).last().unwrap().1["item_id"], "G6975@2026-12-10");
    assert_eq!(payments(&w.confirm(&q.token).await).len(), 1);
    assert_eq!(w.wallet().await, start - q.amount);
    // The one order of this conversation is taken without asking which.
    let ev = w.say("我不去了，把这张票退掉。", Some("start cancel_tickets")).await;
    let c = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((c.tool.as_str(), c.amount), ("tickets_cancel", 0), "{}", c.summary);
    assert!(calls(&ev)[0].1["order_id"].as_str().is_some_and(|id| !id.is_empty()));
    w.confirm(&c.token).await;
    assert_eq!(w.wallet().await, start, "the ticket was refunded in full");
    // Nothing is left to cancel.
    let ev = w.say("再退一次票。", Some("start cancel_tickets")).await;
    assert!(confirmation(&ev).is_none(), "{ev:#?}");
}

#[tokio::test]
async fn a_concert_is_picked_among_dates_and_booked_by_section() {
    let w = World::new().await;
    let start = w.wallet().await;
    // Jazz Night plays on two dates: asked which; "stand" is read by code.
    let ev = w.say("Two stand tickets for Jazz Night in Shanghai, please.", Some("start book_show\nset city Shanghai\nset query Jazz Night\nset quantity 2")).await;
    assert_eq!(calls(&ev)[0].0, "tickets_search_shows");
    assert!(confirmation(&ev).is_none());
    assert!(words(&ev).contains("Which one"), "{}", words(&ev));
    let ev = w.say("the first one", None).await;
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(calls(&ev)[0].1, json!({"item_id": "shanghai-20261209-6", "seat_class": "stand", "quantity": 2}));
    assert_eq!(q.amount, 2 * 36000);
    assert_eq!(payments(&w.confirm(&q.token).await).len(), 1);
    assert_eq!(w.wallet().await, start - 72000);
}

#[tokio::test]
async fn a_salon_haircut_is_booked_with_a_named_stylist_then_cancelled() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w.say("Which salons near People's Square can do a haircut tomorrow?", Some("start book_salon\nset place People's Square")).await;
    assert_eq!(calls(&ev), vec![("salon_search".to_string(), json!({"near": "People's Square", "service": "haircut"}))]);
    assert!(card(&ev, "salon_search").is_some_and(|c| c.options.iter().any(|o| o.label.contains("Silk Hair Lab"))), "{ev:#?}");
    assert!(words(&ev).contains("Which salon"), "{}", words(&ev));
    // The first salon by number (English names are not matched yet: see the gap below).
    let ev = w.say("The first one, with Amy at 2 pm.", Some("pick 1\nset stylist_name Amy\nset time 2 pm")).await;
    assert_eq!(calls(&ev)[0], ("salon_slots".to_string(), json!({"salon_id": "shanghai-salon-1", "date": "2026-12-09", "service": "haircut"})));
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(
        calls(&ev)[1],
        ("salon_book".to_string(), json!({"salon_id": "shanghai-salon-1", "stylist_id": "shanghai-salon-1-s3", "service": "haircut", "date": "2026-12-09", "time": "14:00"}))
    );
    assert_eq!(q.amount, 7800);
    // A new time before confirming: a new quote.
    let ev = w.say("Sorry, make it 4 pm instead.", Some("set time 4 pm")).await;
    let q2 = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(calls(&ev)[0].1["time"], "16:00");
    assert!(payments(&w.confirm(&q.token).await).is_empty());
    assert_eq!(payments(&w.confirm(&q2.token).await).iter().map(|p| p.amount).collect::<Vec<_>>(), vec![7800]);
    assert_eq!(w.wallet().await, start - 7800);
    // Cancelled more than 24 hours ahead? Tomorrow 16:00 is 28 hours away: free.
    let ev = w.say("Cancel my salon booking.", Some("start cancel_salon")).await;
    let c = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!((c.tool.as_str(), c.amount), ("salon_cancel", 0), "{}", c.summary);
    w.confirm(&c.token).await;
    assert_eq!(w.wallet().await, start);
}

#[tokio::test]
async fn a_stylist_named_before_the_date_is_kept_until_the_slots_are_known() {
    let w = World::new().await;
    // No date: asked; the salon, stylist and time are kept meanwhile.
    let ev = w
        .say("명동 블로썸 살롱에서 지우 디자이너한테 오후 6시 반에 커트 예약해 줘.", Some("start book_salon\nset place 명동\nset salon_name 블로썸 살롱\nset stylist_name 지우"))
        .await;
    assert_eq!(tools_called(&ev), vec!["salon_search"]);
    assert!(confirmation(&ev).is_none());
    assert!(words(&ev).contains("날짜"), "{}", words(&ev));
    // A month and day alone: code reads its next occurrence; no model.
    let ev = w.say("12월 10일.", None).await;
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(
        calls(&ev)[1].1,
        json!({"salon_id": "seoul-salon-4", "stylist_id": "seoul-salon-4-s3", "service": "haircut", "date": "2026-12-10", "time": "18:30"})
    );
    assert_eq!((q.amount, q.currency.as_str()), (23000, "KRW"));
}

#[tokio::test]
async fn a_grocery_order_asks_for_the_address_is_corrected_and_paid() {
    let w = World::new().await;
    let start = w.wallet().await;
    let ev = w.say("Order 2 kg of bananas from the Shanghai store.", Some("start order_groceries\nset city Shanghai\nset product bananas\nset quantity 2")).await;
    assert_eq!(calls(&ev), vec![("mart_search_products".to_string(), json!({"city": "Shanghai", "q": "bananas"}))]);
    assert!(card(&ev, "mart_search_products").is_some(), "the lone product's card is shown");
    assert!(confirmation(&ev).is_none());
    assert!(words(&ev).contains("delivery address"), "{}", words(&ev));
    let ev = w.say("88 Fuzhou Road", Some("set address 88 Fuzhou Road")).await;
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(calls(&ev)[0].1, json!({"city": "Shanghai", "items": [{"product_id": "sh-bananas", "quantity": 2}], "address": "88 Fuzhou Road"}));
    // ¥10.50 a kilo, ¥4 delivery under ¥59.
    assert_eq!(q.amount, 2 * 1050 + 400);
    let ev = w.say("Actually, make it 3 kg.", Some("set quantity 3")).await;
    let q2 = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(q2.amount, 3 * 1050 + 400);
    assert_eq!(payments(&w.confirm(&q2.token).await).iter().map(|p| p.amount).collect::<Vec<_>>(), vec![3550]);
    assert_eq!(w.wallet().await, start - 3550);
}

/// mart-bananas-en: a house number given alone ("10 Fuzhou Road") is no new quantity.
#[tokio::test]
async fn a_house_number_given_alone_is_not_a_quantity() {
    let w = World::new().await;
    w.say("Order 2 kg of bananas from the Shanghai store.", Some("start order_groceries\nset city Shanghai\nset product bananas\nset quantity 2")).await;
    let ev = w.say("10 Fuzhou Road", Some("set address 10 Fuzhou Road")).await;
    assert_eq!(calls(&ev)[0].1["items"][0]["quantity"], 2, "{ev:#?}");
    assert_eq!(confirmation(&ev).map(|c| c.amount), Some(2 * 1050 + 400));
}

#[tokio::test]
async fn a_sold_out_product_is_told_and_not_offered_for_payment() {
    let w = World::new().await;
    let start = w.wallet().await;
    // Beijing's Fuji apples are out of stock in the seeded store.
    let ev = w
        .say("帮我从北京的超市买1公斤富士苹果，送到三里屯路19号。", Some("start order_groceries\nset city 北京\nset product 富士苹果\nset address 三里屯路19号"))
        .await;
    assert_eq!(tools_called(&ev), vec!["mart_search_products", "mart_order"]);
    assert!(confirmation(&ev).is_none(), "{ev:#?}");
    assert!(words(&ev).contains("sold out") || words(&ev).contains("售罄"), "{}", words(&ev));
    assert_eq!(w.wallet().await, start);
}


// Gaps: what public dialogues need and the executor does not do yet. Each
// test states the wanted behaviour and is ignored until the executor has it.

/// salon-decline-en, salon-haircut-jingan-en: English salon names carry a
/// "·" ("Silk Hair Lab · People's Square"); they are matched word by word,
/// so "…, with Amy at 2 pm" does not pick Cloud Nine Hair · Hongqiao
/// International Airport by the "at" inside "International".
#[tokio::test]
async fn an_english_salon_name_picks_that_salon() {
    let w = World::new().await;
    w.say("Which salons near People's Square can do a haircut tomorrow?", Some("start book_salon\nset place People's Square")).await;
    let ev = w.say("Silk Hair Lab, with Amy at 2 pm.", Some("set salon_name Silk Hair Lab\nset stylist_name Amy\nset time 2 pm")).await;
    assert_eq!(calls(&ev)[0].1["salon_id"], "shanghai-salon-1", "{ev:#?}");
}

/// clarify-salon-date-ko ("12월 6일."), tickets-* ("December 4th"): a month
/// and day means its next occurrence, so a bare date answer needs no model.
#[tokio::test]
async fn a_bare_month_and_day_needs_no_model() {
    let w = World::new().await;
    w.say("명동 블로썸 살롱에서 지우 디자이너한테 오후 6시 반에 커트 예약해 줘.", Some("start book_salon\nset place 명동\nset salon_name 블로썸 살롱\nset stylist_name 지우")).await;
    let ev = w.say("12월 10일.", None).await;
    assert!(confirmation(&ev).is_some(), "{ev:#?}");
}

/// mart-change-quantity-ko ("1kg 말고 3kg으로"), 两公斤: counts followed by
/// kg, 公斤, 킬로 or 팩 are counts, so the model's `set quantity 3` is taken.
#[tokio::test]
async fn kilograms_are_counts() {
    let w = World::new().await;
    let ev = w.say("서울 마트에서 바나나 1kg 주문해 줘. 주소는 와우산로 94.", Some("start order_groceries\nset city 서울\nset product 바나나\nset quantity 1\nset address 와우산로 94")).await;
    let first = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    let ev = w.say("아, 잠깐. 1kg 말고 3kg으로 바꿔 줘.", Some("set quantity 3")).await;
    let second = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(second.amount > first.amount, "{} then {}", first.amount, second.amount);
}

/// tickets-interrupt-ride-price-zh ("就订上午10点20那班"), tickets-train-sh-hz-en
/// ("the 10:20 one"): the train is labelled by its number, but the one
/// leaving at the time said is picked (a known gap until code read times
/// against the options' data).
#[tokio::test]
async fn a_train_is_picked_by_its_departure_time() {
    let w = World::new().await;
    w.say("查一下明天上海到杭州的高铁。", Some("start book_train\nset from 上海\nset to 杭州")).await;
    let ev = w.say("就订上午10点20那班，二等座一张。", Some("set seat_class second")).await;
    assert_eq!(calls(&ev).last().map(|c| c.1["item_id"].clone()), Some(json!("G6975@2026-12-09")), "{ev:#?}");
}

/// Ji-woo is busy at 17:30 on 2026-12-10: the salon's refusal lists the
/// free times, and the next time said is booked without asking again. The
/// refused quote empties what the refusal names first (the time), not what
/// the message just gave (the date; a known gap until then).
#[tokio::test]
async fn a_busy_time_is_told_with_the_free_times_and_another_time_is_booked() {
    let w = World::new().await;
    w.say("명동 블로썸 살롱에서 지우 디자이너한테 오후 5시 반에 커트 예약해 줘.", Some("start book_salon\nset place 명동\nset salon_name 블로썸 살롱\nset stylist_name 지우")).await;
    // A bare date answers the question without the model.
    let ev = w.say("12월 10일.", None).await;
    assert!(confirmation(&ev).is_none());
    assert!(words(&ev).contains("18:30"), "{}", words(&ev));
    let ev = w.say("그럼 오후 6시 반으로 해 줘.", Some("set time 오후 6시 반")).await;
    let q = confirmation(&ev).unwrap_or_else(|| panic!("{}", words(&ev)));
    assert_eq!(calls(&ev).last().unwrap().1["time"], "18:30");
    assert_eq!(calls(&ev).last().unwrap().1["date"], "2026-12-10");
    assert_eq!(q.amount, 23000);
}
