//! Bad input gets a clear 4xx with a JSON body, never a 500, and the service keeps serving.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn bad_input_gets_a_json_4xx_and_ingest_keeps_serving() {
    let stack = Stack::start().await;
    let valid = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());

    let cases: Vec<(&str, Vec<u8>, u16, serde_json::Value)> = vec![
        (
            "malformed JSON",
            b"{\"app-id\": ".to_vec(),
            400,
            json!({"detail": "There was an error parsing the body"}),
        ),
        (
            "empty body",
            Vec::new(),
            400,
            json!("request body is empty"),
        ),
        (
            "a JSON array",
            b"[1, 2]".to_vec(),
            400,
            json!("request body must be a JSON object"),
        ),
        (
            "a JSON string",
            b"\"push\"".to_vec(),
            400,
            json!("request body must be a JSON object"),
        ),
        (
            "missing app-id",
            b"{}".to_vec(),
            400,
            json!("Field 'app-id' required"),
        ),
        (
            "unknown app",
            json!({"app-id": "com.unknown", "platform": "apple"})
                .to_string()
                .into_bytes(),
            404,
            json!("Apple com.unknown app is not configured"),
        ),
        (
            "unknown platform",
            json!({"app-id": SYLK, "platform": "blackberry"})
                .to_string()
                .into_bytes(),
            404,
            json!("'blackberry' platform is not configured"),
        ),
        (
            "wrong type",
            {
                let mut b = valid.clone();
                b["to"] = json!(["bob"]);
                b.to_string().into_bytes()
            },
            400,
            json!("str type expected: to"),
        ),
        (
            "bad badge",
            {
                let mut b = valid.clone();
                b["badge"] = json!("many");
                b.to_string().into_bytes()
            },
            400,
            json!("value is not a valid integer: badge"),
        ),
        (
            "missing sylk keys",
            {
                let mut b = valid.clone();
                b.as_object_mut().unwrap().remove("silent");
                b.to_string().into_bytes()
            },
            400,
            json!("'silent' item(s) missing."),
        ),
        (
            "oversized body",
            format!("{{\"pad\": \"{}\"}}", "x".repeat(70 * 1024)).into_bytes(),
            413,
            json!(null),
        ),
        (
            "invalid UTF-8",
            vec![b'{', 0xff, 0xfe, b'}'],
            400,
            json!({"detail": "There was an error parsing the body"}),
        ),
    ];
    for (what, body, status, expected) in cases {
        let (got, answer) = stack.post_raw("/push", body).await;
        assert_eq!(got, status, "{what}: {answer}");
        match expected {
            serde_json::Value::String(description) => {
                assert_eq!(answer["description"], description.as_str(), "{what}");
                assert_eq!(answer["code"], status, "{what}");
                assert_eq!(answer["data"], "", "{what}");
            }
            serde_json::Value::Null => {
                assert!(answer["description"].is_string(), "{what}: {answer}")
            }
            other => assert_eq!(answer, other, "{what}"),
        }
    }

    // Wrong method and unknown path: FastAPI's shapes.
    let response = stack.http.get(stack.url("/push")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({"detail": "Method Not Allowed"})
    );
    let response = stack.http.get(stack.url("/nowhere")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );

    // Still serving.
    let (status, answer) = stack.push(&valid).await;
    assert_eq!(status, 200, "{answer}");
    let home = stack.http.get(stack.url("/")).send().await.unwrap();
    assert_eq!(
        home.json::<serde_json::Value>().await.unwrap(),
        json!("Welcome to sylk-push server")
    );
    stack.stop().await;
}
