//! Per-key access, limits and usage, through `greenthread local` running the
//! configuration `docs/multi-tenant.md` documents: each team sees and uses only its
//! models (403 otherwise, naming the key's name, never the key), a key past its request
//! limit gets 429 with `Retry-After`, and requests and tokens are counted per key, for
//! streams too (usage asked of the engine and taken out again).

use greenthread_test_support::{LocalProc, chart::repo_root};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const TEAM_A: &str = "sk-team-a-0123456789";
const TEAM_B: &str = "sk-team-b-9876543210";

/// The documented `local` configuration: the doc's first YAML block.
fn documented_config() -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/multi-tenant.md")).unwrap();
    let start = doc.find("```yaml\n").expect("a YAML block") + 8;
    let end = start + doc[start..].find("```").unwrap();
    doc[start..end].to_string()
}

fn chat(
    local: &LocalProc,
    key: &str,
    model: &str,
    tokens: u32,
    stream: bool,
) -> reqwest::RequestBuilder {
    local
        .client
        .post(format!("{}/v1/chat/completions", local.url))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": tokens,
            "stream": stream,
        }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_team_uses_only_its_models_within_its_limits_and_is_counted() {
    let config = documented_config();
    assert!(
        config.contains(TEAM_A) && config.contains(TEAM_B),
        "{config}"
    );
    let local = LocalProc::start(BIN, &config).await;
    let models = |key: &'static str| {
        let local = &local;
        async move {
            let mut ids: Vec<String> = local
                .models_as(key)
                .await
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(models(TEAM_A).await, ["shared-embed", "team-a-chat"]);
    assert_eq!(models(TEAM_B).await, ["shared-embed", "team-b-chat"]);
    assert_eq!(models("platform-admin-token").await.len(), 3);

    // Another team's model: 403 naming the key's name, never the key; nothing wakes.
    let r = chat(&local, TEAM_A, "team-b-chat", 2, false)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("\\\"team-a\\\"") && body.contains("team-b-chat"),
        "{body}"
    );
    assert!(!body.contains(TEAM_A), "{body}");
    let r = local
        .client
        .get(format!("{}/team-b-chat/v1/models", local.url))
        .bearer_auth(TEAM_A)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "by path as by body");
    let r = chat(&local, "sk-nobody", "team-a-chat", 2, false)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Its own models: answered, a stream without the usage event it did not ask for.
    let r = chat(&local, TEAM_A, "team-a-chat", 3, false)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = chat(&local, TEAM_A, "team-a-chat", 4, true)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stream = r.text().await.unwrap();
    assert!(stream.ends_with("data: [DONE]\n\n"), "{stream}");
    assert!(
        !stream.contains("\"usage\":{"),
        "the usage event was taken out: {stream}"
    );
    let r = local
        .client
        .post(format!("{}/v1/embeddings", local.url))
        .header("x-api-key", TEAM_A)
        .json(&serde_json::json!({"model": "shared-embed", "input": "one two three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // team-b: three requests a minute, then 429 with the wait until the next.
    for _ in 0..3 {
        let r = chat(&local, TEAM_B, "team-b-chat", 1, false)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = chat(&local, TEAM_B, "team-b-chat", 1, false)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "retry after {wait} s");
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_exceeded");

    let m = local.metrics().await;
    let tokens = |key: &str, model: &str, kind: &str| {
        m.value(
            "gthread_apiserver_tokens_total",
            &[("key", key), ("model", model), ("kind", kind)],
        )
    };
    // 3 + 4 completion tokens, the streamed 4 from the usage we asked for; two words of
    // prompt each time.
    assert_eq!(tokens("team-a", "team-a-chat", "completion"), Some(7.0));
    assert_eq!(tokens("team-a", "team-a-chat", "prompt"), Some(4.0));
    assert_eq!(tokens("team-a", "shared-embed", "prompt"), Some(3.0));
    assert_eq!(tokens("team-b", "team-b-chat", "completion"), Some(3.0));
    let requests = |key: &str, model: &str, code: &str| {
        m.value(
            "gthread_apiserver_requests_total",
            &[("key", key), ("model", model), ("code", code)],
        )
    };
    assert_eq!(requests("team-b", "team-b-chat", "200"), Some(3.0));
    assert_eq!(requests("team-b", "team-b-chat", "429"), Some(1.0));
    // By body and by path.
    assert_eq!(requests("team-a", "team-b-chat", "403"), Some(2.0));
}

/// The Kubernetes form in the same doc, the API server's Secret: the keys it documents
/// parse as the API server parses them, with their names, models and classes.
#[test]
fn the_documented_secret_parses_as_the_api_server_reads_it() {
    let doc = std::fs::read_to_string(repo_root().join("docs/multi-tenant.md")).unwrap();
    let start = doc.rfind("```yaml\n").expect("the keys.yaml block") + 8;
    let end = start + doc[start..].find("```").unwrap();
    let keys = greenthread_apiserver::keys::parse_keys(Some(&doc[start..end]), "api-keys")
        .unwrap_or_else(|e| panic!("{e}"));
    let summary: Vec<(String, Vec<String>, greenthread_api::Priority)> = keys
        .into_iter()
        .map(|k| (k.name, k.models, k.priority))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "team-a".to_string(),
                vec!["team-a/*".to_string(), "shared/*".to_string()],
                greenthread_api::Priority::Critical
            ),
            (
                "team-b".to_string(),
                vec!["team-b/*".to_string(), "shared/*".to_string()],
                greenthread_api::Priority::Sheddable
            ),
        ]
    );
}
