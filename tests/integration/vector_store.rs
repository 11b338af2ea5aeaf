//! The vector store's behaviour, written once over `VectorStore` and run on
//! both backends: embedded qdrant-edge always (in a temporary directory), a
//! Qdrant server when `ERRAND_QDRANT_URL` names one (e.g.
//! `http://localhost:6334`; collections get a random prefix and are dropped
//! afterwards). Edge-only tests cover what only the embedded store does:
//! reopening from disk, WAL recovery and `optimize`.

use errand::memory::store::{
    Cond, EdgeOptions, EdgeStore, FieldKind, Filter, Hit, Point, QdrantStore, Store, VectorStore,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::Path;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn point(id: u64, vector: Vec<f32>, payload: Value) -> Point {
    let Value::Object(payload) = payload else {
        panic!("payload must be an object")
    };
    Point {
        id,
        vector,
        payload,
    }
}

fn ids(hits: &[Hit]) -> Vec<u64> {
    hits.iter().map(|h| h.id).collect()
}

fn id_set(hits: &[Hit]) -> BTreeSet<u64> {
    hits.iter().map(|h| h.id).collect()
}

fn random_unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-4
}

fn range(key: &str, gte: Option<f64>, lte: Option<f64>) -> Cond {
    Cond::Range {
        key: key.into(),
        gte,
        lte,
    }
}

fn any_of(key: &str, values: &[&str]) -> Cond {
    Cond::AnyOf(key.into(), values.iter().map(|s| s.to_string()).collect())
}

/// Points 1..=10 with one payload field per filter kind: `user` a (odd ids)
/// or b, `n` = id, `pinned` every third, `tags` ["t{id%3}", "all"],
/// `score` = id/10 and an unindexed `kind`.
async fn load_filter_fixture<S: VectorStore>(store: &S, c: &str) {
    store
        .ensure_collection(
            c,
            4,
            &[
                ("user", FieldKind::Keyword),
                ("tags", FieldKind::Keyword),
                ("n", FieldKind::Integer),
                ("pinned", FieldKind::Bool),
                ("score", FieldKind::Float),
            ],
        )
        .await
        .unwrap();
    let points = (1..=10u64)
        .map(|id| {
            point(
                id,
                vec![1.0, id as f32 / 10.0, 0.0, 0.0],
                json!({
                    "user": if id % 2 == 1 { "a" } else { "b" },
                    "n": id,
                    "pinned": id % 3 == 0,
                    "tags": [format!("t{}", id % 3), "all"],
                    "score": id as f64 / 10.0,
                    "kind": if id <= 5 { "note" } else { "fact" },
                }),
            )
        })
        .collect();
    store.upsert(c, points).await.unwrap();
}

// ---------------------------------------------------------------------------
// The behaviours, generic over the backend
// ---------------------------------------------------------------------------

async fn ensure_collection_is_idempotent_and_checks_dim<S: VectorStore>(store: &S) {
    let c = "ensure";
    store
        .ensure_collection(c, 4, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    store
        .upsert(
            c,
            vec![point(1, vec![1.0, 0.0, 0.0, 0.0], json!({"user": "a"}))],
        )
        .await
        .unwrap();
    // Again, and with one more index: the points stay, the index is added.
    store
        .ensure_collection(c, 4, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    store
        .ensure_collection(
            c,
            4,
            &[("user", FieldKind::Keyword), ("n", FieldKind::Integer)],
        )
        .await
        .unwrap();
    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 1);

    let err = format!(
        "{:#}",
        store.ensure_collection(c, 8, &[]).await.unwrap_err()
    );
    assert!(
        err.contains('4') && err.contains('8') && err.contains("dimensional"),
        "{err}"
    );

    // The same index name with another type is refused rather than ignored.
    let err = store
        .ensure_collection(c, 4, &[("user", FieldKind::Integer)])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("user"), "{err:#}");
}

