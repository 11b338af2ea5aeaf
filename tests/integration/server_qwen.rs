//! The whole confirm-and-pay flow over the WebSocket protocol with the
//! default model: an order is quoted, the socket drops, the client resumes
//! and confirms, re-sends the confirmation after another drop, and exactly
//! one payment is made. The order's status updates are pushed, and only
//! its owner can see it.

use crate::agent_qwen::{charged_from, merchant_paid, trades};
use crate::server_ws::{config, serve, Client, ALICE, BOB, FLORIST};
use crate::util::{qwen_arc, repo, show};
use errand::agent::AgentOptions;
use errand::sandbox::Service;
use errand::tools::ToolSet;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn food_is_confirmed_after_a_reconnect_and_paid_exactly_once() {
    let tools = ToolSet::load_dir(&repo().join("tools")).unwrap();
    let mut t = serve(qwen_arc(), tools, config(), AgentOptions::default()).await;
    let sandbox = t.dir.path().join("sandbox");
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    let sid = w["session"].as_str().unwrap().to_owned();
    c.send(json!({"type": "message", "id": "m1", "text": "Order kung pao chicken from Shu Feng Sichuan Kitchen near People's Square, deliver to 88 Nanjing Road."}))
        .await;
    let conf = c.until("confirmation", 900).await;
    assert_eq!(conf["tool"], "food_order", "{conf}");
    let token = conf["token"].as_str().unwrap().to_owned();
    let amount = conf["amount"].as_i64().unwrap();
    c.until("done", 60).await;
    assert!(trades(&sandbox, "food").is_empty(), "nothing is ordered before the yes");
    drop(c);

    // A new connection learns the open confirmation from `welcome`.
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, Some(&sid), u64::MAX).await;
    assert_eq!(w["pending"]["token"], token.as_str(), "{w}");
    c.send(json!({"type": "confirm", "id": "c1", "token": token})).await;
    let paid = c.until("payment", 120).await;
    assert_eq!((paid["status"].as_str(), paid["amount"].as_i64(), paid["reply_to"].as_str()), (Some("paid"), Some(amount), Some("c1")), "{paid}");
    c.until("done", 60).await;
    drop(c);

    // The client never saw `done`, say, and sends c1 again: nothing runs.
    let (mut c, _) = Client::hello(&t.ws_url(), ALICE, Some(&sid), u64::MAX).await;
    c.send(json!({"type": "confirm", "id": "c1", "token": token})).await;
    let ack = c.until("ack", 10).await;
    assert_eq!(ack["duplicate"], true, "{ack}");
    // And the same token under a new id is refused by the agent: single use.
    c.send(json!({"type": "confirm", "id": "c2", "token": token})).await;
    c.until("done", 60).await;
    assert!(!c.seen.iter().any(|f| f["type"] == "payment" && f["reply_to"] == "c2"), "{}", show("frames", &c.seen));

    let t_rows = trades(&sandbox, "food");
    assert_eq!(t_rows.len(), 1, "{t_rows:?}");
    assert_eq!(charged_from(&sandbox, "alice", "CNY"), amount, "alice's wallet paid, once");
    assert_eq!(charged_from(&sandbox, "demo", "CNY"), 0);
    assert_eq!(merchant_paid(&sandbox, Service::Food).await.len(), 1);

    // The order's status is pushed as the kitchen moves on: move the
    // sandbox clock 45 minutes and wait for an `order` frame nobody asked for.
    let h = reqwest::Client::new();
    let first = c.of_type("order").last().map(|o| o["status"].clone());
    let sb = t.s().sandbox_url().unwrap().to_owned();
    let admin = errand::sandbox::sign::admin_credential(t.s().sandbox_secret());
    h.post(format!("{sb}/_admin/clock")).bearer_auth(admin).json(&json!({"seconds": 2700})).send().await.unwrap();
    let order = loop {
        let o = c.until("order", 60).await;
        if o["reply_to"].is_null() {
            break o;
        }
    };
    assert_eq!(order["app"], "food", "{order}");
    assert_ne!(Some(order["status"].clone()), first, "{}", show("frames", &c.seen));
    let oid = order["order_id"].as_str().unwrap().to_owned();

    // Alice sees her order, with its latest status; Bob and the unrelated
    // florist app do not.
    let mine: Value = h.get(t.http("/v1/orders")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    let rows = mine["orders"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{mine}");
    assert_eq!((rows[0]["order_id"].as_str(), rows[0]["amount"].as_i64()), (Some(oid.as_str()), Some(amount)));
    assert_eq!(rows[0]["status"], order["status"], "{mine}");
    let theirs: Value = h.get(t.http("/v1/orders")).bearer_auth(BOB).send().await.unwrap().json().await.unwrap();
    assert_eq!(theirs["orders"].as_array().unwrap().len(), 0, "{theirs}");
    let app: Value = h.get(t.http("/v1/orders")).bearer_auth(FLORIST).send().await.unwrap().json().await.unwrap();
    assert_eq!(app["orders"].as_array().unwrap().len(), 0, "{app}");
    t.stop().await;
}
