//! `pushfleet import`: a Sylk Pushserver pickle store (built here with Python's pickle module)
//! and an OpenSIPS `push_tokens` CSV export land in `device_tokens`, idempotently, with every
//! rejected record named.

use std::path::{Path, PathBuf};
use std::process::Command;

use uuid::Uuid;

use crate::support::*;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let dir = std::env::temp_dir().join(format!("pushfleet-it-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn import(args: &[&str]) -> (i32, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = pushfleet_client::run(
        "pushfleet",
        args.iter().map(|a| a.to_string()).collect(),
        &mut out,
        &mut err,
    )
    .await;
    let text = String::from_utf8(out).unwrap() + &String::from_utf8(err).unwrap();
    (code, text)
}

/// The stored rows of an account: (app_id, platform, device_id, token, background, silent, ua).
async fn rows(
    pool: &deadpool_postgres::Pool,
    account: &str,
) -> Vec<(
    String,
    String,
    String,
    String,
    Option<String>,
    bool,
    Option<String>,
)> {
    pool.get()
        .await
        .unwrap()
        .query(
            "SELECT app_id, platform, device_id, token, background_token, silent, user_agent
               FROM device_tokens WHERE account = $1 ORDER BY device_id",
            &[&account],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect()
}

/// Writes the reference's store layout with Python's own pickle module.
fn write_pickle(path: &Path, protocol: u8, alice: &str, mallory: &str) {
    let script = format!(
        r#"
import pickle, sys
store = {{
    "{alice}": {{
        "{SYLK}-ev9": {{"app_id": "{SYLK}", "platform": "apple", "token": "aaaa",
                        "background_token": "bbbb", "device_id": "ev9", "silent": True,
                        "user_agent": "Sylk/3.5",
                        # request fields the reference leaks into its records
                        "call_id": "c1", "event": "incoming_session", "sip_from": "x"}},
        "{SYLK}-pixel": {{"app_id": "{SYLK}", "platform": "firebase", "token": "fcm-1:APA",
                          "background_token": None, "device_id": "pixel", "silent": False,
                          "user_agent": None}},
    }},
    "emptied@example.com": {{}},
    "{mallory}": {{
        "x-win": {{"app_id": "{SYLK}", "platform": "windows", "token": "t", "device_id": "d1"}},
        "x-empty": {{"app_id": "{SYLK}", "platform": "apple", "token": "", "device_id": "d2"}},
        "x-odd": {{"app_id": "{SYLK}", "platform": "apple", "token": "t", "device_id": "d3",
                   "silent": "maybe"}},
    }},
}}
with open(sys.argv[1], "wb") as f:
    pickle.dump(store, f, protocol={protocol})
"#
    );
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .status()
        .expect("python3 runs");
    assert!(status.success());
}

#[tokio::test]
async fn a_sylk_pickle_store_is_imported_once() {
    let pool = migrated_pool().await;
    let dir = Dir::new();
    let url = postgres_url();
    for protocol in [2, 4, 5] {
        let alice = format!("alice-{}@example.com", Uuid::new_v4().simple());
        let mallory = format!("mallory-{}@example.com", Uuid::new_v4().simple());
        let file = dir.0.join(format!("webrtc_device_tokens.{protocol}"));
        write_pickle(&file, protocol, &alice, &mallory);
        let file = file.to_str().unwrap();
        let args = ["import", "pickle", file, "--database-url", &url];

        let (code, out) = import(&args).await;
        assert_eq!(code, 1, "rejections make the exit code 1: {out}");
        assert!(
            out.ends_with(&format!(
                "imported 2 tokens from {file} (2 new, 0 updated, 0 unchanged), rejected 3\n"
            )),
            "protocol {protocol}: {out}"
        );
        assert!(
            out.contains(&format!(
                "rejected {mallory} x-win: unknown platform \"windows\""
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("rejected {mallory} x-empty: token is empty")),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "rejected {mallory} x-odd: silent is not a boolean"
            )),
            "{out}"
        );
        assert_eq!(
            rows(&pool, &alice).await,
            [
                (
                    SYLK.to_string(),
                    "apple".to_string(),
                    "ev9".to_string(),
                    "aaaa".to_string(),
                    Some("bbbb".to_string()),
                    true,
                    Some("Sylk/3.5".to_string())
                ),
                (
                    SYLK.into(),
                    "firebase".into(),
                    "pixel".into(),
                    "fcm-1:APA".into(),
                    None,
                    false,
                    None
                ),
            ]
        );
        // Again: nothing changes.
        let (_, out) = import(&args).await;
        assert!(
            out.ends_with("(0 new, 0 updated, 2 unchanged), rejected 3\n"),
            "{out}"
        );
        assert_eq!(rows(&pool, &alice).await.len(), 2);
    }

    // Not a pickle at all.
    let junk = dir.0.join("junk");
    std::fs::write(&junk, "hello").unwrap();
    let (code, out) = import(&[
        "import",
        "pickle",
        junk.to_str().unwrap(),
        "--database-url",
        &url,
    ])
    .await;
    assert_eq!(code, 1);
    assert!(out.contains("not a Sylk Pushserver token store"), "{out}");
    let (code, _) = import(&["import", "pickle", "x"]).await;
    assert_eq!(code, 2, "no database named");
}

