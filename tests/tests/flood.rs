//! The fibre-repair flood, small enough for the test suite: a few hundred devices with mutual
//! TLS come back at once against a real receiver with tight limits (so it sheds, by 503 and by
//! closing connections), the receiver is killed with `kill -9` in the middle and restarted, and
//! every chunk must end up stored exactly once, including every chunk acknowledged before the
//! kill. The full 10,000-device run with its figures is `cargo xtask flood`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use blackbox_tests::flood::{Fleet, FleetConfig};
use blackbox_tests::scenario::{self, Scenario};

#[test]
fn small_flood_with_a_receiver_kill9_stores_every_chunk_exactly_once() {
    let fleet = Arc::new(
        Fleet::build(&FleetConfig {
            devices: 300,
            backlog: 3,
            block_bytes: 8 << 10,
            level: 6,
            certs: true,
            seed: 11,
        })
        .unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let sc = Scenario {
        tls: true,
        interval: Duration::from_secs(2),
        arrival: Duration::from_millis(300),
        timeout: Duration::from_secs(30),
        deadline: Duration::from_secs(240),
        server_args: [
            "--max-inflight",
            "8",
            "--max-connections",
            "48",
            "--segment-max-age-ms",
            "300",
            "--retry-after",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        kill9_at: Some(0.4),
        down_for: Duration::from_millis(1500),
        progress: None,
        seed: 11,
        // As the agent sends its backlog: in batches (these backlogs fit in one).
        batch: true,
    };
    let r = scenario::run_blackbox(&fleet, &sc, tmp.path()).unwrap();
    r.print();
    assert_eq!(
        r.acked,
        fleet.chunks(),
        "every chunk acknowledged in the end"
    );
    let (before, lost) = r.kill9.expect("the receiver was killed");
    assert!(
        before > 0 && before < fleet.chunks(),
        "killed mid-flood: {before}"
    );
    assert_eq!(lost, 0, "a chunk acknowledged before the kill is missing");
    assert!(r.check.exact(), "{:?}", r.check);
    assert_eq!(r.acked_twice, 0);
    assert!(
        r.shed > 0 && r.connect_failed > 0,
        "the limits never bit (503s {}, failed connections {}): this proved nothing",
        r.shed,
        r.connect_failed
    );
    // The restarted receiver's own counters: what it stored and what it shed.
    assert!(r.metric("blackbox_chunks_stored_total").unwrap() > 0.0);
    assert!(
        r.metrics
            .contains("blackbox_shed_total{reason=\"connections\"}")
    );
}
