//! TLS on every link, with certificates this test makes: ingest serving HTTPS (HTTP/1.1 and
//! HTTP/2 by ALPN, the header timeout covering the handshake, the certificate re-read by
//! `reload_tls` and by SIGHUP), Postgres by the URL's `sslmode` and RabbitMQ over `amqps://`,
//! each through a TLS-terminating proxy in front of the machine's server.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pushfleet_core::config::PostgresSettings;
use pushfleet_core::db::{self, DbError};
use pushfleet_core::topology::BrokerError;
use pushfleet_core::Settings;
use pushfleet_fakes::tls::IssuedCert;
use pushfleet_fakes::TestCa;
use pushfleet_ingest::{Ingest, StartError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{copy_bidirectional, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use uuid::Uuid;

use crate::support::*;

/// A directory removed at the end of the test.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let dir = std::env::temp_dir().join(format!("pushfleet-it-tls-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test CA and a server certificate it issued (for 127.0.0.1, ::1 and localhost unless
/// named otherwise).
struct Pki {
    ca: TestCa,
    leaf: IssuedCert,
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::generate().unwrap();
        let leaf = ca.issue_server_cert().unwrap();
        Pki { ca, leaf }
    }

    fn for_names(names: &[&str]) -> Pki {
        let ca = TestCa::generate().unwrap();
        let leaf = ca.issue_server_cert_for(names).unwrap();
        Pki { ca, leaf }
    }

    /// The leaf and the CA, as a server sends them.
    fn chain_pem(&self) -> String {
        format!("{}{}", self.leaf.cert_pem, self.ca.pem())
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let chain = vec![
            CertificateDer::from(self.leaf.cert_der.clone()),
            self.ca.der().clone(),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `scheme://user@host:port/rest` as (`scheme://user@`, `host:port`, `/rest`).
fn split_url(url: &str, default_port: u16) -> (String, String, String) {
    let scheme_end = url.find("://").expect("a URL") + 3;
    let path_start = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + i);
    let host_start = url[scheme_end..path_start]
        .rfind('@')
        .map_or(scheme_end, |i| scheme_end + i + 1);
    let mut host = url[host_start..path_start].to_string();
    if !host.contains(':') {
        host = format!("{host}:{default_port}");
    }
    (
        url[..host_start].to_string(),
        host,
        url[path_start..].to_string(),
    )
}

/// The test database through a proxy on `port`, with `sslmode` when given.
fn postgres_via(port: u16, sslmode: Option<&str>) -> String {
    let (prefix, _, rest) = split_url(&postgres_url(), 5432);
    let url = format!("{prefix}127.0.0.1:{port}{rest}");
    match sslmode {
        None => url,
        Some(mode) if url.contains('?') => format!("{url}&sslmode={mode}"),
        Some(mode) => format!("{url}?sslmode={mode}"),
    }
}

/// What a [`TlsProxy`] stands in front of.
#[derive(Debug, Clone, Copy)]
enum Upstream {
    /// Postgres negotiates TLS with an `SSLRequest`; without `offer_tls` the proxy declines it
    /// as a server with `ssl = off` does.
    Postgres { offer_tls: bool },
    /// AMQPS is TLS from the first byte.
    Amqp,
}

/// Postgres's `SSLRequest` code.
const SSL_REQUEST: u32 = 80_877_103;

/// Terminates TLS with the test's certificate and forwards the plaintext to the machine's
/// server; counts the sessions that came over TLS and the ones that came plain.
struct TlsProxy {
    port: u16,
    tls: Arc<AtomicUsize>,
    plain: Arc<AtomicUsize>,
}

impl TlsProxy {
    async fn start(upstream: Upstream, target: String, pki: &Pki) -> TlsProxy {
        let acceptor = TlsAcceptor::from(pki.server_config());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tls, plain) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counters = (tls.clone(), plain.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let relay = relay(
                    upstream,
                    client,
                    target.clone(),
                    acceptor.clone(),
                    counters.clone(),
                );
                tokio::spawn(async move {
                    let _ = relay.await;
                });
            }
        });
        TlsProxy { port, tls, plain }
    }

    fn tls_sessions(&self) -> usize {
        self.tls.load(Ordering::SeqCst)
    }

    fn plain_sessions(&self) -> usize {
        self.plain.load(Ordering::SeqCst)
    }
}

