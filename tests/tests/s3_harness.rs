//! The SeaweedFS harness itself: it starts, enforces its key pair, survives a restart, and
//! several instances run side by side.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use blackbox_tests::s3::Weed;

/// `host:port` of an `http://host:port` endpoint.
fn authority(endpoint: &str) -> &str {
    endpoint
        .strip_prefix("http://")
        .expect("an http:// endpoint")
}

/// The status code of an unsigned request.
fn unsigned(endpoint: &str, method: &str, path: &str, body: &str) -> u16 {
    let host = authority(endpoint);
    let mut stream = TcpStream::connect(host).expect("the S3 port accepts connections");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("setting a read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("sending the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the response");
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

#[test]
fn starts_and_enforces_its_key_pair() {
    let weed = Weed::start().unwrap();
    assert!(weed.endpoint.starts_with("http://127.0.0.1:"));
    assert_eq!(weed.bucket, "logs");
    assert_eq!(weed.store_url("e2e/run-1"), "s3://logs/e2e/run-1");
    assert_eq!(weed.store_url("/e2e/"), "s3://logs/e2e");

    let env = weed.env();
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{k} missing from {env:?}"))
    };
    assert_eq!(get("AWS_ENDPOINT_URL"), weed.endpoint);
    assert_eq!(get("AWS_ACCESS_KEY_ID"), "testkey");
    assert_eq!(get("AWS_SECRET_ACCESS_KEY"), "testsecret");
    assert_eq!(get("AWS_REGION"), "us-east-1");
    assert_eq!(get("AWS_ALLOW_HTTP"), "true");

    // Credentials are configured, so anonymous writes are refused.
    assert_eq!(unsigned(&weed.endpoint, "PUT", "/logs/anonymous", "x"), 403);
}

#[test]
fn instances_run_side_by_side_on_their_own_ports() {
    let starts: Vec<_> = (0..3).map(|_| std::thread::spawn(Weed::start)).collect();
    let weeds: Vec<Weed> = starts
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    for (i, a) in weeds.iter().enumerate() {
        TcpStream::connect(authority(&a.endpoint)).unwrap();
        assert_ne!(a.dir(), weeds[(i + 1) % weeds.len()].dir());
        for b in &weeds[i + 1..] {
            assert_ne!(a.endpoint, b.endpoint);
        }
    }
}

#[test]
fn restart_keeps_the_endpoint() {
    let mut weed = Weed::start().unwrap();
    let before = weed.endpoint.clone();
    weed.restart().unwrap();
    assert_eq!(weed.endpoint, before);
    assert_eq!(unsigned(&weed.endpoint, "PUT", "/logs/anonymous", "x"), 403);
}

#[test]
fn dropping_stops_the_server() {
    let weed = Weed::start().unwrap();
    let host = authority(&weed.endpoint).to_owned();
    let dir = weed.dir().to_path_buf();
    drop(weed);
    assert!(TcpStream::connect(&host).is_err(), "{host} still accepts");
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