#[tokio::test]
async fn an_opensips_push_tokens_export_is_imported_with_the_config() {
    let pool = migrated_pool().await;
    let dir = Dir::new();
    let user = format!("dave{}", Uuid::new_v4().simple());
    let csv = dir.0.join("push_tokens.csv");
    std::fs::write(
        &csv,
        format!(
            "username,domain,platform,app,token,sip_instance,user_agent,last_modified,silent\n\
             {user},example.com,apple,{SYLK},voip1-back1,\"<urn:uuid:0f3c-11>\",\"Sylk 3.5, iOS\",2024-01-02 03:04:05,1\n\
             {user},example.com,firebase,{LINPHONE},fcm-2:APA,<urn:uuid:22>,NULL,2024-01-02 03:04:05,0\n\
             {user},example.com,apple,com.unknown,t,<urn:uuid:33>,,2024-01-02 03:04:05,0\n\
             {user},example.com,firebase,{SYLK},t,,,2024-01-02 03:04:05,0\n"
        ),
    )
    .unwrap();
    // A configuration naming the apps; any readable file stands in for the credentials.
    let any_file = csv.display();
    let config = dir.0.join("pushfleet.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\n\
             [[apps]]\nid = \"{SYLK}\"\nplatform = \"apple\"\ntype = \"sylk\"\n\
             apns = {{ cert_file = \"{any_file}\", cert_key_file = \"{any_file}\" }}\n\
             [[apps]]\nid = \"{SYLK}\"\nplatform = \"firebase\"\ntype = \"sylk\"\n\
             fcm = {{ service_account_file = \"{any_file}\" }}\n\
             [[apps]]\nid = \"{LINPHONE}\"\nplatform = \"firebase\"\ntype = \"linphone\"\n\
             fcm = {{ service_account_file = \"{any_file}\" }}\n",
            postgres_url()
        ),
    )
    .unwrap();
    let args = [
        "import",
        "opensips-csv",
        csv.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let (code, out) = import(&args).await;
    assert_eq!(code, 1, "{out}");
    let name = csv.display();
    assert!(
        out.contains(&format!(
            "rejected {name}:4: Apple com.unknown app is not configured"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("rejected {name}:5: device-id is empty")),
        "{out}"
    );
    assert!(
        out.contains("(2 new, 0 updated, 0 unchanged), rejected 2"),
        "{out}"
    );
    let stored = rows(&pool, &format!("{user}@example.com")).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    // The pair is split as the token API splits it; the instance id is kept as stored.
    assert_eq!(
        stored[0],
        (
            SYLK.to_string(),
            "apple".to_string(),
            "<urn:uuid:0f3c-11>".to_string(),
            "voip1".to_string(),
            Some("back1".to_string()),
            true,
            Some("Sylk 3.5, iOS".to_string())
        )
    );
    assert_eq!(
        (stored[1].3.as_str(), stored[1].5, stored[1].6.as_deref()),
        ("fcm-2:APA", false, None)
    );
    let (_, out) = import(&args).await;
    assert!(out.contains("(0 new, 0 updated, 2 unchanged)"), "{out}");
}