async fn search_returns_nearest_first_with_cosine_scores<S: VectorStore>(store: &S) {
    let c = "search";
    store.ensure_collection(c, 4, &[]).await.unwrap();
    store
        .upsert(
            c,
            vec![
                point(1, vec![1.0, 0.0, 0.0, 0.0], json!({"name": "same"})),
                point(2, vec![0.9, 0.1, 0.0, 0.0], json!({"name": "near"})),
                point(3, vec![0.0, 5.0, 0.0, 0.0], json!({"name": "orthogonal"})),
                point(4, vec![-2.0, 0.0, 0.0, 0.0], json!({"name": "opposite"})),
            ],
        )
        .await
        .unwrap();

    let hits = store
        .search(c, vec![1.0, 0.0, 0.0, 0.0], Filter::default(), 10)
        .await
        .unwrap();
    assert_eq!(ids(&hits), [1, 2, 3, 4]);
    let expected = [1.0, cosine(&[1.0, 0.0], &[0.9, 0.1]), 0.0, -1.0];
    for (hit, want) in hits.iter().zip(expected) {
        assert!(
            close(hit.score, want),
            "id {}: score {} != {want}",
            hit.id,
            hit.score
        );
    }
    assert_eq!(hits[1].payload["name"], "near");
    // Without payloads: the same ids and scores.
    let bare = store.search_ids(c, vec![1.0, 0.0, 0.0, 0.0], Filter::default(), 10).await.unwrap();
    assert_eq!(bare, hits.iter().map(|h| (h.id, h.score)).collect::<Vec<_>>());
    let filtered = store.search_ids(c, vec![1.0, 0.0, 0.0, 0.0], Filter::eq("name", json!("near")), 10).await.unwrap();
    assert_eq!(filtered.iter().map(|h| h.0).collect::<Vec<_>>(), [2]);

    // Cosine ignores length, of the query and of the stored vectors.
    let scaled = store
        .search(c, vec![3.0, 0.0, 0.0, 0.0], Filter::default(), 2)
        .await
        .unwrap();
    assert_eq!(ids(&scaled), [1, 2]);
    assert!(close(scaled[0].score, 1.0));

    assert!(store
        .search(c, vec![1.0, 0.0, 0.0, 0.0], Filter::default(), 0)
        .await
        .unwrap()
        .is_empty());

    // A query of the wrong length is an error naming the collection.
    let err = store
        .search(c, vec![1.0, 0.0], Filter::default(), 3)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("search"), "{err:#}");
}

async fn filters_match_eq_any_of_range_and_must_not<S: VectorStore>(store: &S) {
    let c = "filters";
    load_filter_fixture(store, c).await;
    let q = vec![1.0, 0.5, 0.0, 0.0];
    let cases: Vec<(&str, Filter, Vec<u64>)> = vec![
        ("eq string", Filter::eq("user", "a"), vec![1, 3, 5, 7, 9]),
        ("eq integer", Filter::eq("n", 4), vec![4]),
        ("eq bool", Filter::eq("pinned", true), vec![3, 6, 9]),
        (
            "eq unindexed",
            Filter::eq("kind", "note"),
            vec![1, 2, 3, 4, 5],
        ),
        (
            "any of array",
            Filter::default().and(any_of("tags", &["t1", "t2"])),
            vec![1, 2, 4, 5, 7, 8, 10],
        ),
        (
            "any of shared tag",
            Filter::default().and(any_of("tags", &["all"])),
            (1..=10).collect(),
        ),
        (
            "any of unknown",
            Filter::default().and(any_of("tags", &["nope"])),
            vec![],
        ),
        (
            "range integer",
            Filter::default().and(range("n", Some(3.0), Some(5.0))),
            vec![3, 4, 5],
        ),
        (
            "range float gte",
            Filter::default().and(range("score", Some(0.75), None)),
            vec![8, 9, 10],
        ),
        (
            "range float lte",
            Filter::default().and(range("score", None, Some(0.25))),
            vec![1, 2],
        ),
        (
            "must not",
            Filter::eq("user", "a").not(Cond::Eq("pinned".into(), json!(true))),
            vec![1, 5, 7],
        ),
        (
            "combined",
            Filter::eq("user", "b")
                .and(range("n", Some(4.0), None))
                .not(any_of("tags", &["t1"])),
            vec![6, 8],
        ),
    ];
    for (name, filter, want) in cases {
        let want: BTreeSet<u64> = want.into_iter().collect();
        let hits = store
            .search(c, q.clone(), filter.clone(), 100)
            .await
            .unwrap();
        assert_eq!(id_set(&hits), want, "search, {name}");
        let scrolled = store.scroll(c, filter.clone(), 100).await.unwrap();
        assert_eq!(id_set(&scrolled), want, "scroll, {name}");
        assert_eq!(
            store.count(c, filter).await.unwrap(),
            want.len(),
            "count, {name}"
        );
    }
}

