//! Memory and the feed on the embedded store with the real MiniLM: the
//! ranking follows what people say and order, memories survive a restart,
//! forgetting works, and one user's memories never reach another.

use crate::util::{minilm, show};
use errand::memory::feed::{Feed, FeedItem, FeedQuery};
use errand::memory::keys::Kind;
use errand::memory::store::{EdgeStore, Store};
use errand::memory::{Memory, OrderMemory};
use errand::sandbox::{catalog, Service};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;

/// People's Square, Shanghai, at 19:00.
fn dinner_at_the_square() -> FeedQuery {
    let (_, p) = errand::world::cities::place("People's Square", Some("shanghai")).unwrap();
    FeedQuery { lat: Some(p.lat), lon: Some(p.lon), minute: Some(19 * 60), kinds: vec!["restaurant".into()], limit: 5, ..FeedQuery::default() }
}

async fn open(dir: &Path) -> Arc<Feed> {
    let store = Arc::new(Store::Edge(EdgeStore::open(dir.join("vectors")).unwrap()));
    let memory = Memory::open(store, minilm(), crate::util::clock()).await.unwrap();
    Feed::open(memory).await.unwrap()
}

async fn indexed(dir: &Path) -> Arc<Feed> {
    let f = open(dir).await;
    f.index(catalog::items(42, &Service::ALL)).await.unwrap();
    f
}

fn has(it: &FeedItem, tag: &str) -> bool {
    it.tags.iter().any(|t| t == tag)
}

