//! Start-up problems are reported in one clear line instead of a hang or a crash.

use std::path::Path;
use std::time::{Duration, Instant};

use pushfleet_core::db::DbError;
use pushfleet_core::topology::BrokerError;
use pushfleet_core::Settings;
use pushfleet_ingest::Ingest;
use pushfleet_worker::providers::ProviderError;
use pushfleet_worker::{StartError, Worker};
use tokio::net::TcpListener;

use crate::support::*;

fn settings(extra: &str) -> Settings {
    let text = format!(
        "[rabbitmq]\nurl = \"{}\"\nconnect_timeout_ms = 2000\n[postgres]\nurl = \"{}\"\nconnect_timeout_ms = 2000\n{extra}",
        rabbitmq_url(),
        postgres_url()
    );
    Settings::from_toml(&text, Vec::new(), Path::new(".")).unwrap()
}

/// A local port nobody listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn an_unreachable_broker_stops_ingest_and_worker_at_start() {
    let port = closed_port().await;
    let mut s = settings("");
    s.rabbitmq.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let started = Instant::now();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = Ingest::start(s.clone(), listener)
        .await
        .err()
        .expect("start fails");
    assert!(
        matches!(&error, pushfleet_ingest::StartError::Broker(
            BrokerError::Unreachable { url, .. } | BrokerError::ConnectTimeout { url, .. }
        ) if url.starts_with("amqp://guest:***@127.0.0.1:")),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = Worker::start(s, listener).await.err().expect("start fails");
    assert!(
        matches!(error, StartError::Broker(BrokerError::Unreachable { .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_unreachable_database_stops_the_audit_worker_at_start() {
    let port = closed_port().await;
    let mut s = settings("");
    s.postgres.url = format!("postgres://postgres@127.0.0.1:{port}/pushfleet");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = Worker::start(s, listener).await.err().expect("start fails");
    assert!(
        matches!(&error, StartError::Database(DbError::Unreachable { url, .. })
            if url.starts_with("postgres://postgres@127.0.0.1:")),
        "{error:?}"
    );
    assert!(!error.to_string().contains('\n'), "{error}");
}

#[tokio::test]
async fn an_unreadable_credential_is_named_at_start() {
    let dir = std::env::temp_dir().join(format!("pushfleet-it-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("AuthKey.p8"), "not a key").unwrap();
    let text = format!(
        "[rabbitmq]\nurl = \"{}\"\n[[apps]]\nid = \"com.example\"\nplatform = \"apple\"\ntype = \"sylk\"\n\
         [apps.apns]\nkey_file = \"AuthKey.p8\"\nkey_id = \"ABCDEFGHIJ\"\nteam_id = \"TEAM123456\"\n",
        rabbitmq_url()
    );
    let s = Settings::from_toml(&text, Vec::new(), &dir).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = Worker::start(s, listener).await.err().expect("start fails");
    let StartError::Provider(ProviderError::App { app, source, .. }) = &error else {
        panic!("{error:?}");
    };
    assert_eq!(app, "com.example");
    assert!(
        matches!(&**source, ProviderError::BadFile { path, .. } if path.ends_with("AuthKey.p8")),
        "{error:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// RabbitMQ cannot change a queue's arguments: a deployment whose queues were declared with
/// other limits (an earlier version, a changed configuration) still starts, keeping them.
#[tokio::test]
async fn queues_declared_with_other_limits_are_kept() {
    let stack = Stack::start().await;
    let mut rabbitmq = stack.settings.rabbitmq.clone();
    rabbitmq.delivery_limit = 3;
    rabbitmq.lane_max_length = 10;
    let connection = pushfleet_core::topology::connect(&rabbitmq, "it-redeclare")
        .await
        .unwrap();
    pushfleet_core::Topology::new(&rabbitmq)
        .declare(&connection)
        .await
        .expect("declared, existing queues kept");
    let _ = connection.close(200, "done".into()).await;
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "apple",
            &apns_token(),
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    stack.stop().await;
}
