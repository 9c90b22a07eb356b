//! The generation worker under load: parallel clients get the answers a lone client gets,
//! requests beyond the batch wait their turn, and a client that goes away stops its
//! generation (streamed or not).

mod serve_support;

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::{json, Value};
use serve_support::*;

const PROMPTS: [&str; 4] = [
    "Who are you?",
    "你好，请介绍一下你自己。",
    "Tell me about fine-tuning.",
    "The quick brown fox",
];

fn greedy_request(prompt: &str, stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0,
           "max_tokens": 32, "stream": stream})
}

/// Send `clients` requests at once (prompt `i % 4`, every other one streamed) and check each
/// answer against the lone-client answer of its prompt.
fn parallel_answers_match(max_batch: usize, clients: usize) -> ftrun::serve::worker::StatsSnapshot {
    let server = start_server(false, None, max_batch);
    let addr = server.addr();
    let single: Vec<String> = PROMPTS
        .iter()
        .map(|p| content(&chat(addr, &greedy_request(p, false))))
        .collect();
    assert!(
        single
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1,
        "the prompts must get different answers for the test to see a mix-up: {single:?}"
    );
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let stream = i % 2 == 1;
                let body = greedy_request(PROMPTS[i % PROMPTS.len()], stream);
                barrier.wait();
                let response = chat(addr, &body);
                if stream {
                    streamed_content(&response)
                } else {
                    content(&response)
                }
            })
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        let answer = handle.join().unwrap();
        assert_eq!(answer, single[i % PROMPTS.len()], "client {i}");
    }
    let stats = server.stats();
    server.shutdown().unwrap();
    stats
}

#[test]
fn greedy_answers_of_32_parallel_clients_equal_the_single_client_answers() {
    let stats = parallel_answers_match(32, 32);
    assert_eq!(stats.finished, 32 + PROMPTS.len());
    assert_eq!(stats.failed + stats.cancelled, 0);
    // The requests really ran together, not one after another.
    assert!(stats.peak_batch > 1, "{stats:?}");
}

#[test]
fn requests_beyond_the_batch_size_wait_and_still_get_their_answers() {
    let stats = parallel_answers_match(3, 10);
    assert_eq!(stats.finished, 10 + PROMPTS.len());
    assert!(stats.peak_batch <= 3, "{stats:?}");
}

#[test]
fn a_client_that_disconnects_stops_its_generation() {
    let server = start_server(false, None, 8);
    let addr = server.addr();
    // Long answers: without the disconnect each would take all 400 tokens (or stop early,
    // which would count as finished, not cancelled).
    let body = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Who are you?"}], "temperature": 0,
               "max_tokens": 400, "stream": stream, "stop": []})
        .to_string()
    };
    let headers = [("Content-Type", "application/json")];

    // Streamed: read the first content chunk, then hang up.
    let body_stream = body(true);
    let mut conn = send_request(
        addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        Some(body_stream.as_bytes()),
    );
    read_until(&mut conn, "\"content\":\"");
    drop(conn);
    assert!(
        wait_for(Duration::from_secs(10), || server.stats().cancelled == 1),
        "the streamed generation was not cancelled: {:?}",
        server.stats()
    );

    // Not streamed: hang up while the answer is being generated. (The streamed request may
    // have been cancelled before it started, when the worker took it after the hang-up: count
    // the starts from here.)
    let started_before = server.stats().started;
    let body_plain = body(false);
    let mut conn = send_request(
        addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        Some(body_plain.as_bytes()),
    );
    conn.flush().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || server.stats().started
            == started_before + 1),
        "the second request did not start: {:?}",
        server.stats()
    );
    drop(conn);
    assert!(
        wait_for(Duration::from_secs(10), || server.stats().cancelled == 2),
        "the non-streamed generation was not cancelled: {:?}",
        server.stats()
    );
    let stats = server.stats();
    assert_eq!(stats.finished, 0, "{stats:?}");
    assert_eq!(stats.active, 0, "{stats:?}");
    assert!(
        stats.tokens < 2 * 400,
        "generation went on after the clients left: {stats:?}"
    );

    // The server still answers.
    let ok = chat(
        addr,
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    server.shutdown().unwrap();
}