fn food_order(rid: &str, dish: &str, qty: i64) -> Map<String, Value> {
    json!({"restaurant_id": rid, "items": [{"dish_id": dish, "quantity": qty}], "address": "88 Nanjing Road"}).as_object().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn stating_and_changing_preferences_changes_the_feed() {
    let dir = tempfile::tempdir().unwrap();
    let f = indexed(dir.path()).await;
    let m = f.memory().clone();
    let q = dinner_at_the_square();
    let base = f.feed("ana", &q).await.unwrap();
    assert_eq!(base.len(), 5, "{}", show("feed", &base));
    assert!(base.iter().all(|i| i.city == "shanghai" && i.kind == "restaurant"), "{}", show("feed", &base));
    assert!(base.iter().all(|i| !i.reason.is_empty()));

    m.remember("ana", "I love Sichuan food", None, "said").await.unwrap();
    let liked = f.feed("ana", &q).await.unwrap();
    assert!(has(&liked[0], "sichuan"), "a stated like moves Sichuan to the top{}", show("feed", &liked));
    assert_eq!(liked[0].reason_code, "said_like");
    assert_eq!(liked[0].reason, "because you said you like Sichuan");
    // Diversity: one liked cuisine does not take every slot.
    assert!(liked.iter().any(|i| !has(i, "sichuan")), "{}", show("feed", &liked));

    // Changing one's mind replaces the like.
    m.remember("ana", "I don't like Sichuan food any more", None, "said").await.unwrap();
    let list = m.list("ana").await.unwrap();
    assert_eq!(list.len(), 1, "the dislike replaced the like{}", show("memories", &list));
    assert_eq!(list[0].kind, Kind::Dislike);
    let disliked = f.feed("ana", &q).await.unwrap();
    assert!(disliked.iter().all(|i| !has(i, "sichuan")), "{}", show("feed", &disliked));

    // A diet is a rule, in any language.
    m.remember("ana", "我吃素", None, "said").await.unwrap();
    let veg = f.feed("ana", &FeedQuery { lang: errand::prompt::Lang::Zh, ..q.clone() }).await.unwrap();
    assert!(!veg.is_empty());
    assert!(veg.iter().all(|i| has(i, "vegetarian")), "{}", show("feed", &veg));
    assert_eq!(veg[0].reason_code, "diet");
    assert_eq!(veg[0].reason, "素食，符合你的饮食要求");

    // Forgetting the diet brings the rest back.
    assert!(m.forget_matching("ana", "I'm vegetarian").await.unwrap().is_some(), "the diet matches across languages by its tag");
    let after = f.feed("ana", &q).await.unwrap();
    assert!(after.iter().any(|i| !has(i, "vegetarian")), "{}", show("feed", &after));
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_make_the_usual_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let f = indexed(dir.path()).await;
    let m = f.memory().clone();
    let sh01 = f.by_ref("sh01").expect("the pinned Sichuan restaurant");
    assert!(sh01.tags.contains(&"sichuan".to_string()));
    let tags = f.tags_for(&food_order("sh01", "sh01-mapo-tofu", 1));
    assert!(tags.contains(&"sichuan".to_string()), "{tags:?}");
    let o = |rid: &str, dish: &str, q: i64| OrderMemory::new("food", "food_order", food_order(rid, dish, q), &format!("{q}× {dish} from {rid}"), 3800, "CNY");
    m.remember_order("bo", o("sh01", "sh01-mapo-tofu", 1), tags.clone()).await.unwrap();
    let other_tags = f.tags_for(&food_order("sh03", "x", 1));
    m.remember_order("bo", o("sh03", "sh03-x", 2), other_tags).await.unwrap();
    m.remember_order("bo", o("sh01", "sh01-mapo-tofu", 1), tags).await.unwrap();

    let u = m.usual("bo", Some("food")).await.unwrap().expect("a usual order");
    assert_eq!(u.times, 2);
    assert_eq!(u.order.arguments["restaurant_id"], "sh01");
    assert!(m.usual("bo", Some("ride")).await.unwrap().is_none(), "no usual ride");

    let feed = f.feed("bo", &dinner_at_the_square()).await.unwrap();
    let top = &feed[0];
    assert!(has(top, "sichuan"), "{}", show("feed", &feed));
    assert_eq!(top.reason_code, "often_ordered");
    assert_eq!(top.reason, "because you often order Sichuan food");
}

#[tokio::test(flavor = "multi_thread")]
async fn memories_and_the_index_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let f = indexed(dir.path()).await;
        f.memory().remember("cy", "Remember my office is at Jing'an Temple", None, "said").await.unwrap();
        f.memory().remember("cy", "I love dumplings and noodles", None, "said").await.unwrap();
        f.memory().list("cy").await.unwrap()
        // Dropped here without a flush, as a killed process would.
    };
    let f = open(dir.path()).await;
    assert_eq!(f.memory().list("cy").await.unwrap(), before);
    let stats = f.index(catalog::items(42, &Service::ALL)).await.unwrap();
    assert_eq!(stats.embedded, 0, "nothing changed, so nothing is embedded again: {stats:?}");
    assert_eq!(stats.unchanged, stats.total);
    // A catalog that changed is indexed incrementally.
    let mut items = catalog::items(42, &Service::ALL);
    items.truncate(items.len() - 3);
    items[0].text.push_str(" Now with a terrace.");
    let stats = f.index(items).await.unwrap();
    assert_eq!((stats.embedded, stats.removed), (1, 3), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn forgetting_deleting_and_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let f = indexed(dir.path()).await;
    let m = f.memory().clone();
    let a1 = m.remember("dee", "I love Sichuan food", None, "said").await.unwrap();
    m.remember("dee", "I'm allergic to seafood", None, "said").await.unwrap();
    m.remember("dee", "My cat is called Mochi", None, "said").await.unwrap();
    m.remember("eve", "I love Japanese food", None, "said").await.unwrap();

    // Another user can neither see, recall, forget nor rank by Dee's memories.
    assert!(m.list("eve").await.unwrap().iter().all(|x| x.user == "eve"));
    assert_eq!(m.list("eve").await.unwrap().len(), 1);
    let r = m.recall("eve", "Sichuan food", 5, &[Kind::Like, Kind::Dislike, Kind::Fact]).await.unwrap();
    assert!(r.iter().all(|(x, _)| x.user == "eve"), "{}", show("recall", &r));
    assert!(!m.forget("eve", a1.id).await.unwrap(), "not Eve's to forget");
    assert_eq!(m.list("dee").await.unwrap().len(), 3);
    let feed = f.feed("eve", &dinner_at_the_square()).await.unwrap();
    assert!(feed.iter().all(|i| i.reason_code != "said_like" || has(i, "japanese")), "{}", show("feed", &feed));

    // The dislike is a rule for Dee only.
    let fd = f.feed("dee", &FeedQuery { kinds: vec!["dish".into()], limit: 20, ..dinner_at_the_square() }).await.unwrap();
    assert!(fd.iter().all(|i| !has(i, "seafood")), "{}", show("feed", &fd));

    // Forget one by id, then by words, then all.
    assert!(m.forget("dee", a1.id).await.unwrap());
    assert!(!m.forget("dee", a1.id).await.unwrap(), "already gone");
    let gone = m.forget_matching("dee", "the name of my cat").await.unwrap().expect("matches the cat memory");
    assert!(gone.text.contains("Mochi"));
    assert!(m.forget_matching("dee", "my favourite football team").await.unwrap().is_none(), "nothing like it");
    assert_eq!(m.delete_all("dee").await.unwrap(), 1);
    assert!(m.list("dee").await.unwrap().is_empty());
    assert_eq!(m.list("eve").await.unwrap().len(), 1, "Eve keeps hers");
    assert!(m.remember("dee", "   ", None, "said").await.is_err(), "an empty memory is refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn qwen_reads_preferences_out_of_a_passing_remark() {
    use errand::memory::extract::extract;
    let engine = crate::util::qwen();
    let found = extract(engine, "By the way, I can't eat peanuts, and I really love spicy food.", "en").await.unwrap();
    assert!(found.iter().any(|(k, a, _)| *k == Kind::Dislike && a.to_lowercase().contains("peanut")), "{}", show("found", &found));
    assert!(found.iter().any(|(k, _, t)| *k == Kind::Like && t.contains(&"spicy".to_string())), "{}", show("found", &found));
    let none = extract(engine, "Get me a ride to the airport at 7, please.", "en").await.unwrap();
    assert!(none.is_empty(), "a request holds no preference{}", show("found", &none));
}
