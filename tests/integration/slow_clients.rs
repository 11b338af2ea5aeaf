//! The slow- and broken-client campaign (issue 23): while attackers hold
//! sockets that never read, half-close, or send their upgrade a byte at a
//! time, and streamed API replies nobody reads, another user keeps chatting.
//! The test asserts that every one of that user's replies finishes; it
//! prints the time to the first token before and during the attack.
//!
//! CI runs 4 attackers of each kind; `scripts/slow-clients.sh` runs 32
//! (`ERRAND_ATTACKERS`). Bounded: the attack ends with the test.

use crate::server_ws::{config, serve, Client, BOB};
use errand::agent::AgentOptions;
use errand::tools::ToolSet;
use futures_util::SinkExt;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// Alice's time to first token for `n` messages, in milliseconds (each reply must finish).
async fn alice_ttfts(url: &str, n: usize, tag: &str) -> Vec<f64> {
    let (mut c, w) = Client::hello(url, crate::server_ws::ALICE, None, 0).await;
    assert_eq!(w["type"], "welcome", "{w}");
    let mut out = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        c.send(json!({"type": "message", "id": format!("{tag}-{i}"), "text": "Say hello in five words."})).await;
        c.until("delta", 120).await;
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
        c.until("done", 120).await;
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_broken_clients_do_not_stop_other_users() {
    let attackers: usize = std::env::var("ERRAND_ATTACKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let mut cfg = config();
    // The attackers are one user (bob) with many sockets and requests.
    cfg.server.requests_per_minute = 100_000;
    cfg.server.connections_per_user = 4 * attackers + 8;
    cfg.server.max_connections = 16 * attackers + 64;
    let agent = AgentOptions { max_tokens: 24, constrain: false, ..Default::default() };
    let mut t = serve(crate::util::own_smol(), ToolSet::default(), cfg, agent).await;
    let url = t.ws_url();
    let before = alice_ttfts(&url, 3, "before").await;

    let mut held = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..attackers {
        // A reader that stops: asks for a long reply and never reads.
        let (mut c, _) = Client::hello(&url, BOB, None, 0).await;
        c.send(json!({"type": "message", "id": format!("stop-{i}"), "text": "Write a long story about a dragon."})).await;
        held.push(c);
        // A socket that half-closes after hello: it says no more, and reads nothing.
        let (mut h, _) = Client::hello(&url, BOB, None, 0).await;
        if let tokio_tungstenite::MaybeTlsStream::Plain(s) = h.ws.get_mut() {
            let _ = s.shutdown().await;
        }
        held.push(h);
        // A slow sender: the upgrade request, one byte every 200 ms.
        let addr = t.s().addr;
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
            for b in req.bytes() {
                if s.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
        // A streamed API reply nobody reads.
        let api = t.http("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(api)
                .bearer_auth(BOB)
                .json(&json!({"model": "m", "stream": true, "max_tokens": 400, "messages": [{"role": "user", "content": "Count to 400."}]}))
                .send()
                .await;
            // Hold the response unread for the length of the attack.
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(r);
        }));
    }
    // A broken frame on a stopped reader's socket must not matter either.
    if let Some(c) = held.first_mut() {
        let _ = c.ws.send(Message::Binary(vec![0xff; 64].into())).await;
    }
    let during = alice_ttfts(&url, 3, "during").await;
    println!(
        "slow clients: {attackers} of each kind (stopped reader, half-closed, byte-a-time upgrade, unread API stream); \
         alice's TTFT p50 {:.0} ms before, {:.0} ms during (every reply finished)",
        median(before),
        median(during)
    );
    for task in tasks {
        task.abort();
    }
    drop(held);
    t.stop().await;
}
