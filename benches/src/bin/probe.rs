//! Temporary diagnostic (not committed): reused exchange on a current-thread runtime.
#![allow(missing_docs, clippy::unwrap_used)]
use bytes::Bytes;
use p2p_bench::{client, handler_exchange, keys, server};
fn main() {
    for flavor in ["current", "multi"] {
        let rt = if flavor == "current" {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        };
        rt.block_on(async {
            let k = keys(2);
            let srv = server(k[1].clone(), &k[..1], Bytes::from_static(&[1u8; 64]), true).await;
            let (cl, mut inbox) = client(k[0].clone(), srv.peer, true, 9).await;
            for _ in 0..2000 {
                handler_exchange(&cl, &mut inbox, &srv, Bytes::from_static(&[7u8; 64])).await;
            }
            let n = 20000;
            let t = std::time::Instant::now();
            for _ in 0..n {
                handler_exchange(&cl, &mut inbox, &srv, Bytes::from_static(&[7u8; 64])).await;
            }
            println!(
                "{flavor}: {:.1} us per reused exchange",
                t.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        });
    }
}