async fn relay(
    upstream: Upstream,
    mut client: TcpStream,
    target: String,
    acceptor: TlsAcceptor,
    (tls, plain): (Arc<AtomicUsize>, Arc<AtomicUsize>),
) -> std::io::Result<()> {
    let offer_tls = match upstream {
        Upstream::Amqp => {
            let mut client = acceptor.accept(client).await?;
            tls.fetch_add(1, Ordering::SeqCst);
            let mut server = TcpStream::connect(&target).await?;
            copy_bidirectional(&mut client, &mut server).await?;
            return Ok(());
        }
        Upstream::Postgres { offer_tls } => offer_tls,
    };
    let mut first = [0u8; 8];
    client.read_exact(&mut first).await?;
    let length = u32::from_be_bytes(first[..4].try_into().unwrap());
    let code = u32::from_be_bytes(first[4..].try_into().unwrap());
    let mut server = TcpStream::connect(&target).await?;
    if length == 8 && code == SSL_REQUEST {
        if offer_tls {
            client.write_all(b"S").await?;
            let mut client = acceptor.accept(client).await?;
            tls.fetch_add(1, Ordering::SeqCst);
            copy_bidirectional(&mut client, &mut server).await?;
            return Ok(());
        }
        client.write_all(b"N").await?;
    } else {
        // A plain startup message: passed on as it came.
        server.write_all(&first).await?;
    }
    plain.fetch_add(1, Ordering::SeqCst);
    copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// An HTTPS client that trusts `ca_pem` only.
fn https_client(ca_pem: &str) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
}

async fn post_json(
    client: &reqwest::Client,
    url: String,
    body: &Value,
) -> (reqwest::Version, u16, Value) {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("ingest answers over HTTPS");
    let version = response.version();
    let status = response.status().as_u16();
    (
        version,
        status,
        response.json().await.expect("a JSON answer"),
    )
}

/// Whether a new connection to `addr` is served a certificate `ca_pem` vouches for.
async fn served_by(ca_pem: &str, addr: &str) -> bool {
    let client = https_client(ca_pem).build().unwrap();
    match client.get(format!("https://{addr}/health")).send().await {
        Ok(response) => response.status() == 200,
        Err(_) => false,
    }
}

fn ingest_addr(stack: &Stack) -> String {
    stack.ingest.as_ref().unwrap().addr.to_string()
}

/// `PUSHFLEET__…` overrides that make ingest serve HTTPS with `cert`/`key`.
fn https_env(cert: &Path, key: &Path) -> Vec<(String, String)> {
    vec![
        (
            "PUSHFLEET__INGEST__TLS_CERT_FILE".into(),
            cert.display().to_string(),
        ),
        (
            "PUSHFLEET__INGEST__TLS_KEY_FILE".into(),
            key.display().to_string(),
        ),
    ]
}

#[tokio::test]
async fn https_ingest_carries_v1_pushes_over_http1_and_http2() {
    let dir = Dir::new();
    let pki = Pki::new();
    let cert = dir.write("ingest.pem", &pki.chain_pem());
    let key = dir.write("ingest-key.pem", &pki.leaf.key_pem);
    let stack = Stack::start_with(StackOptions {
        env: https_env(&cert, &key),
        ..Default::default()
    })
    .await;
    let addr = ingest_addr(&stack);

    let http1 = https_client(pki.ca.pem()).http1_only().build().unwrap();
    let call1 = call_id();
    let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call1);
    let (version, status, answer) = post_json(&http1, format!("https://{addr}/push"), &body).await;
    assert_eq!(
        (version, status),
        (reqwest::Version::HTTP_11, 200),
        "{answer}"
    );
    assert_eq!(answer["data"]["code"], 200, "{answer}");

    // ALPN picks HTTP/2 when the client offers it.
    let http2 = https_client(pki.ca.pem()).build().unwrap();
    let call2 = call_id();
    let body = v1_body(SYLK, "firebase", &fcm_token(), "incoming_session", &call2);
    let (version, status, answer) = post_json(&http2, format!("https://{addr}/push"), &body).await;
    assert_eq!(
        (version, status),
        (reqwest::Version::HTTP_2, 200),
        "{answer}"
    );
    assert_eq!(answer["data"]["code"], 200, "{answer}");

    for call in [&call1, &call2] {
        let rows = stack.deliveries(call, 1).await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].status, "delivered");
    }

    // Plain HTTP is not served on the HTTPS port, and a client that does not trust the
    // certificate's CA gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    assert!(!served_by(TestCa::generate().unwrap().pem(), &addr).await);
    stack.stop().await;
}