async fn upsert_same_id_replaces_vector_and_payload<S: VectorStore>(store: &S) {
    let c = "replace";
    store
        .ensure_collection(c, 4, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    store
        .upsert(
            c,
            vec![point(
                1,
                vec![1.0, 0.0, 0.0, 0.0],
                json!({"user": "a", "text": "old"}),
            )],
        )
        .await
        .unwrap();
    store
        .upsert(
            c,
            vec![point(1, vec![0.0, 1.0, 0.0, 0.0], json!({"note": "new"}))],
        )
        .await
        .unwrap();

    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 1);
    let got = store.get(c, vec![1]).await.unwrap();
    let want: Map<String, Value> = json!({"note": "new"}).as_object().unwrap().clone();
    assert_eq!(got[0].payload, want, "the payload is replaced, not merged");
    assert_eq!(store.count(c, Filter::eq("user", "a")).await.unwrap(), 0);
    let hits = store
        .search(c, vec![0.0, 1.0, 0.0, 0.0], Filter::default(), 1)
        .await
        .unwrap();
    assert!(close(hits[0].score, 1.0), "the vector is replaced too");
}

async fn scroll_pages_through_all_matches_in_id_order<S: VectorStore>(store: &S) {
    let c = "scroll";
    store
        .ensure_collection(c, 4, &[("even", FieldKind::Bool)])
        .await
        .unwrap();
    // Inserted out of order and in several batches; scroll sorts by id.
    let mut order: Vec<u64> = (1..=250).collect();
    order.reverse();
    for chunk in order.chunks(60) {
        let points = chunk
            .iter()
            .map(|&id| {
                point(
                    id,
                    vec![1.0, id as f32, 0.0, 0.0],
                    json!({"even": id % 2 == 0, "i": id}),
                )
            })
            .collect();
        store.upsert(c, points).await.unwrap();
    }

    let all = store.scroll(c, Filter::default(), 1000).await.unwrap();
    assert_eq!(ids(&all), (1..=250).collect::<Vec<_>>());
    assert!(all.iter().all(|h| h.score == 0.0));
    assert!(all.iter().all(|h| h.payload["i"] == json!(h.id)));

    let even = store
        .scroll(c, Filter::eq("even", true), 1000)
        .await
        .unwrap();
    assert_eq!(ids(&even), (1..=125).map(|i| i * 2).collect::<Vec<_>>());

    // The limit cuts, on a page boundary and off one.
    assert_eq!(
        ids(&store.scroll(c, Filter::default(), 10).await.unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        ids(&store.scroll(c, Filter::default(), 130).await.unwrap()),
        (1..=130).collect::<Vec<_>>()
    );
    assert!(store
        .scroll(c, Filter::default(), 0)
        .await
        .unwrap()
        .is_empty());
}

async fn get_returns_requested_points_in_order<S: VectorStore>(store: &S) {
    let c = "get";
    store.ensure_collection(c, 4, &[]).await.unwrap();
    let points = (1..=5u64)
        .map(|id| point(id, vec![1.0, 0.0, 0.0, id as f32], json!({"i": id})))
        .collect();
    store.upsert(c, points).await.unwrap();

    let got = store.get(c, vec![3, 1, 99, 3]).await.unwrap();
    assert_eq!(
        ids(&got),
        [3, 1],
        "requested order, unknown ids skipped, no duplicates"
    );
    assert_eq!(got[0].payload["i"], 3);
    assert_eq!(got[0].score, 0.0);
    assert!(store.get(c, vec![]).await.unwrap().is_empty());
}

async fn delete_by_ids_and_by_filter<S: VectorStore>(store: &S) {
    let c = "delete";
    load_filter_fixture(store, c).await;

    store.delete(c, vec![1, 2, 404]).await.unwrap();
    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 8);
    assert!(store.get(c, vec![1, 2]).await.unwrap().is_empty());

    store
        .delete_where(c, Filter::eq("user", "a"))
        .await
        .unwrap();
    let left = store.scroll(c, Filter::default(), 100).await.unwrap();
    assert_eq!(ids(&left), [4, 6, 8, 10]);

    store
        .delete_where(c, Filter::default().and(range("n", Some(7.0), None)))
        .await
        .unwrap();
    assert_eq!(
        ids(&store.scroll(c, Filter::default(), 100).await.unwrap()),
        [4, 6]
    );

    // An empty filter would mean "everything": refused, nothing deleted.
    let err = store.delete_where(c, Filter::default()).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("at least one condition"),
        "{err:#}"
    );
    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 2);

    store.delete(c, vec![]).await.unwrap();
}

