//! Regression: a burst of cluster messages that arrives while the pod is
//! short of CPU must not overflow the subscriber's backlog. With fred's
//! default of 32 messages, a 200-seat burst on a busy pod lost events that
//! had been answered 202 (found by the k6 classroom run).
//!
//! The test connects a pod's clients to the machine's Redis (a channel of
//! its own), stops the pod's only runtime thread while 500 messages are
//! published, then counts what reaches the adapter's stream.

use std::time::Duration;

use cellgate::cluster::Cluster;
use cellgate::metrics::Metrics;
use futures_util::StreamExt;
use socketioxide_redis::drivers::Driver;

const BURST: usize = 500;

fn redis_url() -> String {
    std::env::var("CELLGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[test]
fn a_burst_while_the_pod_is_stalled_is_not_dropped() {
    // One thread: while it sleeps, nothing reads from Redis, as on a pod
    // whose CPU is taken.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let prefix = format!("cgtest-{}", uuid::Uuid::new_v4().simple());
        let metrics = Metrics::new();
        let cluster = Cluster::connect(
            &redis_url(),
            "backlog",
            &prefix,
            format!("{prefix}#all"),
            None,
            &metrics,
        )
        .await
        .expect("Redis answers");
        let channel = format!("{prefix}#burst");
        let mut stream = cluster
            .driver
            .subscribe(channel.clone(), 2048)
            .await
            .expect("subscribed");

        let publisher = {
            let channel = channel.clone();
            std::thread::spawn(move || {
                let mut script = String::new();
                for i in 0..BURST {
                    script.push_str(&format!(
                        "SPUBLISH {channel} message-{i:04}-{}\n",
                        "x".repeat(200)
                    ));
                }
                let mut child = std::process::Command::new("redis-cli")
                    .args(["-u", &redis_url()])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("redis-cli");
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(script.as_bytes())
                    .unwrap();
                child.wait().unwrap();
            })
        };
        // The pod stalls while the burst arrives.
        std::thread::sleep(Duration::from_millis(1500));
        publisher.join().unwrap();

        let mut received = 0;
        while received < BURST {
            match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                Ok(Some(_)) => received += 1,
                _ => break,
            }
        }
        assert_eq!(received, BURST, "messages lost in the backlog");
        assert_eq!(metrics.cluster_messages_dropped.get(), 0);
    });
}