/// A TLS client session to `addr` trusting `ca_pem`.
async fn tls_connect(ca_pem: &str, addr: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// Reads until the server closes the stream; how long that took from `since`.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, since: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    match timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Err(_) => panic!("still open after 5 s"),
        // Over TLS, a close without close_notify reads as an error.
        Ok(Ok(0)) | Ok(Err(_)) => since.elapsed(),
        Ok(Ok(n)) => panic!(
            "answered instead of closed: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

#[tokio::test]
async fn over_tls_the_header_timeout_covers_the_handshake_and_the_request_head() {
    let dir = Dir::new();
    let pki = Pki::new();
    let cert = dir.write("ingest.pem", &pki.chain_pem());
    let key = dir.write("ingest-key.pem", &pki.leaf.key_pem);
    let stack = Stack::start_with(StackOptions {
        env: https_env(&cert, &key),
        start_worker: false,
        extra_config: "\n[http]\nheader_read_timeout_ms = 700\n".into(),
        ..Default::default()
    })
    .await;
    let addr = ingest_addr(&stack);

    // Connected, no handshake at all; then a handshake that stops after its first bytes.
    let since = Instant::now();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x01]).await.unwrap();
    for stream in [&mut silent, &mut stalled] {
        let closed = closed_after(stream, since).await;
        assert!(
            closed >= Duration::from_millis(600) && closed < Duration::from_millis(2500),
            "closed after {closed:?}"
        );
    }

    // Handshake done, the request head never finished: the same deadline, from the accept.
    let since = Instant::now();
    let mut slow = tls_connect(pki.ca.pem(), &addr).await;
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: pushfleet\r\n")
        .await
        .unwrap();
    let closed = closed_after(&mut slow, since).await;
    assert!(
        closed >= Duration::from_millis(600) && closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );

    // A complete request over the same kind of connection is answered.
    let mut good = tls_connect(pki.ca.pem(), &addr).await;
    good.write_all(b"GET /health HTTP/1.1\r\nHost: pushfleet\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    timeout(Duration::from_secs(5), good.read_to_string(&mut answer))
        .await
        .expect("answered")
        .ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    stack.stop().await;
}

#[tokio::test]
async fn reload_tls_serves_new_connections_the_new_certificate_and_keeps_it_on_bad_files() {
    let dir = Dir::new();
    let (first, second) = (Pki::new(), Pki::new());
    let cert = dir.write("ingest.pem", &first.chain_pem());
    let key = dir.write("ingest-key.pem", &first.leaf.key_pem);
    let stack = Stack::start_with(StackOptions {
        env: https_env(&cert, &key),
        start_worker: false,
        ..Default::default()
    })
    .await;
    let ingest = stack.ingest.as_ref().unwrap();
    assert!(ingest.serves_tls());
    let addr = ingest_addr(&stack);
    assert!(served_by(first.ca.pem(), &addr).await);
    assert!(!served_by(second.ca.pem(), &addr).await);
    // A connection opened before the reload.
    let kept = https_client(first.ca.pem()).build().unwrap();
    let health = format!("https://{addr}/health");
    assert_eq!(kept.get(&health).send().await.unwrap().status(), 200);

    dir.write("ingest.pem", &second.chain_pem());
    dir.write("ingest-key.pem", &second.leaf.key_pem);
    ingest.reload_tls().expect("the new files are good");
    assert!(served_by(second.ca.pem(), &addr).await);
    assert!(!served_by(first.ca.pem(), &addr).await);
    // The open connection keeps its session.
    assert_eq!(kept.get(&health).send().await.unwrap().status(), 200);

    // A key that is not PEM, then a key of another certificate: refused, the second
    // certificate stays.
    dir.write("ingest-key.pem", "half written");
    let error = ingest.reload_tls().expect_err("not a key");
    assert_eq!(error.key(), "tls_key_file");
    assert!(
        error.to_string().contains("holds no PEM private key"),
        "{error}"
    );
    dir.write("ingest-key.pem", &first.leaf.key_pem);
    let error = ingest
        .reload_tls()
        .expect_err("a key of another certificate");
    assert_eq!(error.key(), "tls_cert_file, tls_key_file");
    assert!(served_by(second.ca.pem(), &addr).await);
    assert!(!served_by(first.ca.pem(), &addr).await);
    stack.stop().await;
}

/// The `pushfleet-ingest` binary of this build.
fn ingest_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("pushfleet-ingest");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (ops/test does)",
        bin.display()
    );
    bin
}

