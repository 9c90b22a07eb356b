//! Shared by the distributed tests: a world of TcpRing ranks on threads of this process.

use std::sync::Arc;
use std::time::Duration;

use ftrun::dist::tcp_ring::{RingListener, TcpRing};

/// Binds one listener per rank, then runs `body` on every rank's thread with its ring.
pub fn run_world<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    body: impl Fn(TcpRing) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let listeners: Vec<_> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    let body = Arc::new(body);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (addrs, body) = (addrs.clone(), body.clone());
            std::thread::spawn(move || {
                let ring = TcpRing::connect(listener, rank, &addrs, timeout).unwrap();
                body(ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
