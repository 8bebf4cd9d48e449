//! The README's quick start, as written, on `local`'s embedded default: every model
//! listed sleeping; a request wakes llama-8b (sleeping → pending → waking → serving in
//! the event stream); a request to mistral-7b, which shares gpu 0 and does not fit
//! beside it, preempts llama-8b once its minRuntime (10 s) and mistral-7b's maxWaitTime
//! (5 s) have passed; the metrics and the GPU records say so.

use std::time::Duration;

use futures_util::StreamExt;
use greenthread_test_support::LocalProc;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

fn transitions(seen: &str, model: &str) -> Vec<(String, String)> {
    greenthread_test_support::state_events(seen)
        .into_iter()
        .filter(|e| e["model"] == model && !e["from"].is_null())
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_runs_as_the_readme_says() {
    let local = LocalProc::start_default(BIN).await;
    let states = local.states().await;
    assert_eq!(states.len(), 4, "{states:?}");
    assert!(states.values().all(|s| s == "sleeping"), "{states:?}");

    let events = local
        .client
        .get(format!("{}/api/v1/events", local.url))
        .send()
        .await
        .unwrap();
    let mut stream = events.bytes_stream();
    let r = local.chat("llama-8b", 4).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // mistral-7b waits for llama-8b's minRuntime, then preempts it.
    let r = local.chat("mistral-7b", 4).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let mut seen = String::new();
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            let llama = transitions(&seen, "llama-8b");
            if transitions(&seen, "mistral-7b").contains(&("waking".into(), "serving".into()))
                && llama.iter().any(|(_, to)| to == "sleeping")
            {
                return;
            }
        }
    })
    .await;
    let llama = transitions(&seen, "llama-8b");
    assert!(done.is_ok(), "events so far: {seen}");
    assert_eq!(
        llama[..3],
        [
            ("sleeping".into(), "pending".into()),
            ("pending".into(), "waking".into()),
            ("waking".into(), "serving".into())
        ],
        "{llama:?}"
    );
    assert_eq!(
        llama.last().unwrap().1,
        "sleeping",
        "llama-8b was preempted: {llama:?}"
    );

    let states = local.states().await;
    assert_eq!(
        (states["mistral-7b"].as_str(), states["llama-8b"].as_str()),
        ("serving", "sleeping")
    );
    let m = local.metrics().await;
    let preempted = |model: &str| {
        m.value(
            "gthread_sidecar_preemptions_total",
            &[("role", "preempted"), ("model", model)],
        )
    };
    assert_eq!(preempted("llama-8b"), Some(1.0));
    // The GPU record of gpu 0: both occupants, mistral-7b serving.
    let gpus = local.get_json("/api/v1/gpus").await;
    let gpu0 = gpus["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["metadata"]["name"] == "local-0")
        .unwrap();
    let occupants: Vec<(String, String)> = gpu0["status"]["occupants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["modelName"].as_str().unwrap().to_string(),
                o["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        occupants.contains(&(
            "mistralai/Mistral-7B-Instruct-v0.3".into(),
            "serving".into()
        )),
        "{occupants:?}"
    );
    assert!(
        occupants.contains(&("meta-llama/Llama-3.1-8B-Instruct".into(), "sleeping".into())),
        "{occupants:?}"
    );
}