fn signal(process: &tokio::process::Child, name: &str) {
    let pid = process.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

async fn eventually(what: &str, within: Duration, check: impl AsyncFn() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sighup_makes_a_running_ingest_process_reload_its_certificate() {
    let dir = Dir::new();
    let (first, second) = (Pki::new(), Pki::new());
    let cert = dir.write("ingest.pem", &first.chain_pem());
    let key = dir.write("ingest-key.pem", &first.leaf.key_pem);
    // The stack supplies the configuration (broker, database, apps); its own ingest is plain.
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let port = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut env = https_env(&cert, &key);
    env.push(("PUSHFLEET__INGEST__LISTEN".into(), addr.clone()));
    let mut process = tokio::process::Command::new(ingest_binary())
        .arg("--config")
        .arg(&stack.config_path)
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pushfleet-ingest starts");
    eventually(
        "served with the first certificate",
        Duration::from_secs(30),
        async || served_by(first.ca.pem(), &addr).await,
    )
    .await;

    dir.write("ingest.pem", &second.chain_pem());
    dir.write("ingest-key.pem", &second.leaf.key_pem);
    assert!(
        served_by(first.ca.pem(), &addr).await,
        "nothing changes before the signal"
    );
    signal(&process, "HUP");
    eventually(
        "served with the second certificate",
        Duration::from_secs(10),
        async || served_by(second.ca.pem(), &addr).await,
    )
    .await;
    assert!(!served_by(first.ca.pem(), &addr).await);

    // A broken file and another SIGHUP: the process stays up with the second certificate.
    dir.write("ingest.pem", "-----BEGIN CERTIFICATE-----\ntruncated");
    signal(&process, "HUP");
    sleep(Duration::from_millis(500)).await;
    assert!(process.try_wait().unwrap().is_none(), "still running");
    assert!(served_by(second.ca.pem(), &addr).await);

    signal(&process, "TERM");
    let exit = timeout(Duration::from_secs(20), process.wait())
        .await
        .expect("stops within 20 s")
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    stack.stop().await;
}

/// Settings from text, file paths relative to `dir`.
fn load(dir: &Dir, text: &str) -> Result<Settings, pushfleet_core::config::ConfigError> {
    Settings::from_toml(text, Vec::new(), &dir.0)
}

#[tokio::test]
async fn tls_keys_are_checked_at_load_and_named_in_one_line() {
    let dir = Dir::new();
    let pki = Pki::new();
    let other = Pki::new();
    dir.write("cert.pem", &pki.chain_pem());
    dir.write("key.pem", &pki.leaf.key_pem);
    dir.write("other-key.pem", &other.leaf.key_pem);
    dir.write("ca.pem", pki.ca.pem());
    dir.write("junk.pem", "not PEM at all");

    // Relative paths resolve against the configuration's directory.
    let s = load(
        &dir,
        "[ingest]\ntls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"\n\
         [postgres]\nurl = \"postgres://u@h/db?sslmode=verify-full\"\nca_file = \"ca.pem\"\n\
         [rabbitmq]\nurl = \"amqps://u:p@h:5671/%2f\"\nca_file = \"ca.pem\"\n",
    )
    .unwrap();
    assert_eq!(s.ingest.tls_files().unwrap().0, dir.0.join("cert.pem"));
    assert_eq!(
        s.postgres.ca_file.as_deref(),
        Some(dir.0.join("ca.pem").as_path())
    );
    assert_eq!(
        s.rabbitmq.ca_file.as_deref(),
        Some(dir.0.join("ca.pem").as_path())
    );
    let defaults = load(&dir, "").unwrap();
    assert!(defaults.ingest.tls_files().is_none());
    assert!(defaults.postgres.ca_file.is_none() && defaults.rabbitmq.ca_file.is_none());

    for (text, key, says) in [
        (
            "[ingest]\ntls_cert_file = \"cert.pem\"",
            "[ingest] tls_key_file",
            "missing: HTTPS needs tls_cert_file and tls_key_file",
        ),
        (
            "[ingest]\ntls_key_file = \"key.pem\"",
            "[ingest] tls_cert_file",
            "missing",
        ),
        (
            "[ingest]\ntls_cert_file = \"nope.pem\"\ntls_key_file = \"key.pem\"",
            "[ingest] tls_cert_file",
            "cannot read",
        ),
        (
            "[ingest]\ntls_cert_file = \"junk.pem\"\ntls_key_file = \"key.pem\"",
            "[ingest] tls_cert_file",
            "holds no PEM certificate",
        ),
        (
            "[ingest]\ntls_cert_file = \"cert.pem\"\ntls_key_file = \"junk.pem\"",
            "[ingest] tls_key_file",
            "holds no PEM private key",
        ),
        (
            "[ingest]\ntls_cert_file = \"cert.pem\"\ntls_key_file = \"other-key.pem\"",
            "[ingest] tls_cert_file, tls_key_file",
            "does not fit the certificate",
        ),
        (
            "[postgres]\nurl = \"postgres://u@h/db?sslmode=allow\"",
            "[postgres] url",
            "sslmode=allow is not supported (use disable, prefer, require, verify-ca or verify-full)",
        ),
        (
            "[postgres]\nca_file = \"junk.pem\"",
            "[postgres] ca_file",
            "holds no PEM certificate",
        ),
        (
            "[rabbitmq]\nca_file = \"nope.pem\"",
            "[rabbitmq] ca_file",
            "cannot read",
        ),
    ] {
        let e = load(&dir, text).expect_err(text);
        assert_eq!(e.key(), Some(key), "{text}: {e}");
        let line = e.to_string();
        assert!(line.contains(says) && !line.contains('\n'), "{text}: {line}");
    }

    // As the binary reports it, before connecting anywhere.
    let config = dir.write(
        "pushfleet.toml",
        "[ingest]\ntls_cert_file = \"cert.pem\"\ntls_key_file = \"junk.pem\"\n",
    );
    let output = timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(ingest_binary())
            .arg("--config")
            .arg(&config)
            .output(),
    )
    .await
    .expect("exits at once")
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("pushfleet-ingest: ")
            && lines[0].contains("[ingest] tls_key_file: ")
            && lines[0].contains("holds no PEM private key"),
        "{stderr}"
    );
}

