//! `KubeLedger`'s exact requests, with kube-rs's mock-service pattern: a conflicting
//! status write is answered 409, re-read, decided again on the winner's record and
//! written with the new resource version — nothing else, and nothing lost.

use std::sync::{Arc, Mutex};

use greenthread_api::{GpuResource, GpuSpec, GpuStatus, OccupantState};
use greenthread_ledger::{KubeLedger, LedgerError, decide, update};
use http::{Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};

fn gpu(rv: &str, occupants: &[&str]) -> Value {
    let mut g = GpuResource::new(
        "n1-0",
        GpuSpec {
            node: "n1".into(),
            index: 0,
            uuid: "GPU-1".into(),
            product: "H100".into(),
            memory_bytes: 80 << 30,
            host_memory_bytes: None,
        },
    );
    g.metadata.namespace = Some("gt".into());
    g.metadata.resource_version = Some(rv.into());
    let now = jiff::Timestamp::now();
    let mut status = GpuStatus::default();
    for pod in occupants {
        status = decide::register(
            &status,
            &decide::Claim {
                recent_requests: 0,
                pod: pod.to_string(),
                model: format!("m-{pod}"),
                bytes: 0,
                popular: false,
                priority: Default::default(),
                min_runtime: Default::default(),
            },
            now,
        );
    }
    g.status = Some(status);
    serde_json::to_value(g).unwrap()
}

fn reply(code: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

#[tokio::test]
async fn a_conflict_is_reread_decided_again_and_written_at_the_new_version() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut puts = 0;
        let mut open_watches = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let query = uri.query().unwrap_or_default().to_string();
            if query.contains("watch=true") {
                // A watch that stays open with nothing to say: never answered.
                open_watches.push(send);
                continue;
            }
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            let sent: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let rv = sent["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            log.lock().unwrap().push(
                format!("{method} {}", uri.path())
                    + if rv.is_empty() {
                        String::new()
                    } else {
                        format!(" rv={rv}")
                    }
                    .as_str(),
            );
            let path = uri.path();
            let response = match (method.as_str(), path) {
                ("GET", "/apis/greenthread.ai/v1alpha1/namespaces/gt/gpus") => reply(
                    StatusCode::OK,
                    json!({"apiVersion": "greenthread.ai/v1alpha1", "kind": "GPUList", "metadata": {"resourceVersion": "1"}, "items": [gpu("1", &[])]}),
                ),
                ("GET", "/apis/greenthread.ai/v1alpha1/namespaces/gt/gpus/n1-0") => {
                    // The winner of the race: another pod registered at version 2.
                    reply(StatusCode::OK, gpu("2", &["other-0"]))
                }
                ("PUT", "/apis/greenthread.ai/v1alpha1/namespaces/gt/gpus/n1-0/status") => {
                    puts += 1;
                    if rv == "1" {
                        reply(
                            StatusCode::CONFLICT,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                                   "message": "Operation cannot be fulfilled on gpus \"n1-0\": the object has been modified"}),
                        )
                    } else {
                        let mut written = sent.clone();
                        written["metadata"]["resourceVersion"] = json!(format!("{}", 2 + puts));
                        reply(StatusCode::OK, written)
                    }
                }
                _ => reply(
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "code": 404, "reason": "NotFound", "message": path}),
                ),
            };
            send.send_response(response);
        }
    });
    let client = Client::new(mock, "gt");
    let ledger = KubeLedger::new(client, "gt").await.unwrap();
    let conflicts = std::sync::atomic::AtomicU32::new(0);
    let written = update(
        &ledger,
        "n1-0",
        &|| {
            conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
        |g| {
            let next = decide::register(
                &g.status,
                &decide::Claim {
                    recent_requests: 0,
                    pod: "me-0".into(),
                    model: "m".into(),
                    bytes: 0,
                    popular: false,
                    priority: Default::default(),
                    min_runtime: Default::default(),
                },
                jiff::Timestamp::now(),
            );
            Ok::<_, LedgerError>((Some(next), ()))
        },
    )
    .await;
    assert!(written.is_ok(), "{written:?}");
    assert_eq!(conflicts.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "GET /apis/greenthread.ai/v1alpha1/namespaces/gt/gpus",
            "PUT /apis/greenthread.ai/v1alpha1/namespaces/gt/gpus/n1-0/status rv=1",
            "GET /apis/greenthread.ai/v1alpha1/namespaces/gt/gpus/n1-0",
            "PUT /apis/greenthread.ai/v1alpha1/namespaces/gt/gpus/n1-0/status rv=2",
        ]
    );
    // The retry decided on the winner's record: both occupants are there.
    let g = greenthread_ledger::Ledger::get(&ledger, "n1-0")
        .await
        .unwrap();
    let pods: Vec<&str> = g
        .status
        .occupants
        .iter()
        .map(|o| o.pod_name.as_str())
        .collect();
    assert_eq!(pods, ["other-0", "me-0"]);
    assert!(
        g.status
            .occupants
            .iter()
            .all(|o| o.state == OccupantState::Sleeping)
    );
}
