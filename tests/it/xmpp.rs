//! The UnifiedPush-over-XMPP gateway against a real Prosody: a private instance per test (its
//! own config, data, ports), a test distributor that is a small c2s client, and the real ingest
//! and worker. The distributor registers with the component, the test POSTs to the endpoint it
//! got as an application server would, and the distributor must receive the push.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use pushfleet_worker::xmpp::xml::{escape, Element, StreamEvent, StreamReader};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::support::{free_port, Stack, StackOptions};

const COMPONENT: &str = "up.localhost";
const ENDPOINT_BASE: &str = "https://push.example.org/UP";
const STANZA_WAIT: Duration = Duration::from_secs(20);

/// A Prosody of the test's own, stopped (and its directory removed) when dropped.
struct Prosody {
    dir: PathBuf,
    config: PathBuf,
    c2s_port: u16,
    component_port: u16,
    secret_file: PathBuf,
    child: Option<Child>,
}

impl Prosody {
    async fn start() -> Prosody {
        let dir = std::env::temp_dir().join(format!("pushfleet-prosody-{}", Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("data/localhost/accounts")).unwrap();
        let (c2s_port, component_port) = (free_port(), free_port());
        let secret = Uuid::new_v4().simple().to_string();
        let secret_file = dir.join("component.secret");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        let d = dir.display();
        let config = format!(
            r#"run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{d}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
component_ports = {{ {component_port} }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "saslauth", "disco", "ping", "roster" }}
modules_disabled = {{ "s2s", "offline" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"
VirtualHost "localhost"
Component "{COMPONENT}"
    component_secret = "{secret}"
"#
        );
        let config_path = dir.join("prosody.cfg.lua");
        std::fs::write(&config_path, config).unwrap();
        let mut prosody = Prosody {
            dir,
            config: config_path,
            c2s_port,
            component_port,
            secret_file,
            child: None,
        };
        prosody.launch().await;
        prosody
    }

    async fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("stdout.log")).unwrap();
        let child = Command::new("prosody")
            .arg("--config")
            .arg(&self.config)
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prosody is installed (ops/lib.sh ensure_prosody)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [self.c2s_port, self.component_port] {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "prosody did not listen on {port}: {}",
                    std::fs::read_to_string(self.dir.join("prosody.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops Prosody at once (as a crash would) and starts it again on the same ports and data.
    async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// An account, written where Prosody's internal storage keeps it.
    fn add_user(&self, user: &str, password: &str) {
        let file = self.dir.join(format!("data/localhost/accounts/{user}.dat"));
        std::fs::write(
            file,
            format!("return {{\n\t[\"password\"] = \"{password}\";\n}};\n"),
        )
        .unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prosody.log")).unwrap_or_default()
    }

    fn xmpp_config(&self) -> String {
        format!(
            "\n[xmpp]\ncomponent = \"{COMPONENT}\"\nserver = \"127.0.0.1:{}\"\nsecret_file = \"{}\"\nendpoint_base = \"{ENDPOINT_BASE}\"\n",
            self.component_port,
            self.secret_file.display()
        )
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A UnifiedPush distributor: a c2s client with SASL PLAIN and a bound resource.
struct Distributor {
    writer: OwnedWriteHalf,
    incoming: mpsc::Receiver<Element>,
    /// Messages that came while waiting for an IQ answer.
    messages: Vec<Element>,
    next_id: u32,
}

const CLIENT_HEADER: &str =
    "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

impl Distributor {
    async fn connect(port: u16, user: &str, password: &str, resource: &str) -> Distributor {
        tokio::time::timeout(STANZA_WAIT, Self::open(port, user, password, resource))
            .await
            .expect("c2s login in time")
    }

    async fn open(port: u16, user: &str, password: &str, resource: &str) -> Distributor {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (read, mut writer) = stream.into_split();
        let mut reader = StreamReader::new(BufReader::new(read));
        async fn stanza<R: tokio::io::AsyncBufRead + Unpin>(r: &mut StreamReader<R>) -> Element {
            loop {
                match r.next().await.expect("xml") {
                    StreamEvent::Stanza(s) => return s,
                    StreamEvent::Open(_) => continue,
                    StreamEvent::Closed => panic!("the server closed the stream"),
                }
            }
        }
        writer.write_all(CLIENT_HEADER.as_bytes()).await.unwrap();
        let features = stanza(&mut reader).await;
        assert_eq!(features.local_name(), "features");
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        let auth = format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
        );
        writer.write_all(auth.as_bytes()).await.unwrap();
        let answer = stanza(&mut reader).await;
        assert_eq!(answer.name, "success", "SASL PLAIN: {answer:?}");
        writer.write_all(CLIENT_HEADER.as_bytes()).await.unwrap();
        let features = stanza(&mut reader).await;
        assert!(features.child("bind").is_some(), "{features:?}");
        let bind = format!(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        );
        writer.write_all(bind.as_bytes()).await.unwrap();
        let bound = stanza(&mut reader).await;
        assert_eq!(bound.attr("type"), Some("result"), "{bound:?}");
        writer.write_all(b"<presence/>").await.unwrap();
        let (tx, incoming) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(StreamEvent::Stanza(s)) = reader.next().await {
                if tx.send(s).await.is_err() {
                    return;
                }
            }
        });
        Distributor {
            writer,
            incoming,
            messages: Vec::new(),
            next_id: 0,
        }
    }

    /// Sends an IQ to the component and waits for its answer.
    async fn iq(&mut self, kind: &str, payload: &str) -> Element {
        self.next_id += 1;
        let id = format!("q{}", self.next_id);
        let iq = format!("<iq type='{kind}' id='{id}' to='{COMPONENT}'>{payload}</iq>");
        self.writer.write_all(iq.as_bytes()).await.unwrap();
        let deadline = Instant::now() + STANZA_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let stanza = tokio::time::timeout(left, self.incoming.recv())
                .await
                .expect("an answer to the IQ in time")
                .expect("stream open");
            if stanza.name == "iq" && stanza.attr("id") == Some(id.as_str()) {
                return stanza;
            }
            if stanza.name == "message" {
                self.messages.push(stanza);
            }
        }
    }

    /// Registers `token`, retrying while the component is not connected yet; the endpoint.
    async fn register(&mut self, token: &str) -> String {
        let deadline = Instant::now() + STANZA_WAIT;
        let payload = format!(
            "<register xmlns='unifiedpush.org'><token>{}</token></register>",
            escape(token)
        );
        loop {
            let answer = self.iq("set", &payload).await;
            if answer.attr("type") == Some("result") {
                assert_eq!(answer.attr("from"), Some(COMPONENT));
                let register = answer
                    .child_ns("register", "unifiedpush.org")
                    .expect("a register element in the answer");
                return register
                    .child("endpoint")
                    .expect("an endpoint")
                    .text
                    .clone();
            }
            // Prosody answers for a component that is not connected (yet).
            assert!(
                answer.child("register").is_none(),
                "the component refused: {answer:?}"
            );
            assert!(Instant::now() < deadline, "component never connected");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn unregister(&mut self, token: &str) -> Element {
        let payload = format!(
            "<unregister xmlns='unifiedpush.org'><token>{}</token></unregister>",
            escape(token)
        );
        self.iq("set", &payload).await
    }

    async fn next_message(&mut self) -> Element {
        if !self.messages.is_empty() {
            return self.messages.remove(0);
        }
        let deadline = Instant::now() + STANZA_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let stanza = tokio::time::timeout(left, self.incoming.recv())
                .await
                .expect("a message in time")
                .expect("stream open");
            if stanza.name == "message" {
                return stanza;
            }
        }
    }
}

async fn gateway_stack(prosody: &Prosody, env: Vec<(String, String)>) -> Stack {
    Stack::start_with(StackOptions {
        mode: "async",
        extra_config: prosody.xmpp_config(),
        env,
        ..Default::default()
    })
    .await
}

fn endpoint_path(endpoint: &str) -> String {
    let token = endpoint
        .strip_prefix(&format!("{ENDPOINT_BASE}?token="))
        .unwrap_or_else(|| panic!("endpoint under endpoint_base: {endpoint}"));
    format!("/UP?token={token}")
}

/// POSTs raw bytes to `/UP…` as an application server does (no API key).
async fn post_up(stack: &Stack, path: &str, body: Vec<u8>) -> (u16, Value) {
    let response = stack
        .http
        .post(stack.url(path))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("answer {status} is not JSON: {text:?}"));
    (status, json)
}

async fn assert_push_arrives(stack: &Stack, d: &mut Distributor, endpoint: &str, public: &str) {
    let content = format!("wake up <{}> & 'sync'", Uuid::new_v4());
    let (status, answer) = post_up(
        stack,
        &endpoint_path(endpoint),
        content.clone().into_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let message = d.next_message().await;
    assert_eq!(message.attr("from"), Some(COMPONENT));
    assert_eq!(message.child("subject").unwrap().text, public);
    assert_eq!(message.child("body").unwrap().text, content);
    // One terminal audit row, delivered.
    let call_id = format!("up-{}", answer["id"].as_str().unwrap());
    let rows = stack.deliveries(&call_id, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, "delivered");
    assert_eq!(rows[0].platform, "unifiedpush");
    assert_eq!(rows[0].app_id, COMPONENT);
    assert_eq!(rows[0].lane, "messages");
}

#[tokio::test]
async fn xmpp_gateway_registers_delivers_and_unregisters() {
    let prosody = Prosody::start().await;
    prosody.add_user("alice", "wonderland");
    // Pushes to /UP need no API key even where every other route does.
    let stack = gateway_stack(
        &prosody,
        vec![("PUSHFLEET__INGEST__REQUIRE_API_KEY".into(), "true".into())],
    )
    .await;
    let (status, _) = stack.push(&json!({})).await;
    assert_eq!(status, 401, "API keys are required on the API");

    let mut d = Distributor::connect(prosody.c2s_port, "alice", "wonderland", "phone").await;
    let public = format!("pub-{}", Uuid::new_v4().simple());
    let endpoint = d.register(&public).await;
    let token = endpoint_path(&endpoint)["/UP?token=".len()..].to_string();
    assert!(token.len() >= 22, "at least 128 bits: {token}");
    assert!(token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    // The same distributor registering the same token again gets the same endpoint; another
    // token gets another.
    assert_eq!(d.register(&public).await, endpoint);
    assert_ne!(d.register("another-app").await, endpoint);
    let stored = stack
        .query(
            "SELECT jid FROM xmpp_registrations WHERE public_token = $1",
            &[&public],
        )
        .await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].get::<_, String>(0), "alice@localhost/phone");

    assert_push_arrives(&stack, &mut d, &endpoint, &public).await;

    let response = stack.http.get(stack.url("/UP")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let discovery: Value = response.json().await.unwrap();
    assert_eq!(discovery, json!({"unifiedpush": {"version": 1}}));

    let path = endpoint_path(&endpoint);
    let (status, answer) = post_up(&stack, "/UP?token=never-handed-out", b"x".to_vec()).await;
    assert_eq!(status, 404, "{answer}");
    let (status, _) = post_up(&stack, "/UP", b"x".to_vec()).await;
    assert_eq!(status, 404);
    let (status, answer) = post_up(&stack, &path, Vec::new()).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = post_up(&stack, &path, vec![b'a'; 4097]).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["description"].as_str().unwrap().contains("4096"));
    let (status, _) = post_up(&stack, &path, vec![b'a'; 4096]).await;
    assert_eq!(status, 202, "4096 bytes is the limit, not beyond it");
    let at_limit = d.next_message().await;
    assert_eq!(at_limit.child("body").unwrap().text.len(), 4096);

    // Other IQs get answers too: disco#info, and an error for what the component does not do.
    let info = d
        .iq(
            "get",
            "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        )
        .await;
    assert_eq!(info.attr("type"), Some("result"));
    let features: Vec<_> = info
        .child("query")
        .unwrap()
        .children
        .iter()
        .filter_map(|f| f.attr("var"))
        .collect();
    assert!(features.contains(&"unifiedpush.org"), "{features:?}");
    let unknown = d.iq("get", "<query xmlns='jabber:iq:version'/>").await;
    assert_eq!(unknown.attr("type"), Some("error"));
    assert!(unknown
        .child("error")
        .unwrap()
        .child("service-unavailable")
        .is_some());
    let no_token = d
        .iq(
            "set",
            "<register xmlns='unifiedpush.org'><token/></register>",
        )
        .await;
    assert_eq!(no_token.attr("type"), Some("error"));
    let reason = &no_token
        .child("register")
        .unwrap()
        .child("error")
        .unwrap()
        .text;
    assert!(!reason.is_empty());

    let answer = d.unregister(&public).await;
    assert_eq!(answer.attr("type"), Some("result"), "{answer:?}");
    assert!(answer
        .child_ns("unregister", "unifiedpush.org")
        .and_then(|u| u.child("success"))
        .is_some());
    let (status, answer) = post_up(&stack, &path, b"too late".to_vec()).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["code"], 404);
    stack.stop().await;
}

#[tokio::test]
async fn xmpp_gateway_survives_a_prosody_restart() {
    let mut prosody = Prosody::start().await;
    prosody.add_user("bob", "builder");
    let stack = gateway_stack(&prosody, Vec::new()).await;
    let mut d = Distributor::connect(prosody.c2s_port, "bob", "builder", "tablet").await;
    let public = format!("pub-{}", Uuid::new_v4().simple());
    let endpoint = d.register(&public).await;
    assert_push_arrives(&stack, &mut d, &endpoint, &public).await;

    prosody.restart().await;
    let mut d = Distributor::connect(prosody.c2s_port, "bob", "builder", "tablet").await;
    // The component comes back by itself; the registration outlived the restart.
    assert_eq!(d.register(&public).await, endpoint);
    assert_push_arrives(&stack, &mut d, &endpoint, &public).await;
    let other = d.register("after-restart").await;
    assert_ne!(other, endpoint);
    assert_push_arrives(&stack, &mut d, &other, "after-restart").await;
    stack.stop().await;
}

#[tokio::test]
async fn xmpp_component_moves_to_a_standby_worker() {
    let prosody = Prosody::start().await;
    prosody.add_user("carol", "secret");
    let mut stack = gateway_stack(&prosody, Vec::new()).await;
    // A second worker stands by: Prosody lets one connection hold the component.
    let standby = crate::support::start_worker(&stack.settings).await;
    let mut d = Distributor::connect(prosody.c2s_port, "carol", "secret", "laptop").await;
    let public = format!("pub-{}", Uuid::new_v4().simple());
    let endpoint = d.register(&public).await;
    assert_push_arrives(&stack, &mut d, &endpoint, &public).await;
    // The standby did ask, and Prosody refused it while the other holds the component.
    let deadline = Instant::now() + STANZA_WAIT;
    while !prosody
        .log()
        .contains("Second component attempted to connect")
    {
        assert!(Instant::now() < deadline, "no standby: {}", prosody.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Whichever of the two held it, stopping one and then the other moves the component at
    // least once; pushes keep arriving.
    stack.worker.take().unwrap().stop().await;
    assert_push_arrives(&stack, &mut d, &endpoint, &public).await;
    stack.start_worker().await;
    standby.stop().await;
    assert_push_arrives(&stack, &mut d, &endpoint, &public).await;
    stack.stop().await;
}

#[tokio::test]
async fn an_xmpp_push_whose_ttl_passes_in_the_queue_is_expired_and_never_sent() {
    let prosody = Prosody::start().await;
    prosody.add_user("dave", "pw");
    let mut stack = Stack::start_with(StackOptions {
        mode: "async",
        start_worker: false,
        extra_config: format!(
            "{}\n[events.message]\nttl_secs = 1\n",
            prosody.xmpp_config()
        ),
        ..Default::default()
    })
    .await;
    // No worker holds the component yet: the registration is made as the component makes it.
    let public = format!("pub-{}", Uuid::new_v4().simple());
    let client = stack.pool.get().await.unwrap();
    let token = pushfleet_core::xmpp::register(&**client, "dave@localhost/watch", &public)
        .await
        .unwrap();
    drop(client);
    let endpoint = pushfleet_core::xmpp::endpoint_url(ENDPOINT_BASE, &token);
    let (status, answer) = post_up(&stack, &endpoint_path(&endpoint), b"stale".to_vec()).await;
    assert_eq!(status, 202, "{answer}");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut d = Distributor::connect(prosody.c2s_port, "dave", "pw", "watch").await;
    stack.start_worker().await;
    let call_id = format!("up-{}", answer["id"].as_str().unwrap());
    let rows = stack.deliveries(&call_id, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].status.as_str(), rows[0].attempts), ("expired", 0));
    // The holder is up (it answers), and the stale push never came.
    assert_eq!(d.register(&public).await, endpoint);
    let fresh = d.register("fresh").await;
    assert_push_arrives(&stack, &mut d, &fresh, "fresh").await;
    assert!(d
        .messages
        .iter()
        .all(|m| m.child("body").unwrap().text != "stale"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), d.incoming.recv())
            .await
            .is_err()
    );
    stack.stop().await;
}
