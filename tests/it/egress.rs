//! `[worker] https_proxy`: every connection to APNs, FCM and the OAuth endpoint goes through an
//! HTTP CONNECT proxy, with the Basic credentials of `https_proxy_credentials_file`.

use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::io::{copy_bidirectional, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A CONNECT proxy that demands Basic credentials and remembers each tunnel's target.
struct ConnectProxy {
    port: u16,
    tunnels: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<u32>>,
}

impl ConnectProxy {
    async fn start(expected_authorization: String) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let (seen, denied) = (tunnels.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (seen, denied) = (seen.clone(), denied.clone());
                let expected = expected_authorization.clone();
                tokio::spawn(async move {
                    let _ = tunnel(client, &expected, &seen, &denied).await;
                });
            }
        });
        ConnectProxy {
            port,
            tunnels,
            refused,
        }
    }

    fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

async fn tunnel(
    mut client: TcpStream,
    expected_authorization: &str,
    seen: &Mutex<Vec<String>>,
    denied: &Mutex<u32>,
) -> std::io::Result<()> {
    // The request head, byte by byte: nothing of the tunnelled TLS may be read past it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if client.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let Some(target) = request_line
        .strip_prefix("CONNECT ")
        .and_then(|rest| rest.split(' ').next())
    else {
        client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await?;
        return Ok(());
    };
    let authorized = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("proxy-authorization")
                && value.trim() == expected_authorization
        })
    });
    if !authorized {
        *denied.lock().unwrap() += 1;
        client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"it\"\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(target).await?;
    seen.lock().unwrap().push(target.to_string());
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

fn port_of(url: &str) -> String {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string()
}

#[tokio::test]
async fn provider_traffic_goes_through_the_connect_proxy_with_its_credentials() {
    // "pushfleet:s3cret" in Basic.
    let proxy = ConnectProxy::start("Basic cHVzaGZsZWV0OnMzY3JldA==".into()).await;
    let dir = std::env::temp_dir().join(format!("pushfleet-proxy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let credentials = dir.join("proxy-credentials");
    std::fs::write(&credentials, "pushfleet:s3cret\n").unwrap();
    let stack = Stack::start_with(StackOptions {
        env: vec![
            (
                "PUSHFLEET__WORKER__HTTPS_PROXY".into(),
                format!("http://127.0.0.1:{}", proxy.port),
            ),
            (
                "PUSHFLEET__WORKER__HTTPS_PROXY_CREDENTIALS_FILE".into(),
                credentials.display().to_string(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let (apns, fcm) = (apns_token(), fcm_token());
    for (platform, token) in [("apple", &apns), ("firebase", &fcm)] {
        let body = v1_body(SYLK, platform, token, "incoming_session", &call_id());
        let (status, answer) = stack.push(&body).await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&apns).len(),
        1
    );
    assert_eq!(stack.fakes.fcm.journal().requests_for_token(&fcm).len(), 1);
    let tunnels = proxy.tunnels();
    let ports: Vec<String> = tunnels.iter().map(|t| port_of(t)).collect();
    for url in [&stack.files.apns_url, &stack.files.fcm_url] {
        assert!(ports.contains(&port_of(url)), "{tunnels:?} lacks {url}");
    }
    // The OAuth token for FCM came through it too.
    assert!(tunnels.len() >= 3, "{tunnels:?}");
    assert_eq!(*proxy.refused.lock().unwrap(), 0);
    stack.stop().await;

    // Without the credentials the proxy refuses, and no push reaches APNs.
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        env: vec![(
            "PUSHFLEET__WORKER__HTTPS_PROXY".into(),
            format!("http://127.0.0.1:{}", proxy.port),
        )],
        ..Default::default()
    })
    .await;
    let token = apns_token();
    let call = call_id();
    let mut body = v1_body(SYLK, "apple", &token, "message", &call);
    body["media-type"] = json!("chat");
    let (status, _) = stack.push(&body).await;
    assert_eq!(status, 202);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(stack
        .fakes
        .apns
        .journal()
        .requests_for_token(&token)
        .is_empty());
    assert!(*proxy.refused.lock().unwrap() >= 1);
    stack.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