async fn count_with_and_without_filter<S: VectorStore>(store: &S) {
    let c = "count";
    store
        .ensure_collection(c, 4, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 0);
    load_filter_fixture(store, c).await;
    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 10);
    assert_eq!(store.count(c, Filter::eq("user", "b")).await.unwrap(), 5);
    assert_eq!(
        store.count(c, Filter::eq("user", "nobody")).await.unwrap(),
        0
    );
}

async fn tenants_are_isolated_by_filter<S: VectorStore>(store: &S) {
    let c = "tenants";
    store
        .ensure_collection(c, 4, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    // User a's points are the nearest to the query; b's are far away.
    let mut points = Vec::new();
    for i in 0..20u64 {
        points.push(point(
            i,
            vec![1.0, i as f32 / 100.0, 0.0, 0.0],
            json!({"user": "a"}),
        ));
        points.push(point(
            100 + i,
            vec![0.0, 0.0, 1.0, i as f32 / 100.0],
            json!({"user": "b"}),
        ));
    }
    store.upsert(c, points).await.unwrap();

    let q = vec![1.0, 0.0, 0.0, 0.0];
    let hits = store
        .search(c, q.clone(), Filter::eq("user", "b"), 50)
        .await
        .unwrap();
    assert_eq!(hits.len(), 20);
    assert!(
        hits.iter().all(|h| h.payload["user"] == "b" && h.id >= 100),
        "{hits:?}"
    );
    let top = store
        .search(c, q, Filter::eq("user", "b"), 3)
        .await
        .unwrap();
    assert!(top.iter().all(|h| h.payload["user"] == "b"));
    let scrolled = store
        .scroll(c, Filter::eq("user", "b"), 1000)
        .await
        .unwrap();
    assert!(scrolled.iter().all(|h| h.payload["user"] == "b"));
    assert_eq!(scrolled.len(), 20);
    assert_eq!(store.count(c, Filter::eq("user", "b")).await.unwrap(), 20);
}

async fn optimize_and_flush_keep_results<S: VectorStore>(store: &S) {
    let c = "bulk";
    store
        .ensure_collection(c, 8, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let points: Vec<Point> = (0..300u64)
        .map(|id| {
            point(
                id,
                random_unit(&mut rng, 8),
                json!({"user": if id % 2 == 0 { "a" } else { "b" }}),
            )
        })
        .collect();
    let probe = points[17].vector.clone();
    store.upsert(c, points).await.unwrap();
    store.optimize(c).await.unwrap();
    store.flush().await.unwrap();
    let hits = store
        .search(c, probe, Filter::eq("user", "b"), 1)
        .await
        .unwrap();
    assert_eq!(ids(&hits), [17]);
    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 300);
}

async fn bad_input_is_rejected_with_clear_errors<S: VectorStore>(store: &S) {
    let err = store
        .ensure_collection("Bad-Name", 4, &[])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("invalid collection name"),
        "{err:#}"
    );
    let err = store
        .ensure_collection("badkey", 4, &[("a.b", FieldKind::Keyword)])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("invalid payload key"),
        "{err:#}"
    );

    let c = "inputs";
    store.ensure_collection(c, 4, &[]).await.unwrap();
    let err = store
        .upsert(c, vec![point(1 << 53, vec![1.0; 4], json!({}))])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("2^53"), "{err:#}");
    let err = store
        .upsert(c, vec![point(1, vec![1.0; 3], json!({}))])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains(c),
        "names the collection: {err:#}"
    );
    let err = store
        .search(c, vec![1.0; 4], Filter::eq("score", 0.5), 3)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("range"),
        "floats need a range: {err:#}"
    );

    let err = store
        .count("never_created", Filter::default())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("never_created"), "{err:#}");
}

