//! Operating a running `greenthread local` (issue 19, in part): API keys issued, used and
//! revoked through the admin API without a restart — kept hashed in the data directory,
//! shown once, refused at once when revoked — and the event stream's typed events, ids
//! and `Last-Event-ID` replay.

use std::time::Duration;

use futures_util::StreamExt;
use greenthread_test_support::{LocalProc, Sse, TEST_CONFIG, sse_events, wait_until};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const ADMIN: &str = "root-token";
const WAIT: Duration = Duration::from_secs(20);

fn config() -> String {
    format!(
        "adminToken: {ADMIN}\nadminTokens: [{{name: alice, token: alice-token}}]\n{TEST_CONFIG}"
    )
}

async fn start(data: &std::path::Path) -> LocalProc {
    LocalProc::start_with(BIN, &config(), &["--data-dir", data.to_str().unwrap()]).await
}

/// `GET path` of the admin API, as JSON.
async fn admin_get(local: &LocalProc, path: &str) -> Value {
    local
        .client
        .get(format!("{}{path}", local.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The running models' names, sorted.
async fn model_names(local: &LocalProc) -> Vec<String> {
    let mut names: Vec<String> = admin_get(local, "/api/v1/models").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// The status of a short chat with `model`, as `key` (none: without a credential).
async fn chat_status(local: &LocalProc, model: &str, key: Option<&str>) -> u16 {
    let mut req = local.chat(model, 2);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap().status().as_u16()
}

/// The model events among `seen`, as (type, model).
fn model_changes(seen: &[Sse]) -> Vec<(String, String)> {
    seen.iter()
        .filter(|e| e.kind.starts_with("model_"))
        .map(|e| {
            (
                e.kind.clone(),
                e.data["model"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_issued_used_and_revoked_at_run_time_and_kept_hashed() {
    let data = tempfile::tempdir().unwrap();
    let local = start(data.path()).await;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(ADMIN);
    let url = |p: &str| format!("{}{p}", local.url);

    // No key yet: the API is open (loopback). Issuing needs the admin token.
    assert_eq!(chat_status(&local, "alpha", None).await, 200);
    let new = json!({"name": "ci", "models": ["alpha"], "rateLimit": {"requestsPerMinute": 600}});
    let r = local
        .client
        .post(url("/api/v1/keys"))
        .json(&new)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = admin(local.client.post(url("/api/v1/keys")).json(&new))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let issued: Value = r.json().await.unwrap();
    let key = issued["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("gthread_"), "{key}");
    assert_eq!(issued["prefix"].as_str().unwrap(), &key[..12]);

    // From now on the API wants a key; this one may use alpha only.
    assert_eq!(chat_status(&local, "alpha", None).await, 401);
    assert_eq!(chat_status(&local, "alpha", Some(&key)).await, 200);
    assert_eq!(chat_status(&local, "beta", Some(&key)).await, 403);
    let m = local.metrics().await;
    assert_eq!(
        m.value(
            "gthread_apiserver_requests_total",
            &[("key", "ci"), ("model", "alpha"), ("code", "200")]
        ),
        Some(1.0)
    );

    // Listed by name and prefix, never the key; on disk as a hash, never the key.
    let listed = admin(local.client.get(url("/api/v1/keys")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listed.contains(&key), "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let ci = &listed["items"][0];
    assert_eq!(
        (ci["name"].as_str(), ci["source"].as_str()),
        (Some("ci"), Some("api"))
    );
    assert_eq!(ci["prefix"], issued["prefix"]);
    let stored = std::fs::read_to_string(data.path().join("keys.json")).unwrap();
    assert!(!stored.contains(&key), "{stored}");
    // A name is a key's once; bad descriptions name the field.
    let r = admin(
        local
            .client
            .post(url("/api/v1/keys"))
            .json(&json!({"name": "ci"})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 409);
    let r = admin(
        local
            .client
            .post(url("/api/v1/keys"))
            .json(&json!({"name": "x", "modles": []})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("modles"),
        "{e}"
    );

    // A second key survives a restart; the revoked one is refused at once, and gone.
    let r = admin(
        local
            .client
            .post(url("/api/v1/keys"))
            .json(&json!({"name": "kept"})),
    )
    .send()
    .await
    .unwrap();
    let kept: Value = r.json().await.unwrap();
    let kept = kept["key"].as_str().unwrap().to_string();
    let r = admin(local.client.delete(url("/api/v1/keys/ci")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        chat_status(&local, "alpha", Some(&key)).await,
        401,
        "revoked: refused from the next request on"
    );
    let r = admin(local.client.delete(url("/api/v1/keys/ci")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let listed: Value = admin(local.client.get(url("/api/v1/keys")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kept"]);
    drop(local);
    let local = start(data.path()).await;
    assert_eq!(
        chat_status(&local, "beta", Some(&kept)).await,
        200,
        "kept across a restart"
    );
    assert_eq!(
        chat_status(&local, "alpha", Some(&key)).await,
        401,
        "still revoked after a restart"
    );
    // Revoking the last key never opens the API again.
    let r = local
        .client
        .delete(format!("{}/api/v1/keys/kept", local.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(chat_status(&local, "alpha", None).await, 401);
    assert_eq!(chat_status(&local, "alpha", Some(&kept)).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_keys_cannot_be_revoked_and_an_open_admin_api_cannot_issue() {
    let data = tempfile::tempdir().unwrap();
    let config = format!("apiKeys: [{{name: ops, key: sk-ops}}]\n{}", config());
    let local =
        LocalProc::start_with(BIN, &config, &["--data-dir", data.path().to_str().unwrap()]).await;
    let r = local
        .client
        .delete(format!("{}/api/v1/keys/ops", local.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(chat_status(&local, "alpha", Some("sk-ops")).await, 200);
    drop(local);
    // Without an admin token, nobody may mint keys.
    let open = LocalProc::start_with(
        BIN,
        TEST_CONFIG,
        &["--data-dir", data.path().to_str().unwrap()],
    )
    .await;
    let r = open
        .client
        .post(format!("{}/api/v1/keys", open.url))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(!data.path().join("keys.json").exists());
}

/// Reads `stream` until `done` says the events so far are enough (or the deadline).
async fn read_until(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin),
    done: impl Fn(&[Sse]) -> bool,
) -> Vec<Sse> {
    let mut seen = String::new();
    let _ = tokio::time::timeout(WAIT, async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if done(&sse_events(&seen)) {
                return;
            }
        }
    })
    .await;
    sse_events(&seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_typed_have_ids_and_replay_after_last_event_id() {
    let data = tempfile::tempdir().unwrap();
    let local = start(data.path()).await;
    let events = |last: Option<u64>| {
        let mut req = local
            .client
            .get(format!("{}/api/v1/events", local.url))
            .bearer_auth(ADMIN);
        if let Some(id) = last {
            req = req.header("last-event-id", id.to_string());
        }
        req.send()
    };
    let mut stream = events(None).await.unwrap().bytes_stream();
    assert_eq!(chat_status(&local, "beta", None).await, 200);
    let seen = read_until(&mut stream, |e| {
        e.iter().any(|e| e.kind == "wake_completed")
    })
    .await;
    // A snapshot first: the whole system, then each replica's state (no ids: nothing a
    // client could have missed).
    assert_eq!(seen[0].kind, "system_state");
    assert_eq!(seen[0].data["models"].as_array().unwrap().len(), 4);
    assert!(seen[..5].iter().all(|e| e.id.is_none()));
    let live: Vec<&Sse> = seen.iter().filter(|e| e.id.is_some()).collect();
    let ids: Vec<u64> = live.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    let kinds: Vec<&str> = live.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["state", "wake_started", "state", "state", "wake_completed"],
        "{seen:?}"
    );
    let woke = live.last().unwrap();
    assert_eq!(woke.data["model"], "beta");
    assert!(woke.data["seconds"].as_f64().unwrap() > 0.0, "{woke:?}");
    let phases: Vec<&str> = woke.data["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"engine wake"), "{phases:?}");
    drop(stream);

    // Missed while away: a key created and the sleep it asked for. A client that comes
    // back with the id of the last event it saw gets exactly those, in order.
    // Issued by alice, by her own admin token.
    let r = local
        .client
        .post(format!("{}/api/v1/keys", local.url))
        .bearer_auth("alice-token")
        .json(&json!({"name": "watcher"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = local
        .client
        .post(format!("{}/api/v1/models/beta/sleep", local.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until("beta asleep", WAIT, || async {
        let m = local
            .client
            .get(format!("{}/api/v1/models/beta", local.url))
            .bearer_auth(ADMIN);
        let v: Value = m.send().await.ok()?.json().await.ok()?;
        (v["pods"][0]["state"] == "sleeping").then_some(())
    })
    .await;
    let mut again = events(Some(woke.id.unwrap())).await.unwrap().bytes_stream();
    let replay = read_until(&mut again, |e| {
        e.iter().any(|e| e.kind == "sleep_completed")
    })
    .await;
    let kinds: Vec<&str> = replay.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "key_created",
            "state",
            "sleep_started",
            "state",
            "sleep_completed"
        ],
        "{replay:?}"
    );
    assert_eq!(replay[0].id, Some(woke.id.unwrap() + 1));
    assert_eq!(replay[0].data["name"], "watcher");
    assert_eq!(replay[0].data["by"], "alice", "who issued it");
    assert!(
        replay[0].data.get("key").is_none(),
        "events never carry a key"
    );
    // Revoked by the admin token: the event says who.
    let r = local
        .client
        .delete(format!("{}/api/v1/keys/watcher", local.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let last = replay.last().unwrap().id.unwrap();
    let mut after = events(Some(last)).await.unwrap().bytes_stream();
    let revoked = read_until(&mut after, |e| e.iter().any(|e| e.kind == "key_revoked")).await;
    let revoked = revoked.iter().find(|e| e.kind == "key_revoked").unwrap();
    assert_eq!(
        (revoked.data["name"].as_str(), revoked.data["by"].as_str()),
        (Some("watcher"), Some("admin"))
    );
    assert!(revoked.data["at"].is_string(), "{revoked:?}");
    // An id the server never gave (another run's): a fresh snapshot instead.
    let mut other = events(Some(1_000_000)).await.unwrap().bytes_stream();
    let fresh = read_until(&mut other, |e| !e.is_empty()).await;
    assert_eq!(fresh[0].kind, "system_state");
}

fn spec(tokens_per_second: &str) -> Value {
    json!({
        "modelName": "org/extra", "engine": "sim", "gpuMemoryUtilization": "0.2",
        "sleep": {"idleTimeout": "1h"}, "fairness": {"minRuntime": "0s"},
        "extraArgs": ["--boot-time", "0s", "--ttft", "5ms", "--tokens-per-second", tokens_per_second],
    })
}

/// Models added, replaced and removed while the others serve: a stream in progress is
/// not cut, a bad spec changes nothing and names its field, a replaced model restarts
/// alone, a removed one leaves the GPU records, and a restart keeps every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_added_replaced_and_removed_while_the_others_serve() {
    let data = tempfile::tempdir().unwrap();
    let local = start(data.path()).await;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(ADMIN);
    let url = |p: &str| format!("{}{p}", local.url);
    let booted = |name: &'static str| {
        let local = &local;
        async move {
            wait_until(&format!("{name} booted"), WAIT, || async {
                let v: Value = local
                    .client
                    .get(format!("{}/api/v1/models/{name}", local.url))
                    .bearer_auth(ADMIN)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (v["pods"][0]["bootReady"] == true).then_some(v)
            })
            .await
        }
    };

    // alpha serves before anything changes; its wake must be the only one it has.
    assert_eq!(chat_status(&local, "alpha", None).await, 200);
    let alpha_before = booted("alpha").await;
    assert_eq!(alpha_before["pods"][0]["state"], "serving");

    // Added: booted beside the others, then served.
    let r = admin(local.client.post(url("/api/v1/models")))
        .json(&json!({"name": "epsilon", "spec": spec("20")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    booted("epsilon").await;
    // A stream from it runs while another model is added.
    let stream = local
        .client
        .post(url("/v1/chat/completions"))
        .json(
            &json!({"model": "epsilon", "stream": true, "max_tokens": 30,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let r = admin(local.client.post(url("/api/v1/models")))
        .json(&json!({"name": "zeta", "spec": spec("1000")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let text = stream.text().await.unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream was cut: {text}"
    );
    assert_eq!(text.matches("\"content\":").count(), 30, "{text}");
    booted("zeta").await;
    assert_eq!(chat_status(&local, "zeta", None).await, 200);

    // A bad spec: refused with its field named, and nothing changed.
    let mut wrong = spec("20");
    wrong["gpuMemoryUtilization"] = "1.5".into();
    for (method, path) in [("POST", "/api/v1/models"), ("PUT", "/api/v1/models/zeta")] {
        let body = json!({"name": if method == "POST" { "eta" } else { "zeta" }, "spec": wrong});
        let req = match method {
            "POST" => local.client.post(url(path)),
            _ => local.client.put(url(path)),
        };
        let r = admin(req).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{method}");
        let e: Value = r.json().await.unwrap();
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("spec.gpuMemoryUtilization: 1.5 is outside (0, 1]"),
            "{msg}"
        );
    }
    let r = admin(local.client.post(url("/api/v1/models")))
        .json(&json!({"name": "alpha", "spec": spec("20")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "a running name");
    let listed = admin(local.client.get(url("/api/v1/models")))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let mut names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["alpha", "beta", "delta", "epsilon", "gamma", "zeta"]
    );
    assert_eq!(
        chat_status(&local, "zeta", None).await,
        200,
        "zeta still serves"
    );

    // Replaced: only zeta restarts; alpha serves throughout, never woken again.
    let mut slower = spec("500");
    slower["sleep"] = json!({"idleTimeout": "30m"});
    let r = admin(local.client.put(url("/api/v1/models/zeta")))
        .json(&json!({"spec": slower}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    booted("zeta").await;
    assert_eq!(chat_status(&local, "zeta", None).await, 200);
    let alpha_after = booted("alpha").await;
    assert_eq!(alpha_after["pods"][0]["state"], "serving");
    assert_eq!(
        alpha_after["pods"][0]["lastWake"],
        alpha_before["pods"][0]["lastWake"]
    );

    // Removed: gone from routing and from the GPU records.
    let r = admin(local.client.delete(url("/api/v1/models/epsilon")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(chat_status(&local, "epsilon", None).await, 404);
    let gpus = admin(local.client.get(url("/api/v1/gpus")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!gpus.contains("epsilon-0"), "{gpus}");
    assert!(gpus.contains("zeta-0"), "{gpus}");
    let r = admin(local.client.delete(url("/api/v1/models/epsilon")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The events said so, in order.
    let mut events = admin(local.client.get(url("/api/v1/events")))
        .header("last-event-id", "0")
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let seen = read_until(&mut events, |e| e.iter().any(|e| e.kind == "model_removed")).await;
    let changes = model_changes(&seen);
    let want = [
        ("model_added", "epsilon"),
        ("model_added", "zeta"),
        ("model_replaced", "zeta"),
        ("model_removed", "epsilon"),
    ]
    .map(|(k, m)| (k.to_string(), m.to_string()));
    assert_eq!(changes, want);

    // A restart keeps every change.
    drop(local);
    let local = start(data.path()).await;
    assert_eq!(
        model_names(&local).await,
        ["alpha", "beta", "delta", "gamma", "zeta"]
    );
    assert_eq!(chat_status(&local, "zeta", None).await, 200);
    assert_eq!(chat_status(&local, "epsilon", None).await, 404);
}

/// SIGHUP applies the edited config file as the same additions, replacements and
/// removals; a file that fails its checks changes nothing and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_is_applied_again_on_sighup() {
    let data = tempfile::tempdir().unwrap();
    let local = start(data.path()).await;
    assert_eq!(chat_status(&local, "alpha", None).await, 200);
    let alpha_before = admin_get(&local, "/api/v1/models/alpha").await;
    let hup = |local: &LocalProc| {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(local.proc.pid() as libc::pid_t, libc::SIGHUP) };
    };

    // gamma removed, delta changed, eta added.
    let text = config();
    let gamma = text.find("  - name: gamma").unwrap();
    let delta = text.find("  - name: delta").unwrap();
    let mut edited = format!("{}{}", &text[..gamma], &text[delta..]);
    edited = edited.replace(
        "gpuMemoryUtilization: \"0.3\"",
        "gpuMemoryUtilization: \"0.25\"",
    );
    let eta = text[delta..]
        .replace("name: delta", "name: eta")
        .replace("org/delta", "org/eta");
    edited.push_str(&eta);
    std::fs::write(&local.config, &edited).unwrap();
    hup(&local);
    wait_until("the edited models", WAIT, || async {
        (model_names(&local).await == ["alpha", "beta", "delta", "eta"]).then_some(())
    })
    .await;
    wait_until("eta booted", WAIT, || async {
        (admin_get(&local, "/api/v1/models/eta").await["pods"][0]["bootReady"] == true)
            .then_some(())
    })
    .await;
    assert_eq!(chat_status(&local, "eta", None).await, 200);
    assert_eq!(chat_status(&local, "gamma", None).await, 404);
    let alpha_after = admin_get(&local, "/api/v1/models/alpha").await;
    assert_eq!(
        alpha_after["pods"][0]["state"], "serving",
        "alpha served on"
    );
    assert_eq!(
        alpha_after["pods"][0]["lastWake"],
        alpha_before["pods"][0]["lastWake"]
    );

    // A broken file: nothing changes, and the event says which field.
    std::fs::write(
        &local.config,
        edited.replace(
            "gpuMemoryUtilization: \"0.25\"",
            "gpuMemoryUtilization: \"2\"",
        ),
    )
    .unwrap();
    hup(&local);
    let mut events = local
        .client
        .get(format!("{}/api/v1/events", local.url))
        .bearer_auth(ADMIN)
        .header("last-event-id", "0")
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let seen = read_until(&mut events, |e| {
        e.iter().any(|e| e.kind == "config_rejected")
    })
    .await;
    let changes = model_changes(&seen);
    let want = [
        ("model_removed", "gamma"),
        ("model_replaced", "delta"),
        ("model_added", "eta"),
    ]
    .map(|(k, m)| (k.to_string(), m.to_string()));
    assert_eq!(changes, want);
    let rejected = seen.iter().find(|e| e.kind == "config_rejected").unwrap();
    let error = rejected.data["error"].as_str().unwrap();
    assert!(error.contains("spec.gpuMemoryUtilization"), "{error}");
    assert_eq!(model_names(&local).await, ["alpha", "beta", "delta", "eta"]);
    assert_eq!(chat_status(&local, "eta", None).await, 200);
}

/// PATCH changes `fairness.popular` alone, without a restart: in the GPU records at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn popular_is_patched_without_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let local = start(data.path()).await;
    assert_eq!(chat_status(&local, "alpha", None).await, 200);
    let popular = || async {
        let gpus = admin_get(&local, "/api/v1/gpus").await;
        gpus["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["status"]["occupants"].as_array().unwrap().clone())
            .find(|o| o["podName"] == "alpha-0")
            .map(|o| o["popular"].clone())
    };
    assert_eq!(popular().await, Some(json!(false)));
    let before = admin_get(&local, "/api/v1/models/alpha").await;
    let patch = |body: Value| {
        local
            .client
            .patch(format!("{}/api/v1/models/alpha", local.url))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let r = patch(json!({"spec": {"fairness": {"popular": true}}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(popular().await, Some(json!(true)));
    let after = admin_get(&local, "/api/v1/models/alpha").await;
    assert_eq!(after["pods"][0]["state"], "serving");
    assert_eq!(after["pods"][0]["lastWake"], before["pods"][0]["lastWake"]);
    // Anything else is a PUT.
    let r = patch(json!({"spec": {"replicas": 2}})).await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fairness.popular"),
        "{e}"
    );
}

/// A preemption and a cold restart are events of their own: who preempted whom on which
/// GPU, and why an engine was started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemptions_and_engine_restarts_are_events() {
    let config = format!(
        "adminToken: {ADMIN}\n{}",
        r#"
gpus:
  simulated:
    - {memory: 10Gi}
models:
  - name: first
    spec:
      modelName: org/first
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 0s}
      extraArgs: [--boot-time, 0s, --ttft, 5ms]
  - name: second
    spec:
      modelName: org/second
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 0s}
      extraArgs: [--boot-time, 0s, --ttft, 5ms, --fail-wakes, "2"]
"#
    );
    let data = tempfile::tempdir().unwrap();
    let local =
        LocalProc::start_with(BIN, &config, &["--data-dir", data.path().to_str().unwrap()]).await;
    let mut events = local
        .client
        .get(format!("{}/api/v1/events", local.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    assert_eq!(chat_status(&local, "first", None).await, 200);
    // second's wake preempts first, and its engine fails its first two wakes: restarted.
    assert_eq!(chat_status(&local, "second", None).await, 200);
    let seen = read_until(&mut events, |e| {
        e.iter().any(|e| e.kind == "preempted") && e.iter().any(|e| e.kind == "engine_restarted")
    })
    .await;
    let preempted = seen.iter().find(|e| e.kind == "preempted").unwrap();
    assert_eq!(preempted.data["victim"], "first-0", "{preempted:?}");
    assert_eq!(preempted.data["preemptor"], "second-0");
    assert_eq!(preempted.data["gpu"], "local-0");
    let restarted = seen.iter().find(|e| e.kind == "engine_restarted").unwrap();
    assert_eq!(restarted.data["model"], "second");
    assert!(!restarted.data["reason"].as_str().unwrap().is_empty());
}