fn postgres_settings(url: String, ca_file: Option<&Path>) -> PostgresSettings {
    PostgresSettings {
        url,
        pool_size: 1,
        connect_timeout_ms: 5000,
        ca_file: ca_file.map(Path::to_path_buf),
    }
}

/// Opens a pool and asks the database one thing, as every service does at start.
async fn ping(url: String, ca_file: Option<&Path>) -> Result<(), DbError> {
    let settings = postgres_settings(url, ca_file);
    let pool = db::pool(&settings)?;
    db::ping(&pool, &settings).await
}

#[tokio::test]
async fn postgres_over_tls_carries_pushes_token_registrations_and_imports() {
    let dir = Dir::new();
    let pki = Pki::new();
    let ca = dir.write("ca.pem", pki.ca.pem());
    let (_, target, _) = split_url(&postgres_url(), 5432);
    let proxy = TlsProxy::start(Upstream::Postgres { offer_tls: true }, target, &pki).await;
    let url = postgres_via(proxy.port, Some("verify-full"));
    let stack = Stack::start_with(StackOptions {
        postgres_url: Some(url.clone()),
        env: vec![(
            "PUSHFLEET__POSTGRES__CA_FILE".into(),
            ca.display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    assert!(proxy.tls_sessions() >= 2, "ingest and the worker connected");

    // A v1 push, audited by the worker through its TLS pool.
    let call = call_id();
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "apple",
            &apns_token(),
            "incoming_session",
            &call,
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, "delivered");

    // A v2 registration and push: ingest reads and writes device tokens through its pool.
    let account = format!("tls-{}@example.com", Uuid::new_v4().simple());
    let token = fcm_token();
    let (status, answer) = stack
        .call(
            "POST",
            &format!("/v2/tokens/{account}"),
            Some(
                &json!({"app-id": SYLK, "platform": "firebase", "token": token,
                         "device-id": "tls-dev", "silent": "0"}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let call = call_id();
    let (status, answer) = stack
        .call(
            "POST",
            &format!("/v2/tokens/{account}/push"),
            Some(&json!({"call-id": call, "from": "alice@example.com",
                         "to": "bob@example.com", "media-type": "audio",
                         "event": "incoming_session"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].status.as_str(), rows[0].device_id.as_deref()),
        ("delivered", Some("tls-dev"))
    );

    // The client's import, with the same [postgres] settings.
    let user = format!("tls{}", Uuid::new_v4().simple());
    let csv = dir.write(
        "push_tokens.csv",
        &format!(
            "{user},example.com,firebase,{SYLK},{},<urn:uuid:tls>,,,0\n",
            fcm_token()
        ),
    );
    let any_file = csv.display();
    let config = dir.write(
        "import.toml",
        &format!(
            "[postgres]\nurl = \"{url}\"\nca_file = \"{}\"\n\
             [[apps]]\nid = \"{SYLK}\"\nplatform = \"firebase\"\ntype = \"sylk\"\n\
             fcm = {{ service_account_file = \"{any_file}\" }}\n",
            ca.display()
        ),
    );
    let before = proxy.tls_sessions();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let args = [
        "import",
        "opensips-csv",
        csv.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let code = pushfleet_client::run(
        "pushfleet",
        args.iter().map(|a| a.to_string()).collect(),
        &mut out,
        &mut err,
    )
    .await;
    let text = String::from_utf8_lossy(&out).to_string() + &String::from_utf8_lossy(&err);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("(1 new, 0 updated, 0 unchanged), rejected 0"),
        "{text}"
    );
    assert!(
        proxy.tls_sessions() > before,
        "the import connected over TLS"
    );
    let stored = stack
        .query(
            "SELECT count(*) FROM device_tokens WHERE account = $1",
            &[&format!("{user}@example.com")],
        )
        .await;
    assert_eq!(stored[0].get::<_, i64>(0), 1);

    assert_eq!(
        proxy.plain_sessions(),
        0,
        "nothing went to the proxy in plaintext"
    );
    stack.stop().await;
}

#[tokio::test]
async fn each_sslmode_checks_what_it_promises() {
    let dir = Dir::new();
    let (_, target, _) = split_url(&postgres_url(), 5432);
    let pki = Pki::new();
    let ca = dir.write("ca.pem", pki.ca.pem());
    let wrong_ca = dir.write("wrong-ca.pem", TestCa::generate().unwrap().pem());
    let proxy = TlsProxy::start(Upstream::Postgres { offer_tls: true }, target.clone(), &pki).await;
    let via = |mode| postgres_via(proxy.port, mode);

    // Without sslmode, and with disable: plain, as before.
    ping(via(None), Some(&ca)).await.unwrap();
    ping(via(Some("disable")), None).await.unwrap();
    assert_eq!((proxy.tls_sessions(), proxy.plain_sessions()), (0, 2));
    // prefer and require encrypt without checking the certificate.
    ping(via(Some("prefer")), None).await.unwrap();
    ping(via(Some("require")), None).await.unwrap();
    assert_eq!((proxy.tls_sessions(), proxy.plain_sessions()), (2, 2));
    // verify-ca and verify-full need the CA.
    ping(via(Some("verify-ca")), Some(&ca)).await.unwrap();
    ping(via(Some("verify-full")), Some(&ca)).await.unwrap();
    assert_eq!(proxy.tls_sessions(), 4);
    for (mode, ca_file) in [
        ("verify-full", None),
        ("verify-full", Some(&wrong_ca)),
        ("verify-ca", Some(&wrong_ca)),
        // With a CA file, require verifies the chain as libpq does.
        ("require", Some(&wrong_ca)),
    ] {
        let error = ping(via(Some(mode)), ca_file.map(PathBuf::as_path))
            .await
            .expect_err(mode);
        let line = error.to_string();
        assert!(
            matches!(error, DbError::Unreachable { .. })
                && line.contains("invalid peer certificate")
                && !line.contains('\n'),
            "{mode}: {line}"
        );
    }

    // A certificate for another host name: verify-ca takes it, verify-full does not.
    let elsewhere = Pki::for_names(&["db.pushfleet.test"]);
    let elsewhere_ca = dir.write("elsewhere-ca.pem", elsewhere.ca.pem());
    let misnamed = TlsProxy::start(
        Upstream::Postgres { offer_tls: true },
        target.clone(),
        &elsewhere,
    )
    .await;
    let url = |mode| postgres_via(misnamed.port, Some(mode));
    ping(url("verify-ca"), Some(&elsewhere_ca)).await.unwrap();
    let error = ping(url("verify-full"), Some(&elsewhere_ca))
        .await
        .expect_err("the name does not match");
    assert!(
        error.to_string().contains("certificate not valid for name"),
        "{error}"
    );

    // A server without TLS: prefer goes plain, require and verify-full refuse.
    let plain_only = TlsProxy::start(Upstream::Postgres { offer_tls: false }, target, &pki).await;
    ping(postgres_via(plain_only.port, Some("prefer")), None)
        .await
        .unwrap();
    for mode in ["require", "verify-full"] {
        let error = ping(postgres_via(plain_only.port, Some(mode)), Some(&ca))
            .await
            .expect_err(mode);
        assert!(error.to_string().contains("TLS"), "{mode}: {error}");
    }
    assert_eq!(plain_only.tls_sessions(), 0);
}

#[tokio::test]
async fn a_wrong_postgres_ca_stops_ingest_at_start_with_one_line() {
    let dir = Dir::new();
    let pki = Pki::new();
    let wrong_ca = dir.write("wrong-ca.pem", TestCa::generate().unwrap().pem());
    let (_, target, _) = split_url(&postgres_url(), 5432);
    let proxy = TlsProxy::start(Upstream::Postgres { offer_tls: true }, target, &pki).await;
    let text = format!(
        "[rabbitmq]\nurl = \"{}\"\n[postgres]\nurl = \"{}\"\nca_file = \"{}\"\nconnect_timeout_ms = 3000\n",
        rabbitmq_url(),
        postgres_via(proxy.port, Some("verify-full")),
        wrong_ca.display()
    );
    let settings = load(&dir, &text).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = Ingest::start(settings, listener)
        .await
        .err()
        .expect("start fails");
    let line = error.to_string();
    assert!(
        matches!(&error, StartError::Database(DbError::Unreachable { url, .. })
            if url.ends_with("?sslmode=verify-full"))
            && line.starts_with("cannot connect to Postgres at ")
            && line.contains("invalid peer certificate")
            && !line.contains('\n'),
        "{line}"
    );
}

/// The test's broker through a TLS proxy on `port`.
fn amqps_via(port: u16) -> String {
    let (prefix, _, rest) = split_url(&rabbitmq_url(), 5672);
    let prefix = prefix.replacen("amqp://", "amqps://", 1);
    format!("{prefix}127.0.0.1:{port}{rest}")
}

#[tokio::test]
async fn amqps_carries_a_push_end_to_end() {
    let dir = Dir::new();
    let pki = Pki::new();
    let ca = dir.write("ca.pem", pki.ca.pem());
    let (_, target, _) = split_url(&rabbitmq_url(), 5672);
    let proxy = TlsProxy::start(Upstream::Amqp, target, &pki).await;
    let stack = Stack::start_with(StackOptions {
        rabbitmq_url: Some(amqps_via(proxy.port)),
        env: vec![(
            "PUSHFLEET__RABBITMQ__CA_FILE".into(),
            ca.display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    // Ingest's link, and the worker's consuming, publishing and audit links.
    assert!(proxy.tls_sessions() >= 4, "{}", proxy.tls_sessions());
    let call = call_id();
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "firebase",
            &fcm_token(),
            "incoming_session",
            &call,
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["code"], 200, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, "delivered");
    stack.stop().await;
}

#[tokio::test]
async fn amqps_without_the_right_ca_stops_ingest_at_start() {
    let dir = Dir::new();
    let pki = Pki::new();
    let wrong_ca = dir.write("wrong-ca.pem", TestCa::generate().unwrap().pem());
    let (_, target, _) = split_url(&rabbitmq_url(), 5672);
    let proxy = TlsProxy::start(Upstream::Amqp, target, &pki).await;
    for ca_file in [None, Some(&wrong_ca)] {
        let mut text = format!(
            "[rabbitmq]\nurl = \"{}\"\nconnect_timeout_ms = 3000\n",
            amqps_via(proxy.port)
        );
        if let Some(ca) = ca_file {
            text.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
        }
        text.push_str(&format!("[postgres]\nurl = \"{}\"\n", postgres_url()));
        let settings = load(&dir, &text).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = Ingest::start(settings, listener)
            .await
            .err()
            .expect("start fails");
        let line = error.to_string();
        assert!(
            matches!(&error, StartError::Broker(BrokerError::Unreachable { url, .. })
                if url.starts_with("amqps://"))
                && line.contains("invalid peer certificate")
                && !line.contains('\n'),
            "{ca_file:?}: {line}"
        );
    }
    assert_eq!(proxy.tls_sessions(), 0, "no session was established");
}
