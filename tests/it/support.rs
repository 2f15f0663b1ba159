//! The test stack: fake providers, a real ingest and a real worker on the machine's RabbitMQ
//! and Postgres, each test in a namespace of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use pushfleet_core::{db, Settings};
use pushfleet_fakes::{FakeOptions, FakeProviders, SandboxFiles};
use pushfleet_ingest::Ingest;
use pushfleet_worker::Worker;
use serde_json::{json, Value};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OnceCell};
use uuid::Uuid;

pub const SYLK: &str = "com.agprojects.sylk";
pub const LINPHONE: &str = "org.linphone.phone";

pub fn rabbitmq_url() -> String {
    std::env::var("PUSHFLEET_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn postgres_url() -> String {
    std::env::var("PUSHFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Migrates the test database once per test process.
pub async fn migrated_pool() -> Pool {
    static MIGRATED: OnceCell<()> = OnceCell::const_new();
    let settings = pushfleet_core::config::PostgresSettings {
        url: postgres_url(),
        pool_size: 4,
        connect_timeout_ms: 5000,
        ..Default::default()
    };
    let pool = db::pool(&settings).expect("pool");
    MIGRATED
        .get_or_init(|| async {
            db::migrate(&pool).await.expect("migrations");
            db::ensure_partitions(&pool).await.expect("partitions");
        })
        .await;
    pool
}

/// How a test wants its stack.
pub struct StackOptions {
    pub mode: &'static str,
    pub sync_timeout_ms: u64,
    pub fakes: FakeOptions,
    /// Replaces the RabbitMQ URL (a test proxy in front of the broker).
    pub rabbitmq_url: Option<String>,
    pub start_worker: bool,
    /// Replaces the Postgres URL of the services (not of the test's own pool).
    pub postgres_url: Option<String>,
    /// `PUSHFLEET__…` overrides, as the services would read them from the environment.
    pub env: Vec<(String, String)>,
    /// TOML appended to the test configuration (`[events.…]`, `[retry]` tables).
    pub extra_config: String,
    /// `[ingest] allowed_hosts`.
    pub allowed_hosts: Vec<String>,
    /// More apps, each on Apple (token auth) and Firebase, as the Sylk apps but for their ids.
    pub extra_apps: Vec<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            mode: "sync",
            sync_timeout_ms: 5000,
            fakes: FakeOptions::default(),
            rabbitmq_url: None,
            postgres_url: None,
            env: Vec::new(),
            start_worker: true,
            extra_config: String::new(),
            allowed_hosts: Vec::new(),
            extra_apps: Vec::new(),
        }
    }
}

pub struct Stack {
    pub fakes: FakeProviders,
    pub files: SandboxFiles,
    pub settings: Settings,
    pub ingest: Option<Ingest>,
    pub worker: Option<Worker>,
    pub pool: Pool,
    pub http: reqwest::Client,
    /// The configuration file, for services started as processes.
    pub config_path: PathBuf,
    dir: PathBuf,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(StackOptions::default()).await
    }

    /// A stack whose ingest answers 202 at once.
    pub async fn start_async() -> Stack {
        Stack::start_with(StackOptions {
            mode: "async",
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(options: StackOptions) -> Stack {
        let fakes = FakeProviders::start(options.fakes).await.expect("fakes");
        let dir = std::env::temp_dir().join(format!("pushfleet-it-{}", Uuid::new_v4()));
        let mut files = fakes.write_sandbox_files(&dir).expect("sandbox files");
        // The certificate-auth app needs a certificate issued for its own bundle.
        let (cert, key) = fakes.apns.issue_client_certificate(LINPHONE);
        files.apns_client_cert_pem = dir.join("linphone-cert.pem");
        files.apns_client_key_pem = dir.join("linphone-key.pem");
        std::fs::write(&files.apns_client_cert_pem, cert).unwrap();
        std::fs::write(&files.apns_client_key_pem, key).unwrap();
        let namespace = format!("it-{}", Uuid::new_v4().simple());
        let mut config = config_toml(
            &files,
            &namespace,
            options.mode,
            options.sync_timeout_ms,
            &options.rabbitmq_url.unwrap_or_else(rabbitmq_url),
            &options.postgres_url.unwrap_or_else(postgres_url),
        );
        for app in &options.extra_apps {
            config.push_str(&app_toml(&files, app));
        }
        config.push_str(&options.extra_config);
        let config_path = dir.join("pushfleet.toml");
        std::fs::write(&config_path, &config).expect("config file");
        let mut settings = Settings::from_toml(&config, options.env, &dir).expect("test settings");
        settings.ingest.allowed_hosts = options.allowed_hosts;
        let pool = migrated_pool().await;
        let worker = if options.start_worker {
            Some(start_worker(&settings).await)
        } else {
            None
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest = Ingest::start(settings.clone(), listener)
            .await
            .expect("ingest starts");
        Stack {
            fakes,
            files,
            settings,
            ingest: Some(ingest),
            worker,
            pool,
            http: reqwest::Client::new(),
            config_path,
            dir,
        }
    }

    /// Starts the worker of a stack created without one.
    pub async fn start_worker(&mut self) {
        self.worker = Some(start_worker(&self.settings).await);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.ingest.as_ref().unwrap().addr, path)
    }

    /// POSTs a JSON body to `/push`; returns the status and the JSON answer.
    pub async fn push(&self, body: &Value) -> (u16, Value) {
        self.post_raw("/push", body.to_string().into_bytes()).await
    }

    /// POSTs a JSON body to `/rfc8599/push`.
    pub async fn push_rfc8599(&self, body: &Value) -> (u16, Value) {
        self.post_raw("/rfc8599/push", body.to_string().into_bytes())
            .await
    }

    /// Any method, a JSON body or none; returns the status and the JSON answer.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let body = body.map(Value::to_string).unwrap_or_default().into_bytes();
        self.send_raw(method, path, body).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        self.send_raw(reqwest::Method::POST, path, body).await
    }

    async fn send_raw(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("ingest answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("answer {status} is not JSON: {text:?}"));
        (status, json)
    }

    /// The worker's `/metrics` text.
    pub async fn worker_metrics(&self) -> String {
        let addr = self.worker.as_ref().expect("a worker").http_addr;
        self.http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("worker answers")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits for the audit rows of `call_id`; returns (status, attempts, event, platform) each.
    pub async fn deliveries(&self, call_id: &str, expected: usize) -> Vec<DeliveryRow> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let client = self.pool.get().await.unwrap();
            let rows = client
                .query(
                    "SELECT id, status, attempts, event, platform, app_id, provider_status,
                            provider_message_id, token_fingerprint, device_id, lane
                       FROM deliveries WHERE call_id = $1 ORDER BY received_at",
                    &[&call_id],
                )
                .await
                .unwrap();
            if rows.len() >= expected || Instant::now() > deadline {
                return rows
                    .iter()
                    .map(|r| DeliveryRow {
                        id: r.get(0),
                        status: r.get(1),
                        attempts: r.get(2),
                        event: r.get(3),
                        platform: r.get(4),
                        app_id: r.get(5),
                        provider_status: r.get(6),
                        provider_message_id: r.get(7),
                        token_fingerprint: r.get(8),
                        device_id: r.get(9),
                        lane: r.get(10),
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a query on the test database.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<tokio_postgres::Row> {
        let client = self.pool.get().await.unwrap();
        client.query(sql, params).await.unwrap()
    }

    pub async fn attempts(&self, job_id: Uuid) -> Vec<(i32, Option<i32>)> {
        let client = self.pool.get().await.unwrap();
        client
            .query(
                "SELECT attempt, provider_status FROM delivery_attempts WHERE job_id = $1 ORDER BY attempt",
                &[&job_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Stops the services and removes the test's queues and exchanges.
    pub async fn stop(mut self) {
        if let Some(ingest) = self.ingest.take() {
            ingest.stop().await.unwrap();
        }
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
        let topology = pushfleet_core::Topology::new(&self.settings.rabbitmq);
        if let Ok(connection) =
            pushfleet_core::topology::connect(&self.settings.rabbitmq, "it-cleanup").await
        {
            if let Ok(channel) = connection.create_channel().await {
                for queue in topology.queues() {
                    let _ = channel
                        .queue_delete(queue.into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in topology.exchanges() {
                    let _ = channel
                        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                        .await;
                }
            }
            let _ = connection.close(200, "done".into()).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn start_worker(settings: &Settings) -> Worker {
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Worker::start(settings.clone(), http)
        .await
        .expect("worker starts")
}

#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub id: Uuid,
    pub status: String,
    pub attempts: i32,
    pub event: String,
    pub platform: String,
    pub app_id: String,
    pub provider_status: Option<i32>,
    pub provider_message_id: Option<String>,
    pub token_fingerprint: String,
    pub device_id: Option<String>,
    pub lane: String,
}

/// Four apps: Sylk and Linphone, each on Apple and Firebase; the Sylk Apple app uses token auth,
/// the Linphone Apple app certificate auth.
fn config_toml(
    files: &SandboxFiles,
    namespace: &str,
    mode: &str,
    sync_timeout_ms: u64,
    amqp: &str,
    pg: &str,
) -> String {
    let p = |path: &PathBuf| path.display().to_string();
    format!(
        r#"
[ingest]
listen = "127.0.0.1:0"
mode = "{mode}"
sync_timeout_ms = {sync_timeout_ms}

[rabbitmq]
url = "{amqp}"
namespace = "{namespace}"
prefetch = 64

[postgres]
url = "{pg}"

[worker]
listen = "127.0.0.1:0"
id = "it-worker"
audit_flush_ms = 10
request_timeout_ms = 5000

[log]
level = "warn"
{sylk}
[[apps]]
id = "{LINPHONE}"
platform = "apple"
type = "linphone"
[apps.apns]
endpoint = "{apns}"
ca_file = "{ca}"
cert_file = "{cert}"
cert_key_file = "{cert_key}"

[[apps]]
id = "{LINPHONE}"
platform = "firebase"
type = "linphone"
[apps.fcm]
endpoint = "{fcm}"
ca_file = "{ca}"
service_account_file = "{sa}"
"#,
        sylk = app_toml(files, SYLK),
        apns = files.apns_url,
        fcm = files.fcm_url,
        ca = p(&files.ca_pem),
        cert = p(&files.apns_client_cert_pem),
        cert_key = p(&files.apns_client_key_pem),
        sa = p(&files.fcm_service_account_json),
    )
}

/// An app of the Sylk type on Apple (token auth) and on Firebase, both at the fake providers.
fn app_toml(files: &SandboxFiles, id: &str) -> String {
    let p = |path: &PathBuf| path.display().to_string();
    format!(
        r#"
[[apps]]
id = "{id}"
platform = "apple"
type = "sylk"
[apps.apns]
endpoint = "{apns}"
ca_file = "{ca}"
key_file = "{p8}"
key_id = "{key_id}"
team_id = "{team_id}"

[[apps]]
id = "{id}"
platform = "firebase"
type = "sylk"
[apps.fcm]
endpoint = "{fcm}"
ca_file = "{ca}"
service_account_file = "{sa}"
"#,
        apns = files.apns_url,
        fcm = files.fcm_url,
        ca = p(&files.ca_pem),
        p8 = p(&files.apns_key_p8),
        key_id = files.apns_key_id,
        team_id = files.apns_team_id,
        sa = p(&files.fcm_service_account_json),
    )
}

/// Starts `pushfleet-worker` as a process, as it runs in production (the binary comes from the
/// workspace build that `ops/test` makes before the tests).
pub fn spawn_worker_process(config: &Path) -> tokio::process::Child {
    spawn_worker_process_with(config, &[])
}

/// A worker process with `PUSHFLEET__…` overrides in its environment.
pub fn spawn_worker_process_with(config: &Path, env: &[(&str, &str)]) -> tokio::process::Child {
    spawn_service("pushfleet-worker", config, env)
}

/// `binary` (`pushfleet-worker` or `pushfleet-ingest`) of the workspace build as a process.
pub fn spawn_service(binary: &str, config: &Path, env: &[(&str, &str)]) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join(binary);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (ops/test does)",
        bin.display()
    );
    tokio::process::Command::new(bin)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{binary} process starts: {e}"))
}

/// Ingest and a worker as processes on ports of their own, reading `config`: what a
/// deployment runs, for tests of signals and of each binary's own `/metrics`.
pub struct Services {
    pub ingest: tokio::process::Child,
    pub worker: tokio::process::Child,
    pub ingest_url: String,
    pub worker_url: String,
    http: reqwest::Client,
}

impl Services {
    /// Starts both and waits for both `/ready`.
    pub async fn start(config: &Path) -> Services {
        let (ingest_port, worker_port) = (free_port(), free_port());
        let ingest_listen = format!("127.0.0.1:{ingest_port}");
        let worker_listen = format!("127.0.0.1:{worker_port}");
        let worker = spawn_service(
            "pushfleet-worker",
            config,
            &[("PUSHFLEET__WORKER__LISTEN", &worker_listen)],
        );
        let ingest = spawn_service(
            "pushfleet-ingest",
            config,
            &[("PUSHFLEET__INGEST__LISTEN", &ingest_listen)],
        );
        let services = Services {
            ingest,
            worker,
            ingest_url: format!("http://{ingest_listen}"),
            worker_url: format!("http://{worker_listen}"),
            http: reqwest::Client::new(),
        };
        for url in [&services.ingest_url, &services.worker_url] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while services.status(&format!("{url}/ready")).await != Some(200) {
                assert!(Instant::now() < deadline, "{url}/ready did not answer 200");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        services
    }

    async fn status(&self, url: &str) -> Option<u16> {
        let response = self.http.get(url).send().await.ok()?;
        Some(response.status().as_u16())
    }

    /// The process ids of ingest and the worker.
    pub fn pids(&self) -> [u32; 2] {
        [&self.ingest, &self.worker].map(|child| child.id().expect("running"))
    }

    /// Sends SIGHUP to both.
    pub fn hang_up(&self) {
        for child in [&self.ingest, &self.worker] {
            let pid = child.id().expect("running").to_string();
            let sent = std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap();
            assert!(sent.success());
        }
    }

    /// Whether both processes still run (were not restarted or ended).
    pub fn both_running(&mut self) -> bool {
        self.ingest.try_wait().unwrap().is_none() && self.worker.try_wait().unwrap().is_none()
    }

    pub async fn push(&self, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/push", self.ingest_url))
            .json(body)
            .send()
            .await
            .expect("ingest answers");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON answer"))
    }

    /// `/metrics` of ingest and of the worker.
    pub async fn metrics(&self) -> (String, String) {
        let get = |base: &str| {
            let url = format!("{base}/metrics");
            async move {
                self.http
                    .get(url)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            }
        };
        (get(&self.ingest_url).await, get(&self.worker_url).await)
    }

    pub async fn stop(mut self) {
        for child in [&mut self.ingest, &mut self.worker] {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// A port nothing listens on (free when asked; the services bind it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The value of the unlabelled sample `name` in a Prometheus text, 0 when absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Forwards a local port to `target` until cut: `cut` drops every connection and refuses new
/// ones (the service looks down), `restore` accepts again.
pub struct TcpProxy {
    pub port: u16,
    open: watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(target: String) -> TcpProxy {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let port = listener.local_addr().unwrap().port();
        let (open, open_rx) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut open = open_rx.clone();
                if !*open.borrow() {
                    continue; // refused: dropped at once
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = open.wait_for(|o| !*o) => {}
                    }
                });
            }
        });
        TcpProxy { port, open }
    }

    pub fn cut(&self) {
        let _ = self.open.send(false);
    }

    pub fn restore(&self) {
        let _ = self.open.send(true);
    }
}

/// A fresh call-id, so that a test finds its own audit rows.
pub fn call_id() -> String {
    format!("{}@it.pushfleet", Uuid::new_v4())
}

/// A plausible APNs device token (64 hex digits), unique per call.
pub fn apns_token() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

pub fn fcm_token() -> String {
    format!(
        "fcm-{}:APA91b{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    )
}

/// A v1 request as `sylk-pushclient` sends it.
pub fn v1_body(app_id: &str, platform: &str, token: &str, event: &str, call_id: &str) -> Value {
    json!({
        "platform": platform,
        "app-id": app_id,
        "token": token,
        "media-type": "audio",
        "event": event,
        "from": "alice@example.com",
        "from-display-name": "Alice",
        "to": "bob@example.com",
        "device-id": "dev-1",
        "call-id": call_id,
        "silent": "1",
    })
}

/// Messages waiting in `queue` (a passive declare: the queue must exist).
pub async fn message_count(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists")
        .message_count()
}

/// Runs the `pushfleet` client in process as `program` (its argv[0]): exit code, stdout, stderr.
pub async fn client(program: &str, args: &[&str]) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = pushfleet_client::run(
        program,
        args.iter().map(|a| a.to_string()).collect(),
        &mut out,
        &mut err,
    )
    .await;
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// [`client`] as `pushfleet`.
pub async fn pushfleet(args: &[&str]) -> (i32, String, String) {
    client("pushfleet", args).await
}