// ---------------------------------------------------------------------------
// Running the behaviours
// ---------------------------------------------------------------------------

/// Every generic behaviour, in order, each on its own collection.
async fn run_suite<S: VectorStore>(store: &S) {
    ensure_collection_is_idempotent_and_checks_dim(store).await;
    search_returns_nearest_first_with_cosine_scores(store).await;
    filters_match_eq_any_of_range_and_must_not(store).await;
    upsert_same_id_replaces_vector_and_payload(store).await;
    scroll_pages_through_all_matches_in_id_order(store).await;
    get_returns_requested_points_in_order(store).await;
    delete_by_ids_and_by_filter(store).await;
    count_with_and_without_filter(store).await;
    tenants_are_isolated_by_filter(store).await;
    optimize_and_flush_keep_results(store).await;
    bad_input_is_rejected_with_clear_errors(store).await;
}

/// One edge test per behaviour, each in its own directory, so a failure
/// names the behaviour and the rest still run.
macro_rules! edge_tests {
    ($($behaviour:ident),* $(,)?) => {
        mod edge {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $behaviour() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = errand::memory::store::EdgeStore::open(dir.path()).unwrap();
                    super::$behaviour(&store).await;
                }
            )*
        }
    };
}

edge_tests!(
    ensure_collection_is_idempotent_and_checks_dim,
    search_returns_nearest_first_with_cosine_scores,
    filters_match_eq_any_of_range_and_must_not,
    upsert_same_id_replaces_vector_and_payload,
    scroll_pages_through_all_matches_in_id_order,
    get_returns_requested_points_in_order,
    delete_by_ids_and_by_filter,
    count_with_and_without_filter,
    tenants_are_isolated_by_filter,
    optimize_and_flush_keep_results,
    bad_input_is_rejected_with_clear_errors,
);

/// The run-time choice delegates: the whole suite through `Store::Edge`.
#[tokio::test(flavor = "multi_thread")]
async fn store_enum_runs_the_suite_on_edge() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::Edge(EdgeStore::open(dir.path()).unwrap());
    assert_eq!(store.backend(), "qdrant-edge");
    run_suite(&store).await;
}

