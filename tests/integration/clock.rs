//! The check behind issue 21: once a test world is pinned, nothing in the
//! library may read the machine's clock, so no test's result depends on
//! the day it runs. A model-driven test that reached the wall clock would
//! panic here on every day, not fail on some.

use crate::util::{self, clock};
use errand::prompt::{Lang, Prompts};
use errand::world::Clock;

#[test]
fn reading_the_wall_clock_panics_once_a_test_world_is_pinned() {
    let pinned = clock();
    let wall = std::panic::catch_unwind(|| Clock::wall().now_ms());
    let msg = wall.expect_err("the wall clock is denied in these tests");
    let msg = msg.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| msg.downcast_ref::<String>().cloned()).unwrap_or_default();
    assert!(msg.contains("wall clock was read"), "{msg}");
    // The pinned clock still reads, at the tests' instant.
    let since = pinned.now_ms() - util::now_ms();
    assert!((0..60_000).contains(&since), "{since} ms after the tests' instant");
}

#[test]
fn the_prompt_says_the_pinned_date_in_every_language() {
    clock();
    let now = Clock::pinned(errand::world::clock::parse_instant(util::NOW).unwrap()).now_s();
    let p = Prompts::builtin();
    for (lang, weekday) in [(Lang::En, "Tuesday"), (Lang::Zh, "星期二"), (Lang::Ko, "화요일")] {
        let s = p.system(lang, now);
        assert!(s.contains("2026-12-08") && s.contains(weekday), "{lang:?}: {s}");
    }
}
