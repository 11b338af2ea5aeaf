//! Flow tests for what code reads from the words when the model's commands
//! are poor (scripted generator, real sandbox services, clock pinned at
//! 2026-12-08T12:00+08:00).
//!
//! Each script is what the 0.5B model wrote for these messages in the
//! public suite (or close to it, within this state's grammar): a place with
//! the words around it, a stale enum value, no pick for "the first one". The
//! executor must still run the task the person asked for.

use super::flow_tests::*;
use super::*;

#[tokio::test]
async fn the_place_and_the_salon_are_read_from_the_words_the_model_garbled() {
    let w = World::new().await;
    // The model copies the place with the salon's name around it and never
    // names the salon; the words name both.
    let ev = w
        .say(
            "Book me a haircut with Lily at Urban Cut near Jing'an Temple in Shanghai on December 12 at 3 pm.",
            Some("start book_salon\nset place Urban Cut near Jing'an Temple in\nset service haircut"),
        )
        .await;
    let c = calls(&ev);
    assert_eq!(c.first().map(|(t, a)| (t.as_str(), a["near"].clone())), Some(("salon_search", json!("Jing'an Temple"))), "{c:?}");
    assert!(c.iter().any(|(t, a)| t == "salon_slots" && a["salon_id"] == "shanghai-salon-7"), "{c:?}");
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("no confirmation: {}\n{c:?}", words(&ev)));
    assert_eq!(conf.tool, "salon_book");
    assert!(conf.summary.contains("Lily") && conf.summary.contains("Urban Cut") && conf.summary.contains("2026-12-12 15:00"), "{conf:?}");
    assert!(!words(&ev).contains("Which salon"), "{}", words(&ev));
}

#[tokio::test]
async fn a_class_changed_at_the_confirmation_is_quoted_again_though_the_model_kept_the_old_one() {
    let w = World::new().await;
    let ev = w.say("从静安寺打专车去上海虹桥站。", Some("start book_ride\nset vehicle_class premium")).await;
    let premium = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(premium.summary.contains("Premium"), "{premium:?}");
    // The model writes the old class again; the words name the new one.
    let ev = w.say("专车太贵了，还是换成快车吧。", Some("set vehicle_class premium")).await;
    let economy = confirmation(&ev).unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(economy.summary.contains("Economy"), "{economy:?}");
    assert!(economy.amount < premium.amount, "{premium:?} {economy:?}");
    // The first confirmation is void: only the new one pays.
    assert!(payments(&w.confirm(&premium.token).await).is_empty());
    let p = payments(&w.confirm(&economy.token).await);
    assert_eq!((p.len(), p.first().map(|p| p.amount)), (1, Some(economy.amount)));
}

#[tokio::test]
async fn the_address_after_its_cue_is_read_whole_and_the_trip_start_before_dao() {
    let w = World::new().await;
    // No address from the model: code reads the one after 送到.
    let ev = w.say("人民广场的蜀风川菜馆帮我点两份宫保鸡丁，送到人民路200号。", Some("start order_food\nset place 人民广场\nset dish 宫保鸡丁\nset quantity 2")).await;
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("no confirmation: {}", words(&ev)));
    assert!(conf.summary.contains("人民路200号") && conf.summary.contains("×2"), "{conf:?}");
    // The grammar gives the address slot only that address, and no other
    // slot any words from inside it ("路200号" is no dish).
    let a = crate::dialogue::command::Allowed {
        slots: vec![
            crate::dialogue::command::SlotRule { name: "dish".into(), values: None, digits: false, spans: Some(vec!["宫保鸡丁".into()]) },
            crate::dialogue::command::SlotRule { name: "address".into(), values: None, digits: false, spans: Some(vec!["人民路200号".into()]) },
        ],
        ..Default::default()
    };
    let g = crate::dialogue::command::grammar(&a);
    assert!(crate::dialogue::generate::matches_grammar(&g, "set dish 宫保鸡丁\nset address 人民路200号").is_ok());
    assert!(crate::dialogue::generate::matches_grammar(&g, "set dish 路200号").is_err());

    // "上海到杭州": the trip starts in Shanghai though the model set no start.
    let w = World::new().await;
    let ev = w.say("查一下12月10日上海到杭州的高铁。", Some("start book_train\nset date 12月10日")).await;
    let c = calls(&ev);
    assert_eq!(c.first().map(|(t, a)| (t.as_str(), a["from"].clone(), a["to"].clone())), Some(("tickets_search_trains", json!("上海"), json!("杭州"))), "{c:?}");
}

#[tokio::test]
async fn the_nearest_bike_on_screen_is_unlocked_by_its_place_in_the_list() {
    let w = World::new().await;
    let ev = w.say("강남역 근처에 공유 자전거 있어?", Some("start find_bikes\nset near 강남역")).await;
    let first = ev
        .iter()
        .find_map(|e| match e {
            AgentEvent::Card(c) if c.tool == "bike_find" => c.options.first().map(|o| o.id.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{ev:#?}"));
    // The model starts the unlock and copies the whole sentence as the bike's code.
    let ev = w.say("제일 가까운 자전거 잠금 해제해 줘.", Some("start unlock_bike")).await;
    let conf = confirmation(&ev).unwrap_or_else(|| panic!("no confirmation: {}", words(&ev)));
    assert_eq!(conf.tool, "bike_unlock");
    assert!(conf.summary.contains(&first), "{first} {conf:?}");
}

#[tokio::test]
async fn two_tasks_in_one_message_are_confirmed_one_after_the_other() {
    let w = World::new().await;
    let start = w.wallet().await;
    // The model starts only the ride; the train waits below it, read from its own part of the words.
    let ev = w.say("两件事：一是订12月10日上海到杭州的G6975二等座一张；二是现在叫一辆快车，从静安寺到外滩。", Some("start book_ride")).await;
    let ride = confirmation(&ev).unwrap_or_else(|| panic!("no confirmation: {}\n{:?}", words(&ev), calls(&ev)));
    assert_eq!(ride.tool, "ride_request");
    assert!(ride.summary.contains("Jing'an Temple") && ride.summary.contains("The Bund"), "{ride:?}");
    assert!(!words(&ev).contains("不认识"), "{}", words(&ev));
    // Paying the ride goes on to the train, whose number, class and count were said.
    let ev = w.confirm(&ride.token).await;
    assert_eq!(payments(&ev).len(), 1, "{ev:#?}");
    let train = confirmation(&ev).unwrap_or_else(|| panic!("no train confirmation: {}\n{:?}", words(&ev), calls(&ev)));
    assert_eq!(train.tool, "tickets_book");
    assert!(train.summary.contains("G6975") && train.summary.contains("second"), "{train:?}");
    let ev = w.confirm(&train.token).await;
    assert_eq!(payments(&ev).len(), 1, "{ev:#?}");
    assert_eq!(w.wallet().await, start - ride.amount - train.amount);
}