/// The same suite against a Qdrant server, when one is configured.
#[tokio::test(flavor = "multi_thread")]
async fn qdrant_server_runs_the_suite() {
    let Ok(url) = std::env::var("ERRAND_QDRANT_URL") else {
        println!("qdrant_server_runs_the_suite: not run: ERRAND_QDRANT_URL is not set (e.g. http://localhost:6334)");
        return;
    };
    let prefix = format!("errand_test_{:08x}_", rand::random::<u32>());
    let store = QdrantStore::connect(&url, &prefix).unwrap();
    assert_eq!(store.backend(), "qdrant");
    // Run in a task so the collections are dropped even when the suite fails.
    let outcome = tokio::spawn(async move { run_suite(&store).await }).await;
    drop_collections(&url, &prefix).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Without a server, connecting still succeeds (the client is lazy, and
/// skips the version check that would block and print), and the first call
/// fails fast with an error naming the backend, operation and collection.
#[tokio::test(flavor = "multi_thread")]
async fn qdrant_unreachable_server_is_a_clear_error() {
    let store = QdrantStore::connect("http://127.0.0.1:9", "t_").unwrap();
    let started = std::time::Instant::now();
    let err = store.count("notes", Filter::default()).await.unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("qdrant: count") && err.contains("t_notes"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs() < 10,
        "took {:?}",
        started.elapsed()
    );
    assert!(QdrantStore::connect("http://127.0.0.1:9", "Bad-").is_err());
}

/// Removes the test's collections from the server.
async fn drop_collections(url: &str, prefix: &str) {
    let client = qdrant_client::Qdrant::from_url(url)
        .api_key(std::env::var("QDRANT_API_KEY").ok())
        .skip_compatibility_check()
        .build()
        .unwrap();
    let listed = client.list_collections().await.unwrap();
    for c in listed
        .collections
        .into_iter()
        .filter(|c| c.name.starts_with(prefix))
    {
        client.delete_collection(c.name).await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// Edge only
// ---------------------------------------------------------------------------

/// 50 points with payloads, in collection "mem" of dim 8.
async fn load_mem(store: &EdgeStore) -> Vec<Point> {
    store
        .ensure_collection("mem", 8, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let points: Vec<Point> = (1..=50u64)
        .map(|id| {
            point(
                id,
                random_unit(&mut rng, 8),
                json!({"user": if id <= 20 { "a" } else { "b" }, "i": id}),
            )
        })
        .collect();
    store.upsert("mem", points.clone()).await.unwrap();
    store.delete("mem", vec![50]).await.unwrap();
    points[..49].to_vec()
}

/// Checks that a store holds exactly what `load_mem` left.
async fn assert_mem_intact(store: &EdgeStore, points: &[Point]) {
    assert_eq!(store.count("mem", Filter::default()).await.unwrap(), 49);
    assert_eq!(
        store.count("mem", Filter::eq("user", "a")).await.unwrap(),
        20
    );
    let all = store.scroll("mem", Filter::default(), 1000).await.unwrap();
    assert_eq!(ids(&all), (1..=49).collect::<Vec<_>>());
    for (hit, p) in all.iter().zip(points) {
        assert_eq!(hit.payload, p.payload);
    }
    let hits = store
        .search("mem", points[30].vector.clone(), Filter::default(), 1)
        .await
        .unwrap();
    assert_eq!(ids(&hits), [31]);
    assert!(close(hits[0].score, 1.0));
}

/// Dropping the store without a flush and opening the directory again
/// gives back every point, the deletion, the payload index and the dim.
#[tokio::test(flavor = "multi_thread")]
async fn edge_reopen_after_drop_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = EdgeStore::open(dir.path()).unwrap();
    let points = load_mem(&store).await;
    drop(store);

    let store = EdgeStore::open(dir.path()).unwrap();
    // Opened lazily by the first call, without ensure_collection.
    assert_mem_intact(&store, &points).await;
    store
        .ensure_collection("mem", 8, &[("user", FieldKind::Keyword)])
        .await
        .unwrap();
    let err = store.ensure_collection("mem", 16, &[]).await.unwrap_err();
    assert!(format!("{err:#}").contains("8-dimensional"), "{err:#}");
}

/// A crash leaves the files as they are at that moment. Copying the
/// directory of a live, never-flushed store takes such a snapshot; opening
/// the copy must replay the WAL and find every acknowledged write.
#[tokio::test(flavor = "multi_thread")]
async fn edge_unflushed_writes_survive_a_crash_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = EdgeStore::open(dir.path()).unwrap();
    let points = load_mem(&store).await;

    let snapshot = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), snapshot.path());
    let recovered = EdgeStore::open(snapshot.path()).unwrap();
    assert_mem_intact(&recovered, &points).await;
    drop(store);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// After `optimize` builds an HNSW index over 2,000 random points, search
/// still finds the true nearest point: the exact (brute-force) top hit is
/// in the indexed search's top 5, and usually first.
#[tokio::test(flavor = "multi_thread")]
async fn edge_optimize_builds_an_index_that_keeps_the_top_hit() {
    const DIM: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    // Thresholds low enough that 2,000 x 32 floats (250 KB) get an index
    // and searches use it; the defaults (10 MB) would keep scanning exactly.
    let options = EdgeOptions {
        indexing_threshold_kb: Some(10),
        full_scan_threshold_kb: Some(1),
    };
    let store = EdgeStore::open_with(dir.path(), options).unwrap();
    let c = "vectors";
    store
        .ensure_collection(c, DIM, &[("group", FieldKind::Integer)])
        .await
        .unwrap();

    let mut rng = StdRng::seed_from_u64(42);
    let points: Vec<Point> = (0..2000u64)
        .map(|id| point(id, random_unit(&mut rng, DIM), json!({"group": id % 4})))
        .collect();
    for chunk in points.chunks(500) {
        store.upsert(c, chunk.to_vec()).await.unwrap();
    }
    let queries: Vec<Vec<f32>> = (0..10).map(|_| random_unit(&mut rng, DIM)).collect();

    // Before optimize: an exact scan, which must agree with brute force.
    assert_eq!(store.indexed_vectors(c).await.unwrap(), 0);
    let mut exact_top = Vec::new();
    for q in &queries {
        let brute = points
            .iter()
            .max_by(|a, b| cosine(q, &a.vector).total_cmp(&cosine(q, &b.vector)))
            .unwrap();
        let hits = store
            .search(c, q.clone(), Filter::default(), 1)
            .await
            .unwrap();
        assert_eq!(hits[0].id, brute.id);
        assert!(close(hits[0].score, cosine(q, &brute.vector)));
        exact_top.push(brute.id);
    }

    store.optimize(c).await.unwrap();
    let indexed = store.indexed_vectors(c).await.unwrap();
    assert!(indexed >= 2000, "optimize indexed {indexed} vectors");
    assert_eq!(store.count(c, Filter::default()).await.unwrap(), 2000);

    let mut first = 0;
    for (q, want) in queries.iter().zip(&exact_top) {
        let hits = store
            .search(c, q.clone(), Filter::default(), 5)
            .await
            .unwrap();
        assert!(
            ids(&hits).contains(want),
            "exact top {want} not in the indexed top 5 {:?}",
            ids(&hits)
        );
        first += usize::from(hits[0].id == *want);
    }
    assert!(
        first >= 8,
        "the exact top hit came first for only {first} of 10 queries"
    );

    // Filtered search over the index honours the filter.
    let hits = store
        .search(c, queries[0].clone(), Filter::eq("group", 1), 20)
        .await
        .unwrap();
    assert_eq!(hits.len(), 20);
    assert!(hits.iter().all(|h| h.id % 4 == 1));

    // And the index survives a reopen.
    drop(store);
    let store = EdgeStore::open(dir.path()).unwrap();
    assert!(store.indexed_vectors(c).await.unwrap() >= 2000);
    let hits = store
        .search(c, queries[0].clone(), Filter::default(), 5)
        .await
        .unwrap();
    assert!(ids(&hits).contains(&exact_top[0]));
}

/// Shards are opened once per store and shared by concurrent callers.
#[tokio::test(flavor = "multi_thread")]
async fn edge_concurrent_writers_share_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let store = EdgeStore::open(dir.path()).unwrap();
    store.ensure_collection("shared", 4, &[]).await.unwrap();
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let points = (0..25u64)
                    .map(|i| {
                        point(
                            t * 100 + i,
                            vec![1.0, t as f32, i as f32, 0.0],
                            json!({"t": t}),
                        )
                    })
                    .collect();
                store.upsert("shared", points).await.unwrap();
                store.count("shared", Filter::eq("t", t)).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 25);
    }
    assert_eq!(store.count("shared", Filter::default()).await.unwrap(), 200);
}
